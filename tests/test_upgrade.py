"""A site running the original client upgrades: its config.json, server.json
and crontab line stay as they are, and cron's `python` is Python 2.7."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    API_KEY,
    DB_HOST,
    DB_PASSWORD,
    DB_PORT,
    DB_USER,
    ROOT,
    drop_database,
    mysql_client,
    original_client_database,
)
from test_mapping import CONTRACT_KEYS

from dicom_indexer.cli import main
from dicom_indexer.errors import EXIT_NO_PYTHON

PYTHON27 = Path("~/.pyenv/versions/2.7.18/bin/python").expanduser()
PYTHON36 = Path("~/.pyenv/versions/3.6.15/bin/python").expanduser()
PYTHON3 = os.path.realpath(sys.executable)  # has the requirements installed


def original_files(site: Path, database: str, url: str) -> None:
    """The original client's config.json and server.json, as its README gives
    them, with the defaults it shipped (host localhost, port "3306" as text,
    user root, an empty password) and the database name, key and URL filled
    in as a site does. World-readable, as they usually are."""
    config = {
        "database": {
            "host": "localhost" if DB_HOST in ("127.0.0.1", "localhost") else DB_HOST,
            "port": str(DB_PORT),
            "user": DB_USER,
            "password": DB_PASSWORD,
            "name": database,
        },
        "server": "No se usa, revisar: server.json",
        "key": API_KEY,
        "webservice_url": url,
    }
    (site / "config.json").write_text(json.dumps(config, indent=4))
    (site / "server.json").write_text('{\n"server": "000"\n}\n')
    for name in ("config.json", "server.json"):
        (site / name).chmod(0o644)


def test_original_clients_config_json_and_server_json_work_unchanged(pacs, service, tmp_path):
    if pacs.postgresql:
        pytest.skip("the original client ran on MySQL only: its files name no engine")
    archive = pacs.add_studies(5)
    original_files(tmp_path, pacs.name, service.url)
    files = ["--config", str(tmp_path / "config.json"), "--server", str(tmp_path / "server.json")]

    assert main(["initial", *files]) == 0
    new = pacs.add_study(pacs.add_patient("NÚÑEZ^MARÍA", "9.876.543-K"))
    assert main(files) == 0

    assert service.study_pks() == sorted(archive + [new])
    for document in service.documents:
        assert list(document) == CONTRACT_KEYS
        assert document["center"] == "000"
    last = service.documents[-1]
    assert (last["patient_name"], last["patient_id"]) == ("NÚÑEZ^MARÍA", "9.876.543-K")
    assert all(r.headers["X-Api-Key"] == API_KEY for r in service.received)


def readme_upgrade_commands() -> list[str]:
    """The shell block of docs/actualizar.md, "Actualizar desde el cliente original"."""
    readme = (ROOT / "docs" / "actualizar.md").read_text(encoding="utf-8")
    section = readme.split("## Actualizar desde el cliente original\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def fake_bin(directory: Path, **programs: Path | str) -> str:
    """A PATH directory holding only the given programs, as small wrappers."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, target in programs.items():
        wrapper = directory / name
        wrapper.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        wrapper.chmod(0o755)
    return str(directory)


@pytest.fixture
def original_site(tmp_path, service):
    """/srv/dicom_indexer of a site running the original client: its files,
    its Python 2 virtualenv and cron script, and a pacsdb with its trigger."""
    if not PYTHON27.exists():
        pytest.skip("no Python 2.7 on this machine (pyenv 2.7.18)")
    db, archive = original_client_database()
    name = db.name

    site = tmp_path / "srv" / "dicom_indexer"
    (site / "extras").mkdir(parents=True)
    (site / "venv" / "bin").mkdir(parents=True)
    (site / "venv" / "bin" / "python").symlink_to(PYTHON27)
    (site / "client.py").write_text('print "the original client, Python 2"\n')
    (site / "extras" / "dicom_indexer.sh").write_text(f"#!/bin/bash\ncd {site}; python client.py\n")
    (site / "extras" / "dicom_indexer.sh").chmod(0o755)
    original_files(site, name, service.url)
    yield site, db, archive
    db.close()
    drop_database(name)


