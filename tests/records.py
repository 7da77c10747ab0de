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


def member(kind: str, i: int, r2: float, loss: float = 0.1, applied: bool = True, mse: float = 0.2,
           mae: float = 0.3, seed: int | None = None) -> ResultRecord:
    """A band member: ``kind`` "ulp" (perturbed, unless not ``applied``) or "seed" (seed 42 + i)."""
    rec = record(f"band-{kind}-{i}", r2=r2, loss=loss, sha=f"band{kind}{i}")
    rec.metrics["retrained"]["val"]["mse"] = {"a": mse}
    rec.metrics["retrained"]["val"]["mae"] = {"a": mae}
    rec.band = {"kind": kind, "member": i, "seed": seed if seed is not None else 42 + (i if kind == "seed" else 0)}
    rec.labels = {"band": kind, "member": i, "band_of": "base"}
    if kind == "ulp":
        rec.perturbation = ({"kind": "ulp", "seed": i, "applied": True, "tensor": "w", "index": i,
                             "old": "0x1p-1", "new": "0x1.0000000000001p-1", "direction": "+inf"} if applied
                            else {"kind": "ulp", "seed": i, "applied": False,
                                  "skipped": "the trainer never called ctx.perturb(model)"})
    return rec


def ulp_band(center: float = 0.9, width: float = 1e-4, n: int = 11) -> list[ResultRecord]:
    """n ulp members whose R² spans exactly ``width`` around ``center`` (the other metrics identical)."""
    return [member("ulp", i + 1, center - width / 2 + width * i / (n - 1)) for i in range(n)]


def seed_band(r2s: list[float], losses: list[float] | None = None) -> list[ResultRecord]:
    """Seed members with these R² (and val losses; default: 0.1 + 0.5·(0.9 − R²), so both move together)."""
    losses = losses or [0.1 + 0.5 * (0.9 - r) for r in r2s]
    return [member("seed", i + 1, r, loss=l, mse=0.2 + (0.9 - r), mae=0.3 + 0.5 * (0.9 - r))
            for i, (r, l) in enumerate(zip(r2s, losses))]
