"""Record fixtures built through the typed dataclasses, so a change of shape breaks the tests."""

from __future__ import annotations

from harness.record import Env, ErrorInfo, ResultRecord, Status


def record(cell: str, r2: float = 0.9, loss: float = 0.1, sha: str = "w1", status: Status = Status.OK,
           recorded: bool = True, started_at: str | None = None, message: str = "boom") -> ResultRecord:
    """A record of one cell: one target ``a``; the trial recorded R² 0.9, loss 0.1 and weights ``w1``."""
    if status is not Status.OK:
        kind = {Status.SKIPPED: "skipped", Status.INTERRUPTED: "interrupted"}.get(status, "run")
        return ResultRecord(cell=cell, status=status, error=ErrorInfo(kind=kind, message=message), started_at=started_at)
    return ResultRecord(
        cell=cell, status=Status.OK, weights_sha256=sha, started_at=started_at,
        metrics={"retrained": {"val_loss": loss, "val": {"r2": {"a": r2}, "mse": {"a": 0.2}, "mae": {"a": 0.3}},
                               "test": {"r2": {"a": r2 - 0.1}, "mse": {"a": 0.2}, "mae": {"a": 0.3}}},
                 "archived": {"val_loss": 0.1, "val": {"r2": {"a": 0.9}}}},
        recorded={"value": 0.1, "r2": {"a": 0.9}, "weights_sha256": "w1"} if recorded else None,
    )


def with_env(rec: ResultRecord, torch: str, cuda: str | None) -> ResultRecord:
    rec.env = Env(torch=torch, cuda=cuda, cudnn="90100" if cuda else None, device="NVIDIA H200" if cuda else "cpu",
                  python="3.11.7", threads=4, driver="580.65.06" if cuda else None)
    rec.determinism = {"mode": "strict", "deterministic_algorithms": True, "cudnn_deterministic": True,
                       "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0"}
    rec.wall_s = 1.5
    return rec
