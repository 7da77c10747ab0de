"""How much disk the harness's images take, and which of them a prune may remove (pure).

The engine reports each image's size and the part of it shared with other images
(:class:`~harness.docker_engine.ImageUsage`). Images of one cell share every layer but
the harness source, so an image's own ("unique") bytes are what removing it frees, and
the total of a set counts each shared layer once (:func:`union_size`). ``harness images
list`` shows these; ``harness images prune`` removes stale tags and dangling images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from .build import LABEL_CELL, REPOSITORY

_CONTENT_TAG = re.compile(rf"^{REPOSITORY}:(?P<cell>.+)-(?P<hash>[0-9a-f]{{12}})$")

CURRENT, STALE, DANGLING, ALIAS, UNKNOWN = "current", "stale", "dangling", "alias", "unknown"


@dataclass(frozen=True)
class ImageRow:
    """One harness image as ``images list`` shows it."""

    id: str
    tags: tuple[str, ...]
    cell: str
    size: int
    unique: int | None
    state: str  # current | stale | dangling | alias | unknown


def human_bytes(n: int | None) -> str:
    """Bytes in the engine's own (decimal) units: ``6.2 GB``, ``2.3 MB``, ``0 B``; ``?`` when unknown."""
    if n is None or n < 0:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.{1 if size < 100 else 0}f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def content_tag_cell(tag: str) -> str | None:
    """The cell of a content tag ``harness:<cell>-<12 hex>``; None for any other tag."""
    m = _CONTENT_TAG.match(tag)
    return m.group("cell") if m else None


def is_harness_image(tags: Iterable[str], labels: Mapping[str, str]) -> bool:
    """Tagged into the harness repository, or built by it (its cell label)."""
    return LABEL_CELL in labels or any(t.partition(":")[0] == REPOSITORY for t in tags)


def image_state(tags: Iterable[str], current: set[str], known_cells: set[str]) -> str:
    """``current`` (a tag the current sources produce), ``stale`` (a content tag of a cell whose current
    tag is known, none current), ``dangling`` (no tag), ``alias`` (only ``harness:<cell>``), else ``unknown``."""
    tags = list(tags)
    if not tags:
        return DANGLING
    if any(t in current for t in tags):
        return CURRENT
    cells = [c for c in (content_tag_cell(t) for t in tags) if c is not None]
    if cells and all(c in known_cells for c in cells):
        return STALE
    if not cells and all(t.partition(":")[0] == REPOSITORY for t in tags):
        return ALIAS
    return UNKNOWN


def union_size(layers: Iterable[Iterable[tuple[str, int]]]) -> int:
    """Bytes of every distinct layer of some images, each shared layer counted once.

    ``layers``: per image, ``(key, bytes)`` per layer, equal keys naming one layer
    (:meth:`~harness.docker_engine.Engine.layers`).
    """
    seen: dict[str, int] = {}
    for image in layers:
        for key, size in image:
            seen.setdefault(key, size)
    return sum(seen.values())
