"""The processes of this machine as the local backend sees them, from ``/proc`` (Linux; nothing elsewhere).

Shared by the launcher (harness.backends.local), which stops what a cell started, and the warm server
(harness.backends.warm_server), which does the same for its children when the launcher is gone.
"""

from __future__ import annotations

import os
from typing import Iterable


def process_table() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, start time in clock ticks), from /proc; {} where there is none."""
    table: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read()
            fields = raw[raw.rindex(b")") + 2:].split()
            if fields[0] in (b"Z", b"X"):
                continue  # already dead: nothing to stop, and its pid is not a parent of anything
            table[int(name)] = (int(fields[1]), int(fields[19]))
        except (OSError, ValueError, IndexError):
            continue
    return table


def carrying(token: bytes, table: Iterable[int]) -> list[int]:
    """The processes whose environment holds ``token`` (the ones this user may read)."""
    found = []
    for pid in table:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if b"\0" + token + b"\0" in b"\0" + env + b"\0":
            found.append(pid)
    return found
