"""Running it like a production service: TLS with a site's own CA, warnings
for risky setups, secrets from files, the metrics file, the log file."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys

import pytest
from conftest import (
    API_KEY,
    INDEXER_PASSWORD,
    ROOT,
    CentralService,
    read_metrics,
    write_configs,
)

from dicom_indexer.cli import main
from dicom_indexer.errors import EXIT_DATABASE, EXIT_DELIVERY, EXIT_LOCKED


@pytest.fixture
def https_service(tmp_path):
    """The recording service behind TLS, with a self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    cert, key = tmp_path / "ca.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    service = CentralService(tls=context)
    service.ca_file = str(cert)
    yield service
    service.stop()


def test_self_signed_https_refused_without_ca_bundle_accepted_with_it(
    pacs, https_service, tmp_path, capsys
):
    study = pacs.add_study(pacs.add_patient())
    args = write_configs(tmp_path, pacs.name, https_service.url, {"max_retries": 0})
    assert main(args) == EXIT_DELIVERY
    assert "TLS error" in capsys.readouterr().err
    assert https_service.received == []

    args = write_configs(
        tmp_path, pacs.name, https_service.url, {"ca_bundle": https_service.ca_file}
    )
    assert main(args) == 0
    assert https_service.study_pks() == [study]
    assert "webservice_url" not in capsys.readouterr().err  # no http:// warning


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if " WARNING " in line]


def test_http_to_another_host_warns_once_loopback_does_not(pacs, service, tmp_path, capsys):
    # --dry-run: the address is only checked, never contacted.
    args = write_configs(tmp_path, pacs.name, "http://192.0.2.10/api/v1/register")
    assert main(["--dry-run", *args]) == 0
    [warning] = _warnings(capsys.readouterr().err)
    assert "webservice_url in" in warning
    assert "is http:// to 192.0.2.10: the API key and patient data travel unencrypted" in warning

    args = write_configs(tmp_path, pacs.name, service.url)
    assert main(["--dry-run", *args]) == 0
    assert _warnings(capsys.readouterr().err) == []


def test_config_readable_by_others_warns_with_the_fix(pacs, service, tmp_path, capsys):
    args = write_configs(tmp_path, pacs.name, service.url)
    config = tmp_path / "config.json"
    config.chmod(0o644)
    assert main(["--dry-run", *args]) == 0
    [warning] = _warnings(capsys.readouterr().err)
    assert warning.endswith(
        f"{config} holds the database password and the API key and other users of this"
        " machine can read it;"
        f" fix: chmod 600 {config}"
    )
    config.chmod(0o600)
    (tmp_path / "server.json").chmod(0o644)  # the center's code is no secret
    assert main(["--dry-run", *args]) == 0
    assert _warnings(capsys.readouterr().err) == []


def test_warnings_that_matter_reach_cron_mail_even_when_quiet(pacs, service, tmp_path, capsys):
    pacs.add_study(pacs.add_patient())
    args = write_configs(tmp_path, pacs.name, service.url)
    (tmp_path / "config.json").chmod(0o644)
    assert main(["-q", *args]) == 0
    err = capsys.readouterr().err
    [warning] = _warnings(err)
    assert "holds the database password and the API key and other users" in warning
    assert " INFO " not in err  # the summary stays out of cron's mail


def test_key_and_password_from_files(pacs, service, tmp_path):
    pacs.add_study(pacs.add_patient())
    # As Notepad saves them: a byte order mark and CRLF.
    (tmp_path / "key").write_bytes("key-from-file \r\n".encode("utf-8-sig"))
    (tmp_path / "db-password").write_bytes((INDEXER_PASSWORD + "\r\n").encode("utf-8-sig"))
    args = write_configs(
        tmp_path,
        pacs.name,
        service.url,
        {"key": "", "key_file": str(tmp_path / "key")},
        {"password": "", "password_file": str(tmp_path / "db-password")},
    )
    assert main(args) == 0
    assert service.received[0].headers["X-Api-Key"] == "key-from-file"


