"""The README against the client itself, so the two cannot drift apart: its
exit codes, its commands and options, and the files it tells an
administrator to copy."""

from __future__ import annotations

import re

from conftest import ROOT

import client

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def _table_first_cells(section: str) -> list[str]:
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [row.split("|")[1].strip() for row in rows[2:]]  # past the header and its rule


def test_readme_exit_codes_are_the_clients():
    documented = [int(cell) for cell in _table_first_cells(_section("Códigos de salida"))]
    assert documented == [code for code, _ in client.EXIT_CODE_HELP]


def test_help_lists_every_exit_code_the_client_uses():
    codes = {
        value
        for name, value in vars(client).items()
        if name.startswith("EXIT_") and isinstance(value, int)
    }
    assert codes == {code for code, _ in client.EXIT_CODE_HELP}
    assert set(client.STOP_EXIT_CODES.values()) <= codes


def test_readme_commands_are_the_parsers():
    parser = client.build_parser()
    [command] = [a for a in parser._actions if a.dest == "command"]
    documented = []
    for cell in _table_first_cells(_section("Comandos")):
        words = cell.strip("`").split()
        assert words[0] == "client.py", cell
        documented.append(words[1] if len(words) > 1 else "run")
    assert sorted(documented) == sorted(command.choices)


def test_readme_mentions_every_option_of_the_parser():
    def mentioned(option: str) -> bool:
        return bool(re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", README))

    parser = client.build_parser()
    missing = [
        action.option_strings
        for action in parser._actions
        if action.option_strings and action.dest != "help"
        if not any(mentioned(option) for option in action.option_strings)
    ]
    assert missing == []


def test_every_setting_in_the_readme_table_is_read_by_the_client(tmp_path):
    """The configuration table names fields that load_settings reads (an
    unknown one would be warned about as misspelt)."""
    section = _section("Configuración")
    fields = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert {"engine", "host", "port", "user", "password", "name", "key"} <= fields
    source = (ROOT / "client.py").read_text()
    unread = [name for name in sorted(fields) if f'"{name}"' not in source]
    assert unread == []
