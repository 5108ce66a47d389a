"""A fresh clone is self-contained: README, docs/ and every --help stand on their own (nothing
points outside the repository), every CLI option explains itself and shows its default."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from ivshmem_virtio.app.cli import build_parser
from ivshmem_virtio.procs import run_cli

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"\.\./shared|shared/spec")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the CLI, nested sub-commands included, with its command line."""
    found = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}", sub)

    walk("ivshmem-virtio", build_parser())
    return found


PARSERS = _parsers()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_point_nowhere_outside_the_repository(path):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        assert not OUTSIDE.search(line), f"{path.name}:{n}: {line.strip()}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_in_docs_exist(path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.name}: link to missing {target}"


def test_protocol_doc_has_the_sections_code_cites():
    """Code comments cite "virtio-ivshmem.md §3.7", "§8.2", "can.md §8": they must exist."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    for heading in ("## 1. ", "### 1.2 ", "### 1.3 ", "## 2. ", "## The simulated link",
                    "### 3.1 ", "### 3.2 ", "### 3.3 ", "### 3.4 ", "### 3.5 ", "### 3.6 ",
                    "### 3.7 ", "## 8. Project decisions", "## virtio-can decisions"):
        assert f"\n{heading}" in text, heading
    decisions = text.split("## 8. Project decisions")[1].split("\n## ")[0]
    assert all(f"\n{k}. **" in decisions for k in range(1, 10))


@pytest.mark.parametrize(("name", "parser"), PARSERS, ids=[n for n, _ in PARSERS])
def test_every_option_has_help_and_no_markup(name, parser):
    text = parser.format_help()
    assert not OUTSIDE.search(text), text
    assert "``" not in text and ":class:" not in text, text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        assert action.help and action.help.strip(), \
            f"{name} {'/'.join(action.option_strings) or action.dest}: no help text"


def test_defaults_are_shown():
    helps = {name: parser.format_help().replace("\n", " ") for name, parser in PARSERS}
    squash = {name: re.sub(r"\s+", " ", text) for name, text in helps.items()}
    assert "(default: /etc/ivshmem-virtio/config.toml)" in \
        squash["ivshmem-virtio serve"].replace("ivshmem- virtio", "ivshmem-virtio")
    for name, spin in (("ivshmem-virtio blk", "200"), ("ivshmem-virtio can", "400")):
        assert "(default: 256)" in squash[name] and f"(default: {spin}" in squash[name]
    assert "(default: 8M)" in squash["ivshmem-virtio blk-client verify"]


def test_top_level_help_as_printed():
    r = run_cli(["--help"], timeout=30)
    out = r.stdout.decode()
    assert r.returncode == 0 and "usage: ivshmem-virtio" in out
    assert "``" not in out and not OUTSIDE.search(out)


# -- the commands the docs show exist as shown ------------------------------------------------

CMD = re.compile(r"\s*(?:sudo\s+)?(?:\.venv/bin/)?ivshmem-virtio\s+(.*)")
USER_DOCS = [*DOCS, *sorted((ROOT / "rtos_inmate").glob("*.md"))]


def _doc_commands(text: str) -> tuple[list[str], list[str]]:
    """(command lines of code blocks, inline `ivshmem-virtio ...` spans of the prose)."""
    blocks: list[str] = []
    spans: list[str] = []
    in_block = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block:
            if m := CMD.match(line):
                blocks.append(m.group(1))
        else:
            spans += [m.group(1) for s in re.findall(r"`([^`]+)`", line) if (m := CMD.match(s))]
    return blocks, spans


def _argv(cmd: str) -> list[str]:
    """A documented command line as argv: comments and `&` cut, `[--opt X]` taken, of
    `a|b|c` the first, `...` dropped."""
    import shlex

    cmd = re.split(r"\s+#\s", cmd)[0].strip().removesuffix("&").strip()
    cmd = re.sub(r"\[([^\]]*)\]", r"\1", cmd).replace(" ...", "")
    return [t.split("|")[0] if "|" in t and ":" not in t else t for t in shlex.split(cmd)]


def _subparser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    parsers = dict(PARSERS)
    name = "ivshmem-virtio"
    rest = list(argv)
    while rest and f"{name} {rest[0]}" in parsers:
        name = f"{name} {rest.pop(0)}"
    return parsers[name], rest


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_parse(path, capsys):
    """Every `ivshmem-virtio ...` line of a code block parses with today's CLI; every inline
    mention names a real command and real options of it (prose may leave values out)."""
    blocks, spans = _doc_commands(path.read_text())
    for cmd in blocks:
        try:
            build_parser().parse_args(_argv(cmd))
        except SystemExit as e:
            pytest.fail(f"{path.name}: `ivshmem-virtio {cmd}` does not parse: "
                        f"{capsys.readouterr().err.strip() or e}")
    for cmd in spans:
        argv = _argv(cmd)
        if argv and argv[0].isupper():  # `ivshmem-virtio COMMAND --help`
            continue
        parser, rest = _subparser(argv)
        known = {s for a in parser._actions for s in a.option_strings}
        for tok in rest:
            if tok.startswith("--"):
                assert tok.split("=")[0] in known, \
                    f"{path.name}: `ivshmem-virtio {cmd}`: {tok} is not an option of it"


def test_commands_named_in_help_texts_exist():
    """A help text that names a command (``ivshmem-virtio bench --list``) names a real one: the
    bench suites' help pointed at a --list that did not exist."""
    for name, parser in PARSERS:
        texts = [parser.description or "", parser.epilog or ""]
        texts += [a.help for a in parser._actions if isinstance(a.help, str)]
        for text in texts:
            for span in re.findall(r"`([^`]+)`", text):
                m = CMD.match(span)
                if not m:
                    continue
                argv = _argv(m.group(1))
                sub, rest = _subparser(argv)
                known = {s for a in sub._actions for s in a.option_strings}
                for tok in rest:
                    if tok.startswith("--"):
                        assert tok.split("=")[0] in known, f"{name}: `{span}`: no {tok}"