def test_upgrade_by_the_readme_then_cron_with_python_27_delivers_silently(
    original_site, service, tmp_path
):
    site, db, archive = original_site
    config_before = (site / "config.json").read_text()
    server_before = (site / "server.json").read_text()
    mysql = f"{mysql_client()} -h {DB_HOST} -P {DB_PORT} -u {DB_USER} {db.name}"
    # python is 2.7, as on CentOS 7; python3 has the requirements, so that
    # the virtualenv, made with the system's packages, installs offline.
    path = fake_bin(tmp_path / "bin", python=PYTHON27, python3=PYTHON3) + ":/usr/bin:/bin"
    env = dict(os.environ, PATH=path, MYSQL_PWD=DB_PASSWORD)
    substitutions = {
        "/srv/dicom_indexer": str(site),
        "/tmp/dicom_indexer_nuevo": str(ROOT),
        "mysql -u root -p pacsdb": mysql,
        "-m venv .venv": "-m venv --system-site-packages .venv",  # tests stay offline
    }
    outputs = []
    for line in readme_upgrade_commands():
        for old, new in substitutions.items():
            line = line.replace(old, new)
        result = subprocess.run(
            ["sh", "-c", line], cwd=site, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
        outputs.append(result.stdout + result.stderr)
    versions = next(out for out in outputs if "Python" in out)
    assert "Python 2.7" in versions  # the README's first step shows cron's python
    check = outputs[-1].splitlines()
    assert [line.split()[0] for line in check] == ["ok"] * len(check), outputs[-1]
    assert (site / "config.json").read_text() == config_before
    assert (site / "server.json").read_text() == server_before
    assert db.query("SHOW TRIGGERS") == []

    new = db.add_study(db.add_patient())
    cron_path = fake_bin(tmp_path / "cron-bin", python=PYTHON27)  # no python3 at all
    tick = subprocess.run(
        [str(site / "extras" / "dicom_indexer.sh")],
        cwd="/",
        env={"PATH": cron_path, "HOME": str(tmp_path), "SHELL": "/bin/sh"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (tick.returncode, tick.stdout, tick.stderr) == (0, "", "")
    # The two the original client left pending, and the one stored since.
    assert service.study_pks() == sorted(archive[4:] + [new])
    assert all(list(document) == CONTRACT_KEYS for document in service.documents)
    assert {document["center"] for document in service.documents} == {"000"}


def test_cron_script_without_python_38_says_what_it_found_in_one_line(original_site, tmp_path):
    site, _, _ = original_site
    shutil.copy(ROOT / "client.py", site / "client.py")
    shutil.copytree(ROOT / "dicom_indexer", site / "dicom_indexer")
    shutil.copy(ROOT / "extras" / "dicom_indexer.sh", site / "extras" / "dicom_indexer.sh")
    programs = {"python": PYTHON27}
    if PYTHON36.exists():
        programs["python3"] = PYTHON36
    tick = subprocess.run(
        [str(site / "extras" / "dicom_indexer.sh")],
        cwd="/",
        env={"PATH": fake_bin(tmp_path / "old-bin", **programs)},
        capture_output=True,
        text=True,
    )
    assert tick.returncode == EXIT_NO_PYTHON == 9
    assert tick.stdout == ""
    [line] = tick.stderr.splitlines()
    found = f"{site}/venv/bin/python is 2.7, " + ("python3 is 3.6, " if PYTHON36.exists() else "")
    assert line.startswith(
        f"dicom_indexer.sh: no Python 3.8 or newer found ({found}python is 2.7);"
    )
    assert f"create {site}/.venv" in line


def test_client_on_a_python_without_the_requirements_names_the_fix(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([PYTHON3, "-m", "venv", "--without-pip", str(venv)], check=True)
    result = subprocess.run(
        [str(venv / "bin" / "python"), str(ROOT / "client.py"), "check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == EXIT_NO_PYTHON
    [line] = result.stderr.splitlines()
    assert "PyMySQL, requests, urllib3 not installed for" in line
    assert line.endswith(f"-m pip install -r {ROOT / 'requirements.txt'}")
