"""Does a strict CPU retrain give the same numbers in every fresh process? Counted, run by run.

    python benchmarks/repeat_processes.py [--bundle examples/optuna_best] [--runs 40] [--epochs 1]
                                          [--threads N] [--env NAME=VALUE ...]

Each run is a new Python process that trains the bundle's reference model for --epochs with the
worker's own training loop, in strict mode (no runner, no warm server, no container), and prints
epoch 1's training loss and the digest of the last weights. The script prints every run with its
clock time, then the distinct results and how often each came. --env sets a variable in every run
(MKL_CBWR=AVX2, OMP_NUM_THREADS=1, ...), to try what moves the result.

On a 2-core Intel Xeon (AVX-512) with the MLP example, 244 such runs gave a second result 5 times,
all within seven minutes, and never in the 200 runs after (docs/verdicts.md, "Strict mode ...").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(bundle: str, epochs: int, threads: int | None) -> None:
    """One run, in this process: strict switches, the reference training loop, one JSON line."""
    import dataclasses

    import torch

    from harness.bundle import load_bundle
    from harness.worker import determinism
    from harness.worker.data import prepare
    from harness.worker.model import state_sha256
    from harness.worker.retrain import scaled_targets
    from harness.worker.train import split_indices, train_reference

    b = load_bundle(bundle)
    determinism.apply("strict", tf32=False, threads=threads)
    data = prepare(b.data)
    split = split_indices(len(data.X), b.data.split, b.training.data_split_seed)
    y_scaled = scaled_targets(b, data, split)[3]
    determinism.set_seed(b.training.seed)
    _net, out = train_reference(data, split, y_scaled, b.model, dataclasses.replace(b.training, epochs=epochs),
                                torch.device("cpu"))
    print(json.dumps({"train_loss": out.history[0]["train_loss"], "weights": state_sha256(out.last_state)[:12],
                      "threads": torch.get_num_threads()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "examples" / "optuna_best"))
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set in every run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.bundle, args.epochs, args.threads)
        return 0
    env = dict(os.environ, PYTHONHASHSEED="0", CUBLAS_WORKSPACE_CONFIG=":4096:8",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for pair in args.env:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            ap.error(f"--env {pair!r}: write NAME=VALUE")
        env[name] = value
    cmd = [sys.executable, __file__, "--child", "--bundle", args.bundle, "--epochs", str(args.epochs)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    seen: collections.Counter[tuple[float, str]] = collections.Counter()
    for i in range(1, args.runs + 1):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            print(p.stdout + p.stderr, file=sys.stderr)
            return 1
        got = json.loads(p.stdout.strip().splitlines()[-1])
        key = (got["train_loss"], got["weights"])
        new = "" if key in seen or not seen else "   <- another result"
        seen[key] += 1
        print(f"{time.strftime('%H:%M:%S')}  run {i:3d}  epoch-1 train loss {got['train_loss']!r}  weights "
              f"{got['weights']}  threads {got['threads']}{new}", flush=True)
    print(f"{len(seen)} distinct result(s) in {args.runs} runs:")
    for (loss, weights), n in seen.most_common():
        print(f"  {n:4d} x  train loss {loss!r}  weights {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
