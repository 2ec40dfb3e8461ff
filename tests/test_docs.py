"""The README and the pages of docs/ against the client itself, so that they
cannot drift apart: its exit codes, its commands and options, the settings
it reads; and against each other: every internal link leads to a file and a
heading that exist."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

import dicom_indexer.errors
from dicom_indexer.cli import build_parser
from dicom_indexer.errors import EXIT_CODE_HELP
from dicom_indexer.run import STOP_EXIT_CODES

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TEXTS = {path: path.read_text(encoding="utf-8") for path in PAGES}
ALL_TEXT = "\n".join(TEXTS.values())

FENCE = re.compile(r"^\s*```")
HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$")


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(line number, level, title) of each heading outside code blocks."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines()):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (match := HEADING.match(line)):
            found.append((number, len(match.group(1)), match.group(2)))
    return found


def _section(title: str) -> str:
    """The text under '# title' or '## title', down to the next heading of the
    same or a higher level, in whichever file holds it (the README first)."""
    for text in TEXTS.values():
        lines = text.splitlines()
        headings = _headings(text)
        for index, (start, level, name) in enumerate(headings):
            if level <= 2 and name == title:
                end = next((n for n, lv, _ in headings[index + 1 :] if lv <= level), len(lines))
                return "\n".join(lines[start + 1 : end])
    raise AssertionError(f"neither the README nor docs/ has a section '## {title}'")


def _table_first_cells(section: str) -> list[str]:
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [row.split("|")[1].strip() for row in rows[2:]]  # past the header and its rule


def test_readme_exit_codes_are_the_clients():
    documented = [int(cell) for cell in _table_first_cells(_section("Códigos de salida"))]
    assert documented == [code for code, _ in EXIT_CODE_HELP]


def test_help_lists_every_exit_code_the_client_uses():
    codes = {
        value
        for name, value in vars(dicom_indexer.errors).items()
        if name.startswith("EXIT_") and isinstance(value, int)
    }
    assert codes == {code for code, _ in EXIT_CODE_HELP}
    assert set(STOP_EXIT_CODES.values()) <= codes


def test_readme_commands_are_the_parsers():
    parser = build_parser()
    [command] = [a for a in parser._actions if a.dest == "command"]
    documented = []
    for cell in _table_first_cells(_section("Comandos")):
        words = cell.strip("`").split()
        assert words[0] == "client.py", cell
        documented.append(words[1] if len(words) > 1 else "run")
    assert sorted(documented) == sorted(command.choices)


def test_docs_mention_every_option_of_the_parser():
    def mentioned(option: str) -> bool:
        return bool(re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", ALL_TEXT))

    parser = build_parser()
    missing = [
        action.option_strings
        for action in parser._actions
        if action.option_strings and action.dest != "help"
        if not any(mentioned(option) for option in action.option_strings)
    ]
    assert missing == []


def _fields_read_by_the_client() -> set[str]:
    """Every field name that client.py reads: the first argument of a reading
    method of _Fields (`db.text("host", ...)`, `top.number("port", ...)`), or
    a name handed to a function that takes a _Fields first
    (`_secret(db, "password", "password_file", ...)`)."""
    tree = ast.parse((ROOT / "dicom_indexer" / "config.py").read_text(encoding="utf-8"))
    [fields_class] = [
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "_Fields"
    ]
    methods = {
        node.name: {
            attribute.attr
            for attribute in ast.walk(node)
            if isinstance(attribute, ast.Attribute)
            and isinstance(attribute.value, ast.Name)
            and attribute.value.id == "self"
        }
        for node in fields_class.body
        if isinstance(node, ast.FunctionDef)
    }
    # A method reads a field if it records it as read (_value, self.read) or
    # calls one that does; problem() and unknown() only report.
    reading = {name for name, used in methods.items() if used & {"_value", "read"}}
    while grown := {name for name, used in methods.items() if used & reading} - reading:
        reading |= grown
    reading = {name for name in reading if not name.startswith("_")}

    def takes_fields(function: ast.FunctionDef) -> bool:
        first = function.args.args[0].annotation if function.args.args else None
        return (isinstance(first, ast.Name) and first.id == "_Fields") or (
            isinstance(first, ast.Constant) and first.value == "_Fields"
        )

    helpers = {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef) and takes_fields(node)
    }
    names = set()
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        if isinstance(call.func, ast.Attribute) and call.func.attr in reading:
            arguments = call.args[:1]
        elif isinstance(call.func, ast.Name) and call.func.id in helpers:
            arguments = call.args[1:]
        else:
            continue
        names |= {
            a.value for a in arguments if isinstance(a, ast.Constant) and isinstance(a.value, str)
        }
    return names


def test_every_setting_in_the_readme_table_is_read_by_the_client():
    """Each field of the configuration tables is read by load_settings, by
    name (a field it never reads would be warned about as misspelt)."""
    section = _section("Configuración")
    fields = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert {"engine", "host", "port", "user", "password", "name", "key"} <= fields
    read = _fields_read_by_the_client()
    assert {"host", "password", "key_file", "server"} <= read  # the reader finds them all
    assert sorted(fields - read) == []


def _slug(title: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (but '-'
    and '_'; accented letters stay), each space a '-'."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    anchors: set[str] = set()
    for _, _, title in _headings(text):
        slug = base = _slug(title)
        count = 0
        while slug in anchors:  # a repeated heading gets -1, -2, ...
            count += 1
            slug = f"{base}-{count}"
        anchors.add(slug)
    return anchors


def _links(text: str) -> list[str]:
    """The targets of the Markdown links outside code blocks and code spans."""
    prose, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            prose.append(re.sub(r"`[^`]*`", "", line))
    return re.findall(r"\]\(([^)\s]+)\)", "\n".join(prose))


def test_anchors_are_githubs():
    assert _slug("Entregas, fallas y reenvíos") == "entregas-fallas-y-reenvíos"
    assert _slug("Bases `pacsdb` distintas de la de fábrica") == (
        "bases-pacsdb-distintas-de-la-de-fábrica"
    )
    assert _slug("Desde la versión 2.1 de este cliente") == "desde-la-versión-21-de-este-cliente"


def test_every_internal_link_leads_to_a_file_and_a_heading():
    broken = []
    for page, text in TEXTS.items():
        for target in _links(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not destination.exists():
                broken.append(f"{where}: no file {path}")
            elif (
                anchor
                and destination.suffix == ".md"
                and anchor not in _anchors(destination.read_text(encoding="utf-8"))
            ):
                broken.append(f"{where}: no heading #{anchor} in {path or page.name}")
    assert broken == []


def test_every_docs_page_has_a_title_and_a_way_back():
    for page in PAGES[1:]:
        lines = TEXTS[page].splitlines()
        assert lines[0].startswith("# "), page.name
        assert "[← README](../README.md)" in lines[1:4], page.name


def test_readme_lines_outside_tables_stay_readable():
    long = [
        (number, len(line))
        for number, line in enumerate(TEXTS[README].splitlines(), 1)
        if len(line) > 400 and not line.lstrip().startswith("|")
    ]
    assert long == []


def test_readme_starts_with_the_install_and_test_commands_ci_runs():
    blocks = re.findall(r"^```sh\n(.*?)\n```", TEXTS[README], re.S | re.M)
    assert blocks[:2] == [
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
        " && .venv/bin/python client.py check",
        "python3 -m pip install -r requirements-dev.txt && python3 -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == blocks[1]  # CI ends with the README's test command, as written there


def test_every_setting_in_a_source_page_table_is_read_by_the_client():
    """The configuration tables of the source pages (docs/orthanc.md,
    docs/dicomweb.md, docs/dimse.md) name fields the client reads, each in
    its own section ("dimse.pacs_ae")."""
    read = _fields_read_by_the_client()
    for page, section in (("orthanc", "orthanc"), ("dicomweb", "dicomweb"), ("dimse", "dimse")):
        text = (ROOT / "docs" / f"{page}.md").read_text(encoding="utf-8")
        rows = re.findall(r"^\| ((?:`[a-z_.]+`(?:, )?)+) \|", text, re.M)
        fields = {
            name.split(".", 1)[-1]
            for row in rows
            for name in re.findall(r"`([a-z_.]+)`", row)
            if name.startswith(section + ".") or "." not in name
        }
        assert {"url"} <= fields or {"host", "pacs_ae"} <= fields, page
        assert sorted(fields - read) == [], page
