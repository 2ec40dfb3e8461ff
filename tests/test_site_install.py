"""The README's installation, as a new administrator follows it: its own
commands, run from a fresh copy of the project. The service user, the
offline wheelhouse (on a machine with PyPI), the MySQL account that
grant_indexer.sql creates for 'localhost' reached through the local socket
on a server with skip_name_resolve, and what `check` and `status` say when
the files belong to someone else or a run is under way."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DB_HOST,
    DB_PORT,
    ENGINES,
    GRANT_SQL,
    INDEXER_PASSWORD,
    INDEXER_USER,
    PG_HOST,
    PG_PORT,
    ROOT,
    connect,
    run_sql_file,
)

from dicom_indexer.cli import main
from dicom_indexer.engines import _local_mysql_socket
from dicom_indexer.errors import EXIT_CONFIG, EXIT_DATABASE, EXIT_OK

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _install_section() -> str:
    match = re.search(r"^## Instalación en un servidor PACS\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, "README has no section '## Instalación en un servidor PACS'"
    return match.group(1)


def _command(starts: str) -> str:
    """The install section's first command line that starts so."""
    found = [
        line.strip() for line in _install_section().splitlines() if line.strip().startswith(starts)
    ]
    assert found, f"the install section has no line starting {starts!r}"
    return found[0]


# -- the MySQL account for 'localhost' and the local socket --------------------


@pytest.fixture
def socket_account(pacs: Any) -> Any:
    """The account as the README creates it: grant_indexer.sql with only a
    password, so for 'localhost'."""
    if pacs.postgresql:
        pytest.skip("the local socket and 'localhost' accounts are MySQL's")
    with connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT @@skip_name_resolve AS s, @@socket AS socket")
        server = cur.fetchone()
    if not server["s"]:
        pytest.skip("the server resolves names: 127.0.0.1 would match 'localhost'")
    if _local_mysql_socket() is None:
        pytest.skip("no MySQL socket where MariaDB and MySQL place it")
    user, password = f"dix_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    init = f"SET @indexer_user = '{user}', @indexer_password = '{password}'"
    result = run_sql_file(pacs.name, GRANT_SQL, init=init)
    assert result.returncode == 0, result.stderr.decode()
    yield user, password
    with connect() as conn, conn.cursor() as cur:
        cur.execute(f"DROP USER IF EXISTS '{user}'@'localhost'")


def _configs(directory: Path, database: dict, url: str) -> list[str]:
    config = {"database": database, "key": "site-key-1234", "webservice_url": url}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "server.json").write_text(json.dumps({"server": "001"}))
    for name in ("config.json", "server.json"):
        (directory / name).chmod(0o600)
    return ["--config", str(directory / "config.json"), "--server", str(directory / "server.json")]


def test_localhost_is_the_local_socket_as_for_the_mysql_command(
    pacs, service, socket_account, tmp_path, capsys
):
    user, password = socket_account
    database = {"host": "localhost", "user": user, "password": password, "name": pacs.name}
    configs = _configs(tmp_path, database, service.url)
    assert main(["check", *configs]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"database: connected to database '{pacs.name}' through the local socket /" in out
    pacs.add_studies(2)
    assert main(["-q", *configs]) == EXIT_OK
    assert [r.method for r in service.received] == ["GET", "POST", "POST"]  # check, then a run


def test_access_denied_over_tcp_names_the_host_the_server_saw(
    pacs, service, socket_account, tmp_path, capsys
):
    user, password = socket_account
    database = {"host": "127.0.0.1", "user": user, "password": password, "name": pacs.name}
    configs = _configs(tmp_path, database, service.url)
    assert main(["check", *configs]) == EXIT_DATABASE
    out = capsys.readouterr().out
    assert f"Access denied for user '{user}'@'127.0.0.1'" in out
    assert "the server saw this connection come from '127.0.0.1', and through the local" in out
    assert "the same user and password are accepted: the account exists for 'localhost'" in out
    assert "SET @indexer_host = '127.0.0.1'" in out
    assert password not in out
    # A wrong password: denied both ways, and said so.
    database["password"] = "not-the-password"
    configs = _configs(tmp_path, database, service.url)
    assert main(configs) == EXIT_DATABASE
    err = capsys.readouterr().err
    assert "come from '127.0.0.1'" in err and "or check the user and password" in err


# -- status while a run holds the lock ------------------------------------------


def test_status_says_a_run_is_under_way(pacs, service, configs, capsys):
    pacs.add_studies(3)
    pacs.run_lock(True)
    try:
        assert main(["status", *configs]) == EXIT_OK
        out = capsys.readouterr().out
        assert "run:            under way (another client.py holds the run lock)" in out
        pacs.execute(
            "INSERT INTO study_service (study_pk, status, enqueued_at, cursor_pk)"
            f" VALUES (-1, 'initial', {pacs.now()}, 2)"
        )
        assert main(["status", *configs]) == EXIT_OK
        out = capsys.readouterr().out
        assert ", an initial load started 20" in out
        assert "initial load:   under way, enqueued up to study pk 2" in out
        assert "run client.py to carry on" not in out
    finally:
        pacs.run_lock(False)
    # Free again: status took the lock only to look, and gave it back.
    assert main(["status", *configs]) == EXIT_OK
    out = capsys.readouterr().out
    assert "under way" not in out and "run client.py to carry on" in out
    assert pacs.run_lock_free()


def test_initial_counts_each_study_of_the_archive_once(pacs, service, configs, capsys):
    """The tick before the load finds the studies stored since installation;
    they are part of the archive, not more of it."""
    pacs.add_studies(7)
    assert main(["initial", *configs]) == EXIT_OK
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "enqueued 7, sent 7," in summary


# -- a fresh copy, the service user, the offline wheelhouse -----------------------


def _fresh_copy(destination: Path) -> None:
    """What the README's cp line copies, from this checkout."""
    line = _command("sudo cp -r ")
    names = line.split()[3:-1]
    assert {"client.py", "dicom_indexer", "extras"} <= set(names), line
    destination.mkdir(parents=True)
    for name in names:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name)
        else:
            shutil.copy2(source, destination / name)