def test_metrics_file_shows_last_success_and_pending(pacs, service, tmp_path):
    metrics = tmp_path / "dicom_indexer.prom"
    args = write_configs(tmp_path, pacs.name, service.url, metrics_file=str(metrics))
    pacs.add_studies(3)
    assert main(args) == 0
    first = read_metrics(metrics)
    assert first["last_run_exit_code"] == 0
    assert first["last_success_timestamp_seconds"] == first["last_run_timestamp_seconds"]
    assert (first["run_studies_sent"], first["studies_pending"]) == (3, 0)
    assert "# TYPE dicom_indexer_studies_pending gauge" in metrics.read_text()

    service.respond = lambda n, r: (503, "down")
    pacs.add_studies(2)
    assert main(args) == EXIT_DELIVERY
    second = read_metrics(metrics)
    assert second["last_run_exit_code"] == EXIT_DELIVERY
    assert second["last_success_timestamp_seconds"] == first["last_success_timestamp_seconds"]
    assert second["last_run_timestamp_seconds"] > first["last_run_timestamp_seconds"]
    assert second["studies_pending"] == 2
    assert second["oldest_pending_age_seconds"] >= 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_log_file_keeps_the_summary_even_when_quiet(pacs, service, tmp_path, capsys):
    log_file = tmp_path / "indexer.log"
    args = write_configs(tmp_path, pacs.name, service.url, log_file=str(log_file))
    pacs.add_study(pacs.add_patient("SECRETO^NOMBRE"))
    assert main(["-q", *args]) == 0
    assert capsys.readouterr().err == ""
    text = log_file.read_text()
    assert "INFO enqueued 1, sent 1" in text
    assert API_KEY not in text and INDEXER_PASSWORD not in text and "SECRETO" not in text


def test_lock_conflict_is_silent_with_quiet(pacs, service, configs, capsys):
    pacs.run_lock(take=True)
    try:
        assert main(["-q", *configs]) == EXIT_LOCKED
        assert capsys.readouterr().err == ""
        assert main(configs) == EXIT_LOCKED
        assert "this run stands aside" in capsys.readouterr().err
    finally:
        pacs.run_lock(take=False)


def test_systemd_units_run_the_quiet_client_every_five_minutes():
    from conftest import ROOT

    service = (ROOT / "extras" / "dicom-indexer.service").read_text()
    timer = (ROOT / "extras" / "dicom-indexer.timer").read_text()
    assert "Type=oneshot" in service
    assert "client.py -q" in service
    assert "OnCalendar=*:0/5" in timer
    assert "Persistent=true" in timer


HARDENING = (
    "UMask=0077",
    "MemoryMax=",
    "PrivateDevices=true",
    "ProtectKernelTunables=true",
    "ProtectKernelModules=true",
    "ProtectKernelLogs=true",
    "ProtectControlGroups=true",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter=@system-service",
    "LockPersonality=true",
    "RestrictRealtime=true",
    "RestrictSUIDSGID=true",
)


def test_systemd_service_is_hardened_and_its_run_time_bounded():
    from conftest import ROOT

    path = ROOT / "extras" / "dicom-indexer.service"
    lines = path.read_text().splitlines()
    for directive in HARDENING:
        assert any(line.startswith(directive) for line in lines), directive
    [timeout] = [line for line in lines if line.startswith("TimeoutStartSec=")]
    assert timeout != "TimeoutStartSec=infinity"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the directives above are what it rates
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(path)], capture_output=True, text=True
    )
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert exposure, result.stdout + result.stderr
    assert float(exposure.group(1)) <= 2.0, result.stdout


