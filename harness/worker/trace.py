"""``--trace``: one JSON line per training step, written where the run trains.

``OUT/trace.jsonl`` starts with a header line and then holds, per optimizer step::

    {"schema": "harness.trace/1", "source": "reference" | "ctx.on_step" | "hooks", "digest": "blake2b-128", ...}
    {"epoch": 1, "step": 1, "loss": "0x1.4a6a06p+0", "state": "<digest of every tensor of the model>"}
    {"tensors_at": 1, "tensors": {"blocks.0.linear.weight": "<digest>", ...}}

``loss`` is ``float.hex`` (bit-exact); ``state`` digests the model's whole state dict
(parameters and buffers, by name, dtype, shape and bytes) after the optimizer step.
Per-tensor digests (``tensors_at``) are written at the first :data:`TENSOR_EVERY_START`
steps of each doubling phase: every step for the first 16 steps, every 2nd step for the
next 32, every 4th for the next 64, ... and at the last step, so a run of S steps holds
about ``16 * log2(S / 16 + 1) + 1`` of them (81 for 450 steps, 241 for a million). The
whole file stops growing at :data:`TRACE_MAX_BYTES`: a last ``{"truncated": true}`` line
says where, and a reader refuses anything larger.

The hashing copies the model's tensors to the host once a step: a tracing run is slower.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, TextIO

TRACE_SCHEMA = "harness.trace/1"
# harness.safeio.CellPaths.TRACE, spelled here: this module is also copied, with no package around it,
# beside a trainer command's sitecustomize (harness.worker.trainer_cmd.HOOKS_FILES), so it imports no harness module
TRACE_FILE = "trace.jsonl"
TRACE_MAX_BYTES = 64 * 1024 * 1024  # a trace is refused beyond this; the writer stops just before it
TENSOR_EVERY_START = 16  # per-tensor checkpoints per doubling phase
DIGEST = "blake2b-128"


def tensor_digest(t: Any) -> str:
    """A tensor's dtype, shape and bytes, as 32 hex digits."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, t)
    return h.hexdigest()


def _feed(h: Any, t: Any) -> None:
    import torch

    flat = t.detach().reshape(-1).cpu().contiguous()
    h.update(f"{flat.dtype}:{tuple(t.shape)}:".encode())
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.dtype != torch.bool else flat.numpy().tobytes())


def state_digests(model: Any) -> tuple[str, dict[str, str]]:
    """The whole state's digest and each tensor's, by name (sorted)."""
    state = model.state_dict()
    whole = hashlib.blake2b(digest_size=16)
    per: dict[str, str] = {}
    for name in sorted(state):
        d = tensor_digest(state[name])
        per[name] = d
        whole.update(name.encode() + b"\0" + d.encode())
    return whole.hexdigest(), per


def is_checkpoint(step: int) -> bool:
    """Whether ``step`` (1-based) carries per-tensor digests: 16 per phase, the interval doubling per phase."""
    start, every = 0, 1
    while True:
        end = start + TENSOR_EVERY_START * every
        if step <= end:
            return (step - start) % every == 0
        start, every = end, every * 2


class TraceWriter:
    """Writes ``trace.jsonl`` step by step; :meth:`close` adds the last step's per-tensor digests."""

    def __init__(self, path: Path, source: str, *, max_bytes: int = TRACE_MAX_BYTES, exclusive: bool = False) -> None:
        self.path = path
        how = os.O_EXCL if exclusive else os.O_TRUNC  # exclusive: FileExistsError when another process writes it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | how | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        self.fh: TextIO | None = os.fdopen(fd, "w", encoding="utf-8")
        self.max_bytes = max_bytes
        self.written = 0
        self.steps = 0
        self.last: tuple[int, dict[str, str]] | None = None  # the last step's per-tensor digests, not yet written
        self.truncated = False
        self._line({"schema": TRACE_SCHEMA, "source": source, "digest": DIGEST, "loss": "float.hex",
                    "tensors_every": f"doubling after each {TENSOR_EVERY_START} checkpoints, and the last step"})

    def _line(self, obj: dict[str, Any]) -> bool:
        if self.fh is None:
            return False
        text = json.dumps(obj, sort_keys=True) + "\n"
        if self.written + len(text) + 64 > self.max_bytes:
            self.fh.write(json.dumps({"truncated": True, "at_step": self.steps}) + "\n")
            self.truncated = True
            self.fh.close()
            self.fh = None
            return False
        self.fh.write(text)
        self.written += len(text)
        return True

    def step(self, epoch: int | None, loss: float, model: Any) -> None:
        self.steps += 1
        whole, per = state_digests(model)
        self._line({"epoch": epoch, "step": self.steps, "loss": float(loss).hex(), "state": whole})
        if is_checkpoint(self.steps):
            self._line({"tensors_at": self.steps, "tensors": per})
            self.last = None
        else:
            self.last = (self.steps, per)

    def close(self) -> dict[str, Any]:
        """Finish the file; returns the record's account of it."""
        if self.last is not None:
            self._line({"tensors_at": self.last[0], "tensors": self.last[1]})
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        return {"file": TRACE_FILE, "schema": TRACE_SCHEMA, "steps": self.steps, "truncated": self.truncated}


def no_trace(why: str) -> dict[str, Any]:
    """The record's account of a --trace run that left no trace."""
    return {"file": None, "schema": TRACE_SCHEMA, "steps": 0, "truncated": False, "why": why}
