"""Configuration: each mistake is one line naming the file and the field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import API_KEY, INDEXER_PASSWORD, ROOT, write_configs

from dicom_indexer.cli import build_parser, main
from dicom_indexer.errors import EXIT_CONFIG, EXIT_DATABASE


def _write(tmp_path, configs, name, change):
    """Changes one file: None deletes it, a str replaces its text, a dict sets
    fields ('database.port' inside "database"; KeyError removes one)."""
    path = tmp_path / name
    if change is None:
        path.unlink()
        return path
    if isinstance(change, str):
        path.write_text(change)
        return path
    data = json.loads(path.read_text())
    for key, value in change.items():
        target = data
        if key.startswith("database."):
            target, key = data["database"], key[len("database.") :]
        if value is KeyError:
            target.pop(key, None)
        else:
            target[key] = value
    path.write_text(json.dumps(data))
    return path


CASES = [
    ("config.json", None, "config.json: file not found"),
    (
        "config.json",
        '{"database": {"host": "x",',
        "invalid JSON at line 1: the file ends too early",
    ),
    # The line of a trailing comma, not the line after it where json notices.
    (
        "config.json",
        '{\n  "key": "k",\n  "webservice_url": "http://x",\n}\n',
        "config.json: invalid JSON at line 3 column 31: a comma after the last field",
    ),
    (
        "config.json",
        '{\n  "key": "k"\n  "webservice_url": "http://x"\n}\n',
        "config.json: invalid JSON at line 2: a missing comma at its end, or a missing quote",
    ),
    ("config.json", '{\n  "key": "k,\n}\n', "at line 2 column 13: a text not closed"),
    ("config.json", "[1, 2]", "config.json: must hold a JSON object"),
    ("config.json", {"database": KeyError}, "config.json: field 'database' is missing"),
    ("config.json", {"database": "pacsdb"}, "config.json: field 'database' must be a JSON object"),
    ("config.json", {"database.user": KeyError}, "config.json: field 'database.user' is missing"),
    ("config.json", {"database.name": KeyError}, "config.json: field 'database.name' is missing"),
    ("config.json", {"database.name": ""}, "config.json: field 'database.name' is empty"),
    ("config.json", {"database.port": "tres mil"}, "field 'database.port' must be a number"),
    ("config.json", {"database.port": 70000}, "field 'database.port' must be from 1 to 65535"),
    ("config.json", {"database.password_file": "/no/such/pw"}, "'database.password_file' cannot"),
    ("config.json", {"key": KeyError}, "config.json: field 'key' is missing or empty"),
    ("config.json", {"key": " "}, "config.json: field 'key' is missing or empty"),
    ("config.json", {"key_file": "/no/such/key"}, "config.json: field 'key_file' cannot be read"),
    ("config.json", {"webservice_url": KeyError}, "config.json: field 'webservice_url' is missing"),
    ("config.json", {"webservice_url": "ftp://x"}, "field 'webservice_url' must start with http"),
    ("config.json", {"send_deletes": "yes"}, "field 'send_deletes' must be true or false"),
    ("config.json", {"concurrency": 0}, "config.json: field 'concurrency' must be from 1 to 64"),
    ("config.json", {"ca_bundle": "/no/such/ca.pem"}, "field 'ca_bundle': file not found"),
    ("server.json", None, 'server.json: file not found: create it with {"server": "<center'),
    ("server.json", {"server": KeyError}, "server.json: field 'server' is missing"),
    ("server.json", {"server": ""}, "server.json: field 'server' is empty"),
    ("server.json", {"server": ["000"]}, "server.json: field 'server' must be a string"),
]


@pytest.mark.parametrize("name, change, message", CASES, ids=[c[2][:40] for c in CASES])
def test_configuration_error_is_one_line_with_exit_code_3(
    tmp_path, pacs, service, configs, capsys, name, change, message
):
    path = _write(tmp_path, configs, name, change)
    assert main(configs) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "ERROR " + str(path) in err
    assert message in err
    assert API_KEY not in err


def test_port_as_number_or_string(tmp_path, pacs, service, configs):
    pacs.add_study(pacs.add_patient())
    port = json.loads((tmp_path / "config.json").read_text())["database"]["port"]
    _write(tmp_path, configs, "config.json", {"database.port": int(port)})
    assert main(configs) == 0
    _write(tmp_path, configs, "config.json", {"database.port": str(port)})
    assert main(configs) == 0


def test_key_and_password_from_environment(tmp_path, pacs, service, configs, monkeypatch):
    pacs.add_study(pacs.add_patient())
    _write(tmp_path, configs, "config.json", {"key": KeyError, "database.password": "wrong"})
    monkeypatch.setenv("DICOM_INDEXER_KEY", "from-env")
    monkeypatch.setenv("DICOM_INDEXER_DB_PASSWORD", INDEXER_PASSWORD)
    assert main(["initial", *configs]) == 0
    assert service.received[0].headers["X-Api-Key"] == "from-env"


def test_wrong_db_password_is_a_database_error_without_the_password(
    tmp_path, pacs, service, configs, capsys
):
    _write(
        tmp_path,
        configs,
        "config.json",
        {"database.user": "nobody", "database.password": "s3cr3t-pw"},
    )
    assert main(configs) == EXIT_DATABASE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cannot connect to database" in err
    assert "s3cr3t-pw" not in err


def test_database_without_indexer_says_how_to_install(tmp_path, pacs, service, configs, capsys):
    pacs.drop_indexer_process()
    assert main(configs) == EXIT_DATABASE
    err = capsys.readouterr().err
    assert "procedure indexer_process is missing" in err
    if pacs.postgresql:
        assert f"run: psql -d {pacs.name} -f extras/add_indexer_postgresql.sql" in err
    else:
        assert f"run: mysql {pacs.name} < extras/add_indexer.sql" in err


def test_no_traceback_from_the_script(tmp_path):
    args = write_configs(tmp_path, "whatever", "http://127.0.0.1:9/x")
    (tmp_path / "server.json").write_text("{not json")
    result = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), *args], capture_output=True, text=True
    )
    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_every_command_has_help_and_every_exit_code_a_line():
    text = build_parser().format_help()
    for command in ("run", "initial", "retry-failed", "status", "check"):
        assert command in text
    codes = text.split("exit codes:\n", 1)[1]
    assert [line.split()[0] for line in codes.splitlines()] == [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "130", "143"
    ]  # fmt: skip
    assert codes.endswith("recorded\n")


def test_check_reports_every_problem_in_one_run(tmp_path, pacs, service, configs, capsys):
    _write(tmp_path, configs, "config.json", {"key": "", "database.name": KeyError})
    _write(tmp_path, configs, "server.json", {"server": ""})
    assert main(["check", *configs]) == EXIT_CONFIG
    lines = capsys.readouterr().out.splitlines()
    config, server = tmp_path / "config.json", tmp_path / "server.json"
    assert lines == [
        f"FAILED  configuration: {config}: field 'database.name' is missing",
        f"FAILED  configuration: {server}: field 'server' is empty: set it to the center's code",
        f"FAILED  configuration: {config}: field 'key' is missing or empty"
        " (or set key_file, or DICOM_INDEXER_KEY)",
        f"skipped database: fix 'database' in {config} first",
        "skipped webservice: fix the fields above first",
    ]
    assert service.attempts == []


def test_check_still_tries_the_database_when_only_the_key_is_missing(
    tmp_path, pacs, service, configs, capsys
):
    _write(tmp_path, configs, "config.json", {"key": KeyError})
    assert main(["check", *configs]) == EXIT_CONFIG
    out = capsys.readouterr().out
    assert "FAILED  configuration: " in out
    assert f"ok      database: connected to database '{pacs.name}'" in out
    assert "ok      study_service and indexer_process are installed" in out


def test_a_run_names_the_first_problem_and_counts_the_rest(
    tmp_path, pacs, service, configs, capsys
):
    _write(tmp_path, configs, "config.json", {"key": "", "database.name": KeyError})
    assert main(configs) == EXIT_CONFIG
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("field 'database.name' is missing (1 more: see client.py check)")


def test_dry_run_prints_documents_without_a_key(tmp_path, pacs, service, configs, capsys):
    study = pacs.add_study(pacs.add_patient())
    pacs.call_indexer_process()
    _write(tmp_path, configs, "config.json", {"key": KeyError})
    assert main(["--dry-run", *configs]) == 0
    [document] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert document["study_pk"] == study
    assert service.attempts == []


@pytest.mark.parametrize("code, sent", [("000", "000"), ("0042", "0042"), (17, "17")])
def test_center_code_is_sent_as_a_string_as_written(tmp_path, pacs, service, configs, code, sent):
    pacs.add_study(pacs.add_patient())
    _write(tmp_path, configs, "server.json", {"server": code})
    assert main(configs) == 0
    assert [doc["center"] for doc in service.documents] == [sent]


def test_misspelt_field_is_named_in_a_warning(tmp_path, pacs, service, configs, capsys):
    _write(tmp_path, configs, "config.json", {"concurency": 8, "database.hots": "x"})
    assert main(["--dry-run", *configs]) == 0
    err = capsys.readouterr().err
    assert "config.json: unknown field 'concurency' ignored (misspelt?)" in err
    assert "config.json: unknown field 'database.hots' ignored (misspelt?)" in err


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"], ids=["utf8-bom", "utf16-notepad"])
def test_files_saved_by_a_windows_editor_are_read(tmp_path, pacs, service, configs, encoding):
    study = pacs.add_study(pacs.add_patient())
    for name in ("config.json", "server.json"):
        path = tmp_path / name
        text = path.read_text().replace("\n", "\r\n")
        path.write_bytes(text.encode(encoding))
    assert main(configs) == 0
    assert service.study_pks() == [study]


def test_config_json_in_latin1_is_one_line_saying_so(tmp_path, pacs, service, configs, capsys):
    path = _write(tmp_path, configs, "config.json", {"webservice_url": "http://x/año"})
    path.write_bytes(path.read_text().replace("\\u00f1", "ñ").encode("latin-1"))
    assert main(configs) == EXIT_CONFIG
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(
        f"ERROR {path}: is not UTF-8 text (saved as ANSI or Latin-1?): save it as UTF-8"
    )


def test_empty_environment_variables_do_not_hide_the_configured_secrets(
    tmp_path, pacs, service, configs, monkeypatch
):
    pacs.add_study(pacs.add_patient())
    monkeypatch.setenv("DICOM_INDEXER_KEY", "")
    monkeypatch.setenv("DICOM_INDEXER_DB_PASSWORD", "  ")
    assert main(configs) == 0
    assert service.received[0].headers["X-Api-Key"] == API_KEY


def test_secrets_are_stripped_of_surrounding_whitespace(tmp_path, pacs, service, configs):
    pacs.add_study(pacs.add_patient())
    _write(
        tmp_path,
        configs,
        "config.json",
        {"key": f" {API_KEY}\r\n", "database.password": f"{INDEXER_PASSWORD}\n"},
    )
    assert main(configs) == 0
    assert service.received[0].headers["X-Api-Key"] == API_KEY


BAD_KEYS = [
    ("key-with\nnewline", "character 9 of 16 is a control character"),
    ("key-with-\u00f1and\u00fa", "character 10 of 14 is a non-ASCII character"),
    ("clave-\u4e2d\u6587", "character 7 of 8 is a non-ASCII character"),
]


@pytest.mark.parametrize("key, problem", BAD_KEYS, ids=["newline", "latin-1", "cjk"])
def test_a_key_no_header_can_carry_is_a_config_error_before_any_request(
    tmp_path, pacs, service, configs, capsys, key, problem
):
    pacs.add_studies(3)
    _write(tmp_path, configs, "config.json", {"key": key})
    assert main(["initial", *configs]) == EXIT_CONFIG
    err = capsys.readouterr().err
    [line] = err.strip().splitlines()
    assert line.endswith(
        f"{tmp_path / 'config.json'}: field 'key': the API key cannot be sent in an HTTP"
        f" header: {problem} (the key is not shown); copy it again"
    )
    assert "key-with" not in err and "clave" not in err
    assert service.attempts == []
    assert pacs.statuses() == {}  # not even enqueued: the run stopped before the database

    assert main(["check", *configs]) == EXIT_CONFIG
    out = capsys.readouterr().out
    assert f"FAILED  configuration: {tmp_path / 'config.json'}: field 'key': the API key" in out
    assert "skipped webservice: fix the fields above first" in out
    assert "key-with" not in out and "clave" not in out


def test_a_bad_key_from_the_environment_names_the_variable(
    tmp_path, pacs, service, configs, capsys, monkeypatch
):
    monkeypatch.setenv("DICOM_INDEXER_KEY", "abc\ndef")
    assert main(configs) == EXIT_CONFIG
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "environment variable DICOM_INDEXER_KEY: the API key cannot be sent" in line
    assert "abc" not in line
