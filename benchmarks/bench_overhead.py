"""A harness cell against a bare seed-style retrain of the same config, side by side.

    python benchmarks/bench_overhead.py [--bundle examples/optuna_best] [--epochs 400] [--rounds 3] [--threads 1]

Each round runs, interleaved, as separate processes of this same Python:
  bare          benchmarks/seed_retrain.py on a copy of the bundle with --epochs
  harness       python -m harness run COPY --device cpu --determinism strict --data-path loader
  harness fast  the same with --data-path fast
and prints medians of the wall time seen from outside (interpreter start to
exit), the ratios to bare, and the harness's fixed overhead in seconds (its
median minus bare's). The bare retrain's best weights are checked to be the
harness cell's, so both did the same work.
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

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "examples" / "optuna_best"))
    ap.add_argument("--epochs", type=int, default=400, help="epochs of the retrain (overrides the config)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1)")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bundle_copy(Path(a.bundle), Path(tmp) / Path(a.bundle).name, a.epochs)
        digests: dict[str, str] = {}
        runs = [0]

        def run(name: str, cmd: list[str], out: Path | None = None) -> None:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode not in (0, 3):  # 3: harness ran and judged the longer retrain drifted, as expected
                raise SystemExit(f"{name} failed ({p.returncode}): {p.stderr[-800:]}")
            if out is None:
                digests[name] = json.loads(p.stdout.strip().splitlines()[-1])["weights_sha256"]
            else:
                digests[name] = json.loads((out / "run" / "record.json").read_text())["weights_sha256"]

        def harness(path: str) -> float:
            runs[0] += 1
            out = Path(tmp) / f"h{runs[0]}"
            return timed(lambda: run("harness" if path == "loader" else "harness fast", [
                sys.executable, "-m", "harness", "run", str(bundle), "--device", "cpu", "--determinism", "strict",
                "--threads", str(a.threads), "--data-path", path, "--out", str(out), "--no-progress"], out))

        def bare() -> float:
            return timed(lambda: run("bare", [sys.executable, str(HERE / "seed_retrain.py"), str(bundle),
                                              "--threads", str(a.threads)]))

        print(f"{machine()}\n{Path(a.bundle).name} with {a.epochs} epochs, {a.threads} thread(s), {a.rounds} rounds")
        times = interleaved({"bare": bare, "harness": lambda: harness("loader"),
                             "harness fast": lambda: harness("fast")}, a.rounds)
    med = {k: median(v) for k, v in times.items()}
    b = med["bare"]
    print(f"{'variant':<13} {'median s':>9} {'/ bare':>7}")
    for k, v in med.items():
        print(f"{k:<13} {v:>9.2f} {v / b:>7.3f}")
    print(f"harness fixed overhead: {med['harness'] - b:+.2f} s per cell "
          f"(fast path: {med['harness fast'] - b:+.2f} s)")
    same = digests["bare"] == digests["harness"] == digests["harness fast"]
    print(f"same best weights (bare, harness, harness fast): {'yes' if same else 'NO: ' + json.dumps(digests)}")


if __name__ == "__main__":
    main()
