"""Strict against default determinism for one harness cell, side by side.

    python benchmarks/bench_determinism.py [--bundle examples/optuna_best] [--epochs 200] [--rounds 3] [--threads 1]
                                           [--start cold|warm]

Each round runs `harness run COPY --device cpu --determinism strict` and then
`... default`, as separate processes (the launcher sets strict's environment
before the worker starts), on a copy of the bundle with --epochs. Prints medians
of the wall time seen from outside, of the worker's own wall time (record.json
wall_s) and of the timed training (train_s), and the ratios strict / default.

train_s is comparable across modes since every mode calls
torch.use_deterministic_algorithms while applying its switches: that call imports
torch._dynamo, which torch.optim otherwise imports when the first optimizer is
built, inside the timed training. Before, a cold default-mode cell paid that
import in train_s: 6.29 s against strict's 0.64 s on a 16-core H200 host, at
the same wall time per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import REPO, bundle_copy, interleaved, machine, median, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "examples" / "optuna_best"))
    ap.add_argument("--epochs", type=int, default=200, help="epochs of the retrain (overrides the config)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-path", default="loader", choices=("loader", "fast"))
    ap.add_argument("--start", default="cold", choices=("cold", "warm"),
                    help="cold: a fresh interpreter per cell (--cold); warm: forked from a warm server")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    worker: dict[str, list[float]] = {"strict": [], "default": []}
    train: dict[str, list[float]] = {"strict": [], "default": []}
    digests: dict[str, set[str]] = {"strict": set(), "default": set()}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bundle_copy(Path(a.bundle), Path(tmp) / Path(a.bundle).name, a.epochs)
        n = [0]

        def cell(mode: str) -> float:
            n[0] += 1
            out = Path(tmp) / f"o{n[0]}"

            def go() -> None:
                p = subprocess.run([sys.executable, "-m", "harness", "run", str(bundle), "--device", "cpu",
                                    "--determinism", mode, "--threads", str(a.threads), "--data-path", a.data_path,
                                    "--out", str(out), "--no-progress", *(["--cold"] if a.start == "cold" else [])],
                                   capture_output=True, text=True, env=env)
                if p.returncode not in (0, 3):
                    raise SystemExit(f"{mode} failed ({p.returncode}): {p.stderr[-800:]}")
            seconds = timed(go)
            rec = json.loads((out / "run" / "record.json").read_text())
            worker[mode].append(rec["wall_s"])
            train[mode].append(rec["train_s"])
            if rec.get("start", "cold") != a.start:
                raise SystemExit(f"{mode} cell started {rec.get('start')}, not {a.start}: {rec.get('start_reason')}")
            digests[mode].add(rec["weights_sha256"])
            return seconds

        print(f"{machine()}\n{Path(a.bundle).name} with {a.epochs} epochs, {a.threads} thread(s), "
              f"--data-path {a.data_path}, {a.start} start, {a.rounds} rounds")
        times = interleaved({"strict": lambda: cell("strict"), "default": lambda: cell("default")}, a.rounds)
    s, d = median(times["strict"]), median(times["default"])
    ws, wd = median(worker["strict"]), median(worker["default"])
    ts, td = median(train["strict"]), median(train["default"])
    print(f"{'mode':<8} {'cell s':>8} {'worker s':>9} {'train s':>8}   (medians of {a.rounds})")
    print(f"{'strict':<8} {s:>8.2f} {ws:>9.2f} {ts:>8.2f}\n{'default':<8} {d:>8.2f} {wd:>9.2f} {td:>8.2f}")
    print(f"strict / default: {s / d:.3f} (cell), {ws / wd:.3f} (worker), {ts / td:.3f} (train)")
    print(f"same weights in both modes: {'yes' if digests['strict'] == digests['default'] and len(digests['strict']) == 1 else 'no'}")


if __name__ == "__main__":
    main()
