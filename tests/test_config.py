"""Configuration: each mistake is one line naming the file and the field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import API_KEY, INDEXER_PASSWORD, ROOT, write_configs

import client


def _write(tmp_path, configs, name, change):
    path = tmp_path / name
    if change is None:
        path.unlink()
        return path
    if isinstance(change, str):
        path.write_text(change)
        return path
    data = json.loads(path.read_text())
    for key, value in change.items():
        if value is KeyError:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


CASES = [
    ("config.json", None, "config.json: file not found"),
    ("config.json", '{"host": "x",', "config.json: invalid JSON at line 1 column 14"),
    ("config.json", "[1, 2]", "config.json: must hold a JSON object"),
    ("config.json", {"user": KeyError}, "config.json: field 'user' is missing"),
    ("config.json", {"port": "tres mil"}, "config.json: field 'port' must be a number"),
    ("config.json", {"port": 70000}, "config.json: field 'port' must be from 1 to 65535"),
    ("config.json", {"database": ""}, "config.json: field 'database' is empty"),
    ("server.json", None, "server.json: file not found"),
    ("server.json", {"key": KeyError}, "server.json: field 'key' is missing or empty"),
    ("server.json", {"key": " "}, "server.json: field 'key' is missing or empty"),
    ("server.json", {"key_file": "/no/such/key"}, "field 'key_file' cannot be read"),
    ("config.json", {"password_file": "/no/such/pw"}, "field 'password_file' cannot be read"),
    ("server.json", {"send_deletes": "yes"}, "field 'send_deletes' must be true or false"),
    ("server.json", {"center": KeyError}, "server.json: field 'center' is missing"),
    ("server.json", {"center": 12}, "server.json: field 'center' must be a string"),
    ("server.json", {"webservice_url": "ftp://x"}, "field 'webservice_url' must start with http"),
    ("server.json", {"concurrency": 0}, "server.json: field 'concurrency' must be from 1 to 64"),
    ("server.json", {"ca_bundle": "/no/such/ca.pem"}, "field 'ca_bundle': file not found"),
]


@pytest.mark.parametrize("name, change, message", CASES, ids=[c[2][:40] for c in CASES])
def test_configuration_error_is_one_line_with_exit_code_3(
    tmp_path, pacs, service, configs, capsys, name, change, message
):
    path = _write(tmp_path, configs, name, change)
    assert client.main(configs) == client.EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "ERROR " + str(path) in err
    assert message in err
    assert API_KEY not in err


def test_port_as_number_or_string(tmp_path, pacs, service, configs):
    pacs.add_study(pacs.add_patient())
    _write(tmp_path, configs, "config.json", {"port": 3306})
    assert client.main(configs) == 0
    _write(tmp_path, configs, "config.json", {"port": "3306"})
    assert client.main(configs) == 0


def test_key_and_password_from_environment(tmp_path, pacs, service, configs, monkeypatch):
    pacs.add_study(pacs.add_patient())
    _write(tmp_path, configs, "server.json", {"key": KeyError})
    _write(tmp_path, configs, "config.json", {"password": "wrong"})
    monkeypatch.setenv("DICOM_INDEXER_KEY", "from-env")
    monkeypatch.setenv("DICOM_INDEXER_DB_PASSWORD", INDEXER_PASSWORD)
    assert client.main(["initial", *configs]) == 0
    assert service.received[0].headers["X-Api-Key"] == "from-env"


def test_wrong_db_password_is_a_database_error_without_the_password(
    tmp_path, pacs, service, configs, capsys
):
    _write(tmp_path, configs, "config.json", {"user": "nobody", "password": "s3cr3t-pw"})
    assert client.main(configs) == client.EXIT_DATABASE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cannot connect to database" in err
    assert "s3cr3t-pw" not in err


def test_database_without_indexer_says_how_to_install(tmp_path, pacs, service, configs, capsys):
    pacs.execute("DROP PROCEDURE indexer_process")
    assert client.main(configs) == client.EXIT_DATABASE
    err = capsys.readouterr().err
    assert "procedure indexer_process is missing" in err
    assert f"run: mysql {pacs.name} < extras/add_indexer.sql" in err


def test_no_traceback_from_the_script(tmp_path):
    args = write_configs(tmp_path, "whatever", "http://127.0.0.1:9/x")
    (tmp_path / "server.json").write_text("{not json")
    result = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), *args], capture_output=True, text=True
    )
    assert result.returncode == client.EXIT_CONFIG
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_every_command_has_help():
    text = client.build_parser().format_help()
    for command in ("run", "initial", "retry-failed", "status", "check"):
        assert command in text
    assert "exit codes" in text
