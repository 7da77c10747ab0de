"""Cold vs warm workers, side by side: a cell's fixed overhead, and the README's main command.

    python benchmarks/bench_warm.py [--repeats 4] [--rounds 2] [--skip-readme]
    python benchmarks/bench_warm.py --docker cpu-torch2.13 --wheelhouse wheelhouse \
        --base-image local/debian-py:bookworm [--repeats 6] [--rounds 3] [--epochs 150]

``--docker CELL``: the overhead matrix in that image cell's containers, cold (each container
started at its cell's turn) and warm (started ahead, importing while the cell before it runs;
harness.backends.docker_ahead). The README command is local and is skipped. ``--epochs N``: the
overhead matrix on a copy of the example with that many epochs (an import is hidden only behind a
retrain at least as long as it, or on cores no cell uses).

Each round runs, interleaved (cold, warm, cold, warm), as separate `harness` processes of this Python:

  overhead   harness matrix examples/optuna_best --backend local --threads 1 --determinism strict
             --repeats N --band 0 --band-seeds 0 --jobs 1          (with --cold, and without: warm)
             each cell's overhead beyond the retrain: launcher_wall_s - train_s (the launcher's view, start
             included) and wall_s - train_s (the worker's own); warm splits the first cell (it waits for
             its server's imports) from the cells after it (forked from the ready server)
  readme     harness matrix examples/optuna_best_conv --backend local --isa native,baseline --band 4
             (with --cold, and without): the wall time from outside, and warm / cold

It prints medians, and checks that each cell's best weights are the same cold and warm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import REPO, bundle_copy, machine, median  # noqa: E402


def harness(args: list[str], out: Path) -> tuple[float, dict[str, dict]]:
    """Run one harness command into ``out``; its wall time and its records by cell."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "harness", *args, "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    took = time.perf_counter() - t0
    if p.returncode not in (0, 3):
        raise SystemExit(f"harness {' '.join(args)} failed ({p.returncode}): {p.stderr[-1500:]}")
    records = {}
    for path in sorted(out.glob("*/record.json")):
        rec = json.loads(path.read_text())
        records[rec["cell"]] = rec
    return took, records


def overheads(records: dict[str, dict]) -> list[tuple[float, float, str]]:
    """Per cell in start order: (launcher_wall_s - train_s, wall_s - train_s, start)."""
    rows = sorted(records.values(), key=lambda r: r["started_at"])
    return [(r["launcher_wall_s"] - r["train_s"], r["wall_s"] - r["train_s"], r.get("start") or "?") for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4, help="cells of the overhead matrix (repeats of one cell)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-readme", action="store_true", help="only the per-cell overhead")
    ap.add_argument("--docker", metavar="CELL", help="the overhead matrix in this image cell's containers")
    ap.add_argument("--wheelhouse", help="with --docker: the wheelhouse its image builds from")
    ap.add_argument("--base-image", help="with --docker: the base image its image builds on")
    ap.add_argument("--epochs", type=int, help="the overhead matrix's retrain with this many epochs")
    a = ap.parse_args()
    print(f"{machine()}; load average {os.getloadavg()[0]:.1f} at start")
    where = ["--backend", "local"]
    if a.docker:
        where = ["--cells", a.docker, *(["--wheelhouse", a.wheelhouse] if a.wheelhouse else []),
                 *(["--base-image", a.base_image] if a.base_image else [])]
        a.skip_readme = True
    example = "examples/optuna_best"
    if a.epochs:
        example = str(bundle_copy(REPO / example, Path(tempfile.mkdtemp()) / "optuna_best", a.epochs))
    over = ["matrix", example, *where, "--threads", "1", "--determinism", "strict",
            "--repeats", str(a.repeats), "--band", "0", "--band-seeds", "0", "--jobs", "1"]
    readme = ["matrix", "examples/optuna_best_conv", "--backend", "local", "--isa", "native,baseline", "--band", "4"]
    cells: dict[str, list[tuple[float, float, str]]] = {"cold": [], "warm first": [], "warm next": []}
    walls: dict[str, list[float]] = {"cold": [], "warm": []}
    runs: dict[str, list[float]] = {"cold": [], "warm": []}  # the overhead matrix's wall time, from outside
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            got = {}
            for start in ("cold", "warm"):
                took, recs = harness(over + (["--cold"] if start == "cold" else []), Path(tmp) / f"o{r}{start}")
                runs[start].append(took)
                got[start] = recs
                rows = overheads(recs)
                assert all(s == start for *_, s in rows), rows
                if start == "cold":
                    cells["cold"] += rows
                else:
                    cells["warm first"] += rows[:1]
                    cells["warm next"] += rows[1:]
            same &= all(got["cold"][c]["weights_sha256"] == got["warm"][c]["weights_sha256"] for c in got["cold"])
            line = ", ".join(f"{k} {statistics.median(x[0] for x in v[-a.repeats:]):.2f}s" for k, v in cells.items() if v)
            print(f"  round {r + 1}/{a.rounds}: overhead per cell (launcher): {line}", flush=True)
            if a.skip_readme:
                continue
            got = {}
            for start in ("cold", "warm"):
                took, recs = harness(readme + (["--cold"] if start == "cold" else []), Path(tmp) / f"r{r}{start}")
                walls[start].append(took)
                got[start] = recs
            same &= all(got["cold"][c]["weights_sha256"] == got["warm"][c]["weights_sha256"] for c in got["cold"])
            warm_n = sum(1 for rec in got["warm"].values() if rec.get("start") == "warm")
            print(f"  round {r + 1}/{a.rounds}: README command cold {walls['cold'][-1]:.1f}s, warm "
                  f"{walls['warm'][-1]:.1f}s ({warm_n}/{len(got['warm'])} cells warm)", flush=True)
    print(f"\nper-cell overhead beyond the retrain (median over {a.rounds} rounds):")
    print(f"{'':<12} {'cells':>5} {'launcher_wall_s - train_s':>26} {'wall_s - train_s':>17}")
    for k, v in cells.items():
        print(f"{k:<12} {len(v):>5} {median([x[0] for x in v]):>25.2f}s {median([x[1] for x in v]):>16.2f}s")
    c, w = median(runs["cold"]), median(runs["warm"])
    print(f"\noverhead matrix ({' '.join(over)}): cold {c:.1f}s, warm {w:.1f}s: warm / cold = {w / c:.2f}x")
    if walls["cold"]:
        c, w = median(walls["cold"]), median(walls["warm"])
        print(f"\nREADME command ({' '.join(readme)}):")
        print(f"cold {c:.1f}s, warm {w:.1f}s: warm / cold = {w / c:.2f}x")
    print(f"same best weights cold and warm, cell by cell: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
