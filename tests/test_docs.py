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
    for name in ("ivshmem-virtio blk", "ivshmem-virtio can"):
        assert "(default: 256)" in squash[name] and "(default: 200" in squash[name]
    assert "(default: 8M)" in squash["ivshmem-virtio blk-client verify"]


def test_top_level_help_as_printed():
    r = run_cli(["--help"], timeout=30)
    out = r.stdout.decode()
    assert r.returncode == 0 and "usage: ivshmem-virtio" in out
    assert "``" not in out and not OUTSIDE.search(out)