def _run_in_subprocess(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """`script` in a Python of its own with client imported, given client.py's
    arguments -q and `args` in sys.argv[2:]."""
    prelude = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from dicom_indexer.cli import main\n"
        "from dicom_indexer.engines import _import_pymysql\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + script, str(ROOT), "-q", *args],
        capture_output=True,
        text=True,
    )


def test_sending_lowers_the_cpu_priority_to_the_nice_setting(pacs, service, tmp_path):
    args = write_configs(tmp_path, pacs.name, service.url, nice=7)
    result = _run_in_subprocess(
        "import os; code = main(sys.argv[2:]); print(os.nice(0)); raise SystemExit(code)",
        args,
    )
    assert result.returncode == 0, result.stderr
    # Never raised back: a process already nicer (this one, after in-process
    # runs of main) stays as it is.
    assert int(result.stdout) == max(7, os.nice(0))


def test_http_proxy_from_the_environment_is_used_and_no_proxy_respected(
    pacs, service, tmp_path, monkeypatch
):
    # The service stands in for the site's proxy: it receives the absolute URL.
    url = "http://indexador.invalid/api/v1/register"
    args = write_configs(tmp_path, pacs.name, url)
    monkeypatch.setenv("HTTP_PROXY", service.url.rsplit("/api/", 1)[0])
    pacs.add_studies(2)
    assert main(args) == 0
    assert [r.path for r in service.received] == [url, url]

    monkeypatch.setenv("NO_PROXY", "indexador.invalid")
    pacs.add_studies(1)
    assert main(args) == EXIT_DELIVERY  # straight to a host that does not exist
    assert len(service.received) == 2


def test_a_run_does_not_load_cryptography(pacs, service, tmp_path):
    # PyMySQL imports it whenever it is installed: 7 MB of the 50 MB budget,
    # for one MySQL 8 authentication case.
    pytest.importorskip("cryptography")
    args = write_configs(tmp_path, pacs.name, service.url)
    pacs.add_studies(2)
    result = _run_in_subprocess(
        "code = main(sys.argv[2:]); print('cryptography' in sys.modules); raise SystemExit(code)",
        args,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
    assert len(service.received) == 2


def test_mysql8_rsa_password_exchange_loads_cryptography_then(pacs, service, tmp_path):
    """MySQL 8's caching_sha2_password without TLS, on a server that has not
    cached the password, wants it RSA-encrypted; PyMySQL raises RuntimeError
    without `cryptography`. No MySQL 8 here: its answer is played by a
    stand-in for pymysql.connect that raises as PyMySQL does."""
    pytest.importorskip("cryptography")
    if pacs.postgresql:
        pytest.skip("PyMySQL only")
    args = write_configs(tmp_path, pacs.name, service.url)
    pacs.add_studies(1)
    script = (
        "pymysql = _import_pymysql(); real = pymysql.connect; calls = []\n"
        "def connect(**kw):\n"
        "    calls.append(pymysql._auth._have_cryptography)\n"
        "    if not pymysql._auth._have_cryptography:\n"
        "        raise RuntimeError(\"'cryptography' package is required for sha256_password"
        ' or caching_sha2_password auth methods")\n'
        "    return real(**kw)\n"
        "pymysql.connect = connect\n"
        "code = main(sys.argv[2:]); print(calls[:2]); raise SystemExit(code)"
    )
    result = _run_in_subprocess(script, args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[False, True]"
    assert len(service.received) == 1

    # Where cryptography is not installed: one line that says what to install.
    pacs.add_studies(1)
    hidden = "sys.modules['cryptography'] = None\n"
    result = _run_in_subprocess(
        script.replace("pymysql.connect = connect\n", hidden + "pymysql.connect = connect\n"), args
    )
    assert result.returncode == EXIT_DATABASE, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        "the server wants the password RSA-encrypted (MySQL 8 caching_sha2_password"
        " without TLS) and the Python package 'cryptography' is not installed:"
        " pip install cryptography" in result.stderr
    )
    assert len(service.received) == 1  # the study waits, pending
