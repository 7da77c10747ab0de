"""Side-by-side timings of one retrain of the bundled example, printed as ratios.

    python benchmarks/overhead.py [--rounds 3] [--image cpu-torch2.13 --wheelhouse wheelhouse --base-image IMG]

Runs, interleaved in each round so machine noise hits all alike:
  local strict, local default   (determinism cost)
  docker strict                 (container start overhead; only with --image)
and prints medians of the cell's wall time as the launcher saw it (process or
container start included) and inside the worker, plus ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one(args: list[str], out: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "harness", *args, "--out", str(out), "--no-progress"],
                       capture_output=True, text=True)
    recs = list(out.rglob("record.json"))
    if p.returncode not in (0, 3) or not recs:
        raise SystemExit(f"run failed ({p.returncode}): {p.stderr[-800:]}")
    return json.loads(recs[0].read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "examples" / "optuna_best"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image")
    ap.add_argument("--wheelhouse")
    ap.add_argument("--base-image")
    a = ap.parse_args()
    variants = {
        "local strict": ["run", a.bundle, "--device", "cpu", "--determinism", "strict"],
        "local default": ["run", a.bundle, "--device", "cpu", "--determinism", "default"],
    }
    if a.image:
        extra = (["--wheelhouse", a.wheelhouse] if a.wheelhouse else []) + (["--base-image", a.base_image] if a.base_image else [])
        variants["docker strict"] = ["run", a.bundle, "--image", a.image, *extra]
    times: dict[str, dict[str, list[float]]] = {k: {"launcher": [], "worker": [], "train": []} for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, args in variants.items():
                rec = one(args, Path(tmp) / f"{name.replace(' ', '-')}-{r}")
                times[name]["launcher"].append(rec["launcher_wall_s"])
                times[name]["worker"].append(rec["wall_s"])
                times[name]["train"].append(rec.get("train_s") or 0.0)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    print(f"{'variant':<15} {'launcher s':>11} {'worker s':>9} {'train s':>8}   (medians of {a.rounds})")
    for k, d in med.items():
        print(f"{k:<15} {d['launcher']:>11.2f} {d['worker']:>9.2f} {d['train']:>8.2f}")
    base = med["local strict"]
    # train_s is not comparable across modes: use_deterministic_algorithms imports
    # torch._dynamo before the timed loop, while default mode pays that import at
    # the first optimizer step, inside it. The worker's whole wall time is.
    print(f"strict / default worker time: {base['worker'] / med['local default']['worker']:.3f}")
    if "docker strict" in med:
        d = med["docker strict"]
        print(f"docker / local launcher time: {d['launcher'] / base['launcher']:.3f} "
              f"(container overhead {d['launcher'] - base['launcher']:+.2f} s per cell; "
              f"worker-internal {d['worker'] - base['worker']:+.2f} s)")


if __name__ == "__main__":
    main()
