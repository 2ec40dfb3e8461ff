"""What cron runs: the script from any directory, quiet on success, and the
code base staying within Python 3.8."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, write_configs

from dicom_indexer.errors import EXIT_KEY_REFUSED


def test_client_finds_its_config_beside_itself_from_another_directory(pacs, service, tmp_path):
    install_dir = tmp_path / "srv" / "dicom_indexer"
    shutil.copytree(ROOT / "extras", install_dir / "extras")
    shutil.copy(ROOT / "client.py", install_dir / "client.py")
    shutil.copytree(ROOT / "dicom_indexer", install_dir / "dicom_indexer")
    write_configs(install_dir, pacs.name, service.url)
    study = pacs.add_study(pacs.add_patient())
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()

    result = subprocess.run(
        [sys.executable, str(install_dir / "client.py")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "INFO enqueued 1, sent 1" in result.stderr
    assert service.study_pks() == [study]


def test_cron_script_is_silent_on_success_and_speaks_on_failure(pacs, service, tmp_path):
    install_dir = tmp_path / "dicom indexer"  # a space in the path, on purpose
    shutil.copytree(ROOT / "extras", install_dir / "extras")
    shutil.copy(ROOT / "client.py", install_dir / "client.py")
    shutil.copytree(ROOT / "dicom_indexer", install_dir / "dicom_indexer")
    write_configs(install_dir, pacs.name, service.url)
    study = pacs.add_study(pacs.add_patient())
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    script = str(install_dir / "extras" / "dicom_indexer.sh")

    result = subprocess.run([script], cwd="/", capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert service.study_pks() == [study]

    service.respond = lambda n, r: (401, "bad key")
    pacs.add_study(pacs.add_patient())
    result = subprocess.run([script], cwd="/", capture_output=True, text=True, env=env)
    assert result.returncode == EXIT_KEY_REFUSED
    assert "the service refused the API key" in result.stderr


def test_client_is_executable_with_a_shebang():
    assert os.access(ROOT / "client.py", os.X_OK)
    assert (ROOT / "client.py").read_text().startswith("#!/usr/bin/env python3\n")


def test_code_runs_on_python_3_8():
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -r requirements-dev.txt)")
    result = subprocess.run(
        [
            vermin,
            "--target=3.8-",
            "--violations",
            "--no-tips",
            # Annotations stay strings (from __future__ import annotations),
            # so list[int] in a signature is fine on 3.8.
            str(ROOT / "client.py"),
            str(ROOT / "dev"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_compiles_with_python_3_8_when_present():
    python38 = python_3_8()
    if python38 is None:
        pytest.skip("no Python 3.8 interpreter on this machine")
    package = sorted((ROOT / "dicom_indexer").rglob("*.py"))
    for path in [ROOT / "client.py", *package, *sorted((ROOT / "dev").glob("*.py"))]:
        result = subprocess.run(
            [python38, "-c", "import ast, sys; ast.parse(open(sys.argv[1]).read())", str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr


def test_progress_bar_on_a_terminal_only(pacs, service, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    args = write_configs(tmp_path, pacs.name, service.url)
    pacs.add_studies(30)
    primary, secondary = pty.openpty()
    # A real terminal has a size; a new pty has 0 columns and tqdm would draw nothing.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "client.py"), "initial", *args],
            stderr=secondary,
            stdout=subprocess.PIPE,
            timeout=60,
        )
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed: all read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert result.returncode == 0
    assert "sending: 100%" in terminal
    assert "30/30" in terminal

    service.clear()
    quiet = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "initial", *args], capture_output=True, text=True
    )
    assert "%|" not in quiet.stderr  # no bar when stderr is a file or a pipe (cron)


def python_3_8() -> str | None:
    """A real Python 3.8: pyenv's (its shim for python3.8 exists even where
    3.8 is not selected, so its versions are asked for by name), or one on PATH."""
    found = []
    pyenv = shutil.which("pyenv")
    if pyenv:
        versions = subprocess.run(
            [pyenv, "versions", "--bare"], capture_output=True, text=True, check=False
        ).stdout.split()
        root = subprocess.run(
            [pyenv, "root"], capture_output=True, text=True, check=False
        ).stdout.strip()
        found += [
            os.path.join(root, "versions", v, "bin", "python")
            for v in versions
            if v.startswith("3.8.")
        ]
    found.append(shutil.which("python3.8") or "")
    for candidate in found:
        if candidate and os.path.exists(candidate):
            version = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if version == "True":
                return candidate
    return None