def _as_site(line: str, home: Path, user: str) -> list[str]:
    """A README line as this test runs it: without sudo, in `home`, as `user`."""
    words = line.split()
    if words[0] == "sudo":
        words = words[1:]
    return [
        w.replace("/srv/dicom_indexer", str(home)).replace("dicom-indexer", user) for w in words
    ]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: Any) -> Path:
    """The README's `pip download`, on this machine (which reaches PyPI)."""
    project = tmp_path_factory.mktemp("connected")
    for name in ("requirements.txt", "requirements-postgresql.txt"):
        shutil.copy2(ROOT / name, project / name)
    line = _command("python3 -m pip download")
    command = [sys.executable, *line.split()[1:]]
    result = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    wheels = sorted(p.name for p in (project / "wheelhouse").iterdir())
    assert wheels and all(name.endswith("-none-any.whl") for name in wheels), wheels
    return project / "wheelhouse"


def _system_python() -> str:
    """A Python that another user may run (pyenv's lives under /root), with venv."""
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and os.access(candidate, os.X_OK):
            check = subprocess.run(
                [candidate, "-c", "import venv, ensurepip, sys; print(sys.version_info >= (3, 8))"],
                capture_output=True,
                text=True,
            )
            if check.stdout.strip() == "True":
                return candidate
    pytest.skip("no system Python 3.8+ with venv and ensurepip")


@pytest.fixture
def service_user() -> Any:
    """The README's useradd line, for a throwaway user of this test."""
    if os.geteuid() != 0:
        pytest.skip("creating the service user needs root")
    user = f"dit-{uuid.uuid4().hex[:8]}"
    home = Path(tempfile.mkdtemp(prefix="dicom_indexer_site_", dir="/tmp"))
    home.chmod(0o755)
    site = home / "srv"
    line = _command("sudo useradd ")
    result = subprocess.run(_as_site(line, site, user), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    yield user, site
    subprocess.run(["userdel", user], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


def test_offline_install_as_the_service_user(wheelhouse, service_user, service, tmp_path):
    """Steps 1 (with the wheelhouse), 4 and 5 of the install section, as
    written, in a fresh copy; then what a site meets when the files were
    left to root."""
    user, site = service_user
    _fresh_copy(site)
    shutil.copytree(wheelhouse, site / "wheelhouse")
    python = _system_python()
    venv = _command("sudo python3 -m venv ")
    steps = [
        [python, *_as_site(venv, site, user)[1:]],
        _as_site(_command("sudo .venv/bin/pip install --no-index"), site, user),
    ]
    for step in steps:
        result = subprocess.run(step, cwd=site, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (step, result.stderr[-2000:])
    engine = "postgresql" if ENGINES == ["postgresql"] else "mysql"
    if engine == "postgresql":
        pip = _as_site(_command("sudo .venv/bin/pip install --no-index"), site, user)
        subprocess.run(
            [*pip[:-1], "requirements-postgresql.txt"], cwd=site, check=True, capture_output=True
        )
    database = {
        "engine": engine,
        "host": PG_HOST if engine == "postgresql" else DB_HOST,
        "port": PG_PORT if engine == "postgresql" else DB_PORT,
        "user": INDEXER_USER,
        "password": INDEXER_PASSWORD,
        "name": "not_needed_for_this_check",
    }
    _configs(site, database, service.url)
    for line in ("sudo chown -R ", "sudo chmod 600 "):
        subprocess.run(_as_site(_command(line), site, user), check=True)
    assert pwd.getpwuid((site / "config.json").stat().st_uid).pw_name == user
    assert (site / "config.json").stat().st_mode & 0o777 == 0o600

    check = _as_site(_command("sudo -u dicom-indexer "), site, user)
    as_user = ["runuser", "-u", user, "--", *check[2:]]
    result = subprocess.run(as_user, cwd=site, capture_output=True, text=True, timeout=120)
    configuration = [line for line in result.stdout.splitlines() if "configuration:" in line]
    assert configuration and configuration[0].startswith("ok "), result.stdout + result.stderr

    # config.json left to root, as after a sudo cp without the chown:
    os.chown(site / "config.json", 0, 0)
    result = subprocess.run(as_user, cwd=site, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (
        f"config.json: cannot read: Permission denied (this runs as user '{user}';"
        " the file belongs to 'root', mode 0600)" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
