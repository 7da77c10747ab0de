"""The documentation: the site builds with --strict, every page is in it, and every link into it holds.

The site needs mkdocs, mkdocs-material and mkdocstrings (the ``docs`` extra, also in ``test``): without
them its build is skipped locally and fails under ``CI=true``, as the Docker tests do.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI, REPO, patience

DOCS = REPO / "docs"
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
SOURCE_NAMES_A_PAGE = re.compile(r"docs/([\w./-]+?\.md)(?:#([\w-]+))?")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading; the site gives the same (pymdownx.slugs in mkdocs.yml)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text).strip().lower().replace(" ", "-")


def prose(text: str) -> list[str]:
    """The lines of Markdown ``text`` outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def page_anchors(path: Path) -> set[str]:
    """The anchors of the headings of the Markdown file ``path``."""
    return {slug(m.group(1)) for line in prose(path.read_text(encoding="utf-8")) if (m := HEADING.match(line))}


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is not there
        return False


def need_mkdocs() -> None:
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if not importable(m)]
    if missing:
        reason = f"{', '.join(missing)} not installed (pip install -e '.[docs]')"
        if IN_CI:
            pytest.fail(f"{reason} (required because CI=true)", pytrace=False)
        pytest.skip(reason)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, cwd=config.parent,
                          timeout=patience(120), env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def nav_pages(nav: Any) -> list[str]:
    """Every page the nav of mkdocs.yml names, in order."""
    if isinstance(nav, str):
        return [nav] if nav.endswith(".md") else []
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return []


def mkdocs_config() -> dict[str, Any]:
    """mkdocs.yml as data; its Python tags (the toc's slugify) are read as None, not run."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)  # noqa: S506 - SafeLoader, tags ignored


# --------------------------------------------------------------------------- the site


def test_the_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a dead link or anchor, a page left out of the nav or a broken docstring fails it."""
    need_mkdocs()
    site = tmp_path / "site"
    p = mkdocs_build(REPO / "mkdocs.yml", site)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (site / "index.html").is_file()
    schema = (site / "record-schema" / "index.html").read_text()
    assert "ResultRecord" in schema and "weights_sha256" in schema  # mkdocstrings rendered harness.record's fields
    assert ":class:" not in schema  # Sphinx roles of the docstrings are shown as the names alone


def test_a_link_out_of_docs_that_leads_nowhere_fails_the_build(tmp_path: Path) -> None:
    """mkdocs_hooks.py: a link leaving docs/ is checked too; a README section that moved into docs/ is followed."""
    need_mkdocs()
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Project\n\n## Still here\n")
    (tmp_path / "docs" / "moved.md").write_text("# Moved\n\n## A section that moved\n")
    (tmp_path / "docs" / "index.md").write_text(textwrap.dedent("""\
        # Home

        [here](../README.md#still-here) [moved](../README.md#a-section-that-moved) [gone](../README.md#gone)
        [nowhere](../nowhere.py)
        """))
    (tmp_path / "mkdocs.yml").write_text(f"site_name: t\nhooks: [{REPO / 'mkdocs_hooks.py'}]\n"
                                         "nav: [index.md, moved.md]\n")
    p = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert p.returncode != 0
    assert "'../README.md#gone': no heading '#gone' in README.md or in docs/" in p.stderr, p.stderr
    assert "'../nowhere.py', which is not a file of the repository" in p.stderr, p.stderr
    assert "still-here" not in p.stderr and "a-section-that-moved" not in p.stderr, p.stderr
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[moved](../README.md#a-section-that-moved)\n")
    p = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert p.returncode == 0, p.stderr
    assert 'href="moved/#a-section-that-moved"' in (tmp_path / "site" / "index.html").read_text()


# --------------------------------------------------------------------------- the pages and the links into them


def test_the_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move sections into docs/ and link them"


def test_every_page_is_in_the_nav() -> None:
    nav = nav_pages(mkdocs_config()["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(pages) - set(nav)) == [], "pages of docs/ that mkdocs.yml's nav leaves out"
    assert sorted(set(nav) - set(pages)) == [], "nav entries of mkdocs.yml with no page in docs/"
    assert len(nav) == len(set(nav)), "a page twice in the nav"


def test_every_docs_page_the_source_names_exists() -> None:
    """Help texts, error messages and docstrings name docs/PAGE.md[#ANCHOR]: the page and its heading exist."""
    named: dict[str, set[str]] = {}
    for src in sorted((REPO / "harness").rglob("*.py")):
        for m in SOURCE_NAMES_A_PAGE.finditer(src.read_text(encoding="utf-8")):
            named.setdefault(f"docs/{m.group(1)}", set()).add(f"{src.relative_to(REPO)}#{m.group(2) or ''}")
    assert "docs/verdicts.md" in named and "docs/your-own-project.md" in named  # the scan finds what is there
    dead = []
    for page, where in sorted(named.items()):
        path = REPO / page
        for ref in sorted(where):
            src, anchor = ref.split("#")
            if not path.is_file():
                dead.append(f"{src}: {page} is not a page")
            elif anchor and anchor not in page_anchors(path):
                dead.append(f"{src}: {page} has no heading #{anchor}")
    assert dead == []


def test_every_link_of_the_readme_leads_somewhere() -> None:
    """The README is read on GitHub, not built by mkdocs: its relative links are checked here."""
    dead = []
    for line in prose((REPO / "README.md").read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (REPO / path) if path else REPO / "README.md"
            if not file.exists():
                dead.append(target)
            elif anchor and anchor not in page_anchors(file):
                dead.append(target)
    assert dead == []


def test_every_numeric_switch_the_worker_records_is_in_the_verdicts_page_with_what_it_does() -> None:
    from harness.worker.envinfo import SWITCHES

    text = (DOCS / "verdicts.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z0-9_]+)`(?:, `[A-Z0-9_]+`)? \| (.+?) \|$", text, re.M)}
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", "\n".join(line for line in text.splitlines() if line.startswith("| `"))))
    assert set(SWITCHES) <= named, set(SWITCHES) - named
    assert len(rows) >= len(SWITCHES) - 1  # one row names two (oneDNN's switch under both its names)
    for name, what in SWITCHES.items():
        if name in rows:  # a row of its own: the same words as the source's
            assert rows[name].replace("`", "") == what, name
