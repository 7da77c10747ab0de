"""MkDocs hooks (``hooks:`` in mkdocs.yml): links from a page of docs/ to files of the repository outside it.

A page of docs/ reads the same on GitHub and on the site, so it links with relative ``.md`` paths, and
some of its links leave docs/ (``../benchmarks/README.md``, ``../examples/results/report.png``). GitHub
follows them; the site holds docs/ only, so for the site each such link is rewritten:

- ``../README.md#SECTION`` where SECTION is a heading of a page of docs/ (a section that moved from the
  README into docs/): to that page and heading;
- any other file that is not Markdown (an image, an HTML page): the file is copied into the site under
  ``_repo/`` (its path in the repository kept) and linked there, so the image shows;
- any other Markdown file (``benchmarks/README.md``): to the file on ``repo_url`` when mkdocs.yml sets
  one, else its path in the repository, as code.

A link to a path that is not in the repository, or to a README section that neither the README nor any
page of docs/ has, is a warning, so ``mkdocs build --strict`` fails on it as on any dead link.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger(f"mkdocs.plugins.{__name__}")

LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
COPIED = "_repo"  # where the site keeps the repository files a page links to


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading (and the site, through pymdownx.slugs in mkdocs.yml)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text).strip().lower().replace(" ", "-")


def prose_lines(markdown: str) -> list[tuple[bool, str]]:
    """Each line of ``markdown`` with whether it is prose (outside a fenced code block)."""
    out, fenced = [], False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line):
            fenced = not fenced
            out.append((False, line))
        else:
            out.append((not fenced, line))
    return out


def anchors(markdown: str) -> set[str]:
    """The anchors of the headings of ``markdown``."""
    found = set()
    for prose, line in prose_lines(markdown):
        m = HEADING.match(line) if prose else None
        if m:
            found.add(slug(m.group(1)))
    return found


def _outside(page_uri: str, target: str, docs: Path, repo: Path) -> tuple[str, str] | None:
    """(the repository path, the anchor) of a relative link that leaves docs/; None for any other link."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
        return None
    path, _, anchor = target.partition("#")
    resolved = (docs / posixpath.dirname(page_uri) / path).resolve()
    if resolved == docs or docs in resolved.parents:
        return None
    try:
        return resolved.relative_to(repo).as_posix(), anchor
    except ValueError:
        return "", anchor  # outside the repository: never a file the site could have


SECTIONS: dict[str, str] = {}  # this build's headings: anchor -> the page of docs/ that has it (set by on_files)


def on_files(files: Files, config: Any) -> Files:
    """Copy into the site every file that is not Markdown and that a page links to outside docs/."""
    docs = Path(config["docs_dir"]).resolve()
    repo = Path(config["config_file_path"]).resolve().parent
    SECTIONS.clear()
    copied = set()
    for page in sorted(docs.rglob("*.md")):
        uri = page.relative_to(docs).as_posix()
        text = page.read_text(encoding="utf-8")
        for a in anchors(text):
            SECTIONS.setdefault(a, uri)
        for prose, line in prose_lines(text):
            for m in LINK.finditer(line) if prose else ():
                rel = (_outside(uri, m["target"], docs, repo) or ("", ""))[0]
                if rel and rel not in copied and (repo / rel).is_file() and not rel.endswith(".md"):
                    copied.add(rel)
                    files.append(File.generated(config, f"{COPIED}/{rel}", abs_src_path=str(repo / rel)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite this page's links that leave docs/ for the site (see the module's docstring)."""
    docs = Path(config["docs_dir"]).resolve()
    repo = Path(config["config_file_path"]).resolve().parent
    uri = page.file.src_uri
    here = posixpath.dirname(uri)

    def rewrite(m: re.Match[str]) -> str:
        where = _outside(uri, m["target"], docs, repo)
        if where is None:
            return m[0]
        rel, anchor = where
        src = repo / rel if rel else None
        if src is None or not src.exists():
            log.warning("Doc file '%s' links to '%s', which is not a file of the repository", uri, m["target"])
            return m[0]
        if rel == "README.md" and anchor and anchor not in anchors(src.read_text(encoding="utf-8")):
            if anchor not in SECTIONS:
                log.warning("Doc file '%s' links to '%s': no heading '#%s' in README.md or in docs/", uri,
                            m["target"], anchor)
                return m[0]
            to = posixpath.relpath(SECTIONS[anchor], here or ".")
            return f"{m['bang']}[{m['text']}]({to}#{anchor})"
        if src.suffix != ".md" and src.is_file():
            to = posixpath.relpath(f"{COPIED}/{rel}", here or ".")
            return f"{m['bang']}[{m['text']}]({to}{'#' + anchor if anchor else ''})"
        if config.get("repo_url"):
            url = f"{config['repo_url'].rstrip('/')}/blob/HEAD/{rel}{'#' + anchor if anchor else ''}"
            return f"{m['bang']}[{m['text']}]({url})"
        named = m["text"].strip("` ")
        return f"`{rel}`" if named == rel else f"{m['text']} (`{rel}`)"

    out = []
    for prose, line in prose_lines(markdown):
        out.append(LINK.sub(rewrite, line) if prose else line)
    return "".join(out)


ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(<code>)~?")


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """Docstrings cross-reference in Sphinx's roles (``:class:`RunSpec```); the site shows the name alone."""
    return ROLE.sub(r"\1", html)
