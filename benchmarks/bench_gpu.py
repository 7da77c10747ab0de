"""The GPU checks, in one call: cells alone vs sharing a GPU (bitwise and time), cold vs warm, the 20-run matrix.

    PYTHONPATH=. python benchmarks/bench_gpu.py --out DIR [--device cuda] [--quick]

Made to run on a lent GPU machine in one short call (no Docker: the local backend). With
``--device cpu`` it runs the same steps on CPU cells, which is how it is tried before a
device is spent on it. Every step runs `harness matrix examples/optuna_best_conv` as a
separate process of this Python and keeps its `--json` under ``--out``:

  alone-cold   --determinism strict --repeats R --band 0 --band-seeds 0 --jobs 1 --cold
  alone-warm   the same, warm (forked from a warm server)
  shared-warm  the same with --jobs auto: after the first cell, cells share the GPU
  matrix20     --devices DEVICE,cpu --determinism strict,default --tf32 off,on --threads all
               --repeats 2 --band 8 --band-seeds 0 --trace (warm, --jobs auto): 8 ulp members and
               12 cells on a GPU host

It prints, and writes to ``summary.json`` / ``summary.md``:

- bitwise: every strict cell's best weights, alone and shared, cold and warm, have one digest;
- per-cell overhead beyond the retrain (launcher_wall_s - train_s), cold vs warm;
- wall time of each step, and shared / alone, warm / cold as ratios of this one run;
- how many cells shared the GPU (slot.gpu_shared) and what the cells measured (gpu_memory);
- the 20-run matrix's wall time (target 40 s on one H200) and strict vs default train_s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUNDLE = "examples/optuna_best_conv"


def harness(args: list[str], out: Path, log: Path) -> dict[str, Any]:
    """One harness command into ``out``; its wall time, exit status and records."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.run([sys.executable, "-m", "harness", *args, "--out", str(out), "--no-progress",
                            "--json", str(out) + ".json"], stdout=fh, stderr=subprocess.STDOUT, text=True,
                           env=env, cwd=REPO)
    took = time.perf_counter() - t0
    records = [json.loads(p_.read_text()) for p_ in sorted(out.glob("*/record.json"))]
    return {"args": args, "exit": p.returncode, "wall_s": took, "records": records}


def summary_of(step: dict[str, Any]) -> dict[str, Any]:
    recs = [r for r in step["records"] if r.get("status") == "ok"]
    over = [r["launcher_wall_s"] - r["train_s"] for r in recs if r.get("launcher_wall_s") and r.get("train_s")]
    rows = sorted(recs, key=lambda r: r.get("started_at") or "")
    return {
        "exit": step["exit"], "wall_s": round(step["wall_s"], 2), "cells": len(step["records"]), "ok": len(recs),
        "starts": sorted({str(r.get("start")) for r in recs}),
        "overhead_first_s": round(over[0], 3) if over else None,
        "overhead_median_s": round(statistics.median(over[1:] or over), 3) if over else None,
        "train_median_s": round(statistics.median(r["train_s"] for r in recs), 3) if recs else None,
        "gpu_shared_max": max(((r.get("slot") or {}).get("gpu_shared") or 0 for r in rows), default=0),
        "gpu_memory": next((r["gpu_memory"] for r in rows if r.get("gpu_memory")), None),
        "digests": sorted({r.get("weights_sha256") for r in recs}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cuda on the GPU machine; cpu to try the script here")
    ap.add_argument("--repeats", type=int, default=8, help="strict cells of the alone / shared steps")
    ap.add_argument("--quick", action="store_true", help="2 repeats, a 2-member band: a dry run of the script")
    ap.add_argument("--skip-matrix", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = 2 if a.quick else a.repeats
    host = {"python": platform.python_version(), "cores": os.cpu_count(), "load": os.getloadavg()[0]}
    try:
        host["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        host["nvidia_smi"] = None
    import torch

    host["torch"] = torch.__version__
    print(json.dumps(host), flush=True)
    base = ["matrix", BUNDLE, "--backend", "local", "--devices", a.device, "--determinism", "strict",
            "--threads", "1", "--tf32", "off", "--repeats", str(repeats), "--band", "0", "--band-seeds", "0"]
    steps = {
        "alone-cold": base + ["--jobs", "1", "--cold"],
        "alone-warm": base + ["--jobs", "1"],
        "shared-warm": base + ["--jobs", "auto"],
    }
    if not a.skip_matrix:
        devices = a.device if a.device == "cpu" else f"{a.device},cpu"
        steps["matrix20"] = ["matrix", BUNDLE, "--backend", "local", "--devices", devices,
                             "--determinism", "strict,default", "--tf32", "off,on", "--threads", "all",
                             "--repeats", "2", "--band", "2" if a.quick else "8", "--band-seeds", "0", "--trace",
                             "--jobs", "auto"]
    results: dict[str, Any] = {"host": host, "steps": {}}
    for name, args in steps.items():
        step = harness(args, out / name, out / f"{name}.log")
        s = results["steps"][name] = summary_of(step)
        if name == "matrix20":
            by_mode: dict[str, list[float]] = {}
            for r in step["records"]:
                if r.get("status") == "ok" and not r.get("band"):
                    key = f"{(r.get('spec') or {}).get('device')}-{(r.get('determinism') or {}).get('mode')}"
                    by_mode.setdefault(key, []).append(r["train_s"])
            s["train_s_by_device_mode"] = {k: round(statistics.median(v), 3) for k, v in sorted(by_mode.items())}
        print(f"{name}: {json.dumps(s)}", flush=True)
    st = results["steps"]
    digests = set()
    for name in ("alone-cold", "alone-warm", "shared-warm"):
        digests |= set(st[name]["digests"])
    results["bitwise_alone_vs_shared"] = len(digests) == 1 and all(
        st[n]["ok"] == repeats for n in ("alone-cold", "alone-warm", "shared-warm"))
    results["ratios"] = {
        "alone-warm / alone-cold": round(st["alone-warm"]["wall_s"] / st["alone-cold"]["wall_s"], 3),
        "shared-warm / alone-cold": round(st["shared-warm"]["wall_s"] / st["alone-cold"]["wall_s"], 3),
        "shared-warm / alone-warm": round(st["shared-warm"]["wall_s"] / st["alone-warm"]["wall_s"], 3),
    }
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    lines = [f"host: {host}", "", "| step | exit | cells | wall s | overhead first / median s | gpu_shared max | starts |",
             "|---|---|---|---|---|---|---|"]
    for name, s in st.items():
        lines.append(f"| {name} | {s['exit']} | {s['ok']}/{s['cells']} | {s['wall_s']} | {s['overhead_first_s']} / "
                     f"{s['overhead_median_s']} | {s['gpu_shared_max']} | {','.join(s['starts'])} |")
    lines += ["", f"bitwise, strict cells alone and shared, cold and warm: {results['bitwise_alone_vs_shared']} "
              f"({len(digests)} digest(s))", f"ratios: {results['ratios']}"]
    if "matrix20" in st:
        lines.append(f"matrix20 train_s medians by device-mode: {st['matrix20'].get('train_s_by_device_mode')}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
