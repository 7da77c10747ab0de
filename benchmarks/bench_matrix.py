"""Benchmark: a warm matrix (nothing changed, every cell reused) vs a cold one, and --jobs 2 vs --jobs 1.

Runs `harness matrix` as a user would (a subprocess per run), interleaved round by round so
that a machine's load drifts over both sides alike, and prints the medians and their ratios:

    python benchmarks/bench_matrix.py                      # the bundled MLP example, local backend
    python benchmarks/bench_matrix.py --rounds 3 --args "--threads 1 --determinism strict,default,warn"
    python benchmarks/bench_matrix.py --docker --args "--cells cpu-torch2.13 --wheelhouse wheelhouse"

Per round: a cold run with --jobs 1, a cold run with --jobs 2 (fresh results directories),
then a warm rerun of the second with --resume (it must build nothing and reuse every cell).
Not a test: it measures, and only fails when a warm run trained or built something.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "harness", "matrix", *args, "--no-progress"], capture_output=True,
                       text=True, env=env)
    return time.perf_counter() - t0, p


def check(p: subprocess.CompletedProcess[str], what: str) -> None:
    if p.returncode not in (0, 3):
        sys.exit(f"{what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


def builds(stderr: str) -> int:
    """Image builds a run did (the docker backend says `image CELL: built (...)`)."""
    return sum(1 for line in stderr.splitlines() if ": built (" in line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(REPO / "examples" / "optuna_best"), help="the optuna_best to run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--args", default="", help="more `harness matrix` arguments, e.g. \"--threads 1\"")
    ap.add_argument("--docker", action="store_true", help="the docker backend (default: local)")
    ns = ap.parse_args()
    base = [ns.bundle, "--backend", "docker" if ns.docker else "local", *shlex.split(ns.args)]
    times: dict[str, list[float]] = {"jobs1": [], "jobs2": [], "warm": []}
    cells = reused = 0
    with tempfile.TemporaryDirectory(prefix="bench-matrix-") as tmp:
        for i in range(ns.rounds):
            for jobs in ("1", "2"):
                out = Path(tmp) / f"r{i}-j{jobs}"
                t, p = run([*base, "--jobs", jobs, "--out", str(out)])
                check(p, f"cold --jobs {jobs}")
                times[f"jobs{jobs}"].append(t)
                print(f"round {i + 1}: cold --jobs {jobs}: {t:6.2f} s", flush=True)
            t, p = run([*base, "--jobs", "2", "--resume", str(out)])
            check(p, "warm")
            manifest = json.loads((out / "run.json").read_text())
            cells, reused, built = len(manifest["cells"]), len(manifest.get("reused", {})), builds(p.stderr)
            times["warm"].append(t)
            print(f"round {i + 1}: warm (--resume): {t:6.2f} s  ({reused}/{cells} cells reused, {built} builds)",
                  flush=True)
            if reused != cells or built:
                sys.exit(f"the warm run should reuse every cell and build nothing: {reused}/{cells} reused, {built} builds")
    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"median cold --jobs 1 : {med['jobs1']:6.2f} s")
    print(f"median cold --jobs 2 : {med['jobs2']:6.2f} s   ratio jobs2/jobs1 = {med['jobs2'] / med['jobs1']:.2f}")
    print(f"median warm          : {med['warm']:6.2f} s   ratio warm/cold(jobs2) = {med['warm'] / med['jobs2']:.3f}"
          f"   ({reused}/{cells} reused, 0 builds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
