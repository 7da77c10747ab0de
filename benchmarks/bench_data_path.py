"""The reference trainer's fast data path against the DataLoader path, per epoch, side by side.

    python benchmarks/bench_data_path.py [--bundle examples/optuna_best] [--epochs 60] [--rounds 5]

In one process, interleaved (loader, fast, loader, fast, ...): the same
train_reference call on each path, and the weights of both checked identical.
Prints medians of seconds per epoch (training loop, validation included), the
ratio, and what the fast path's run-time proof costs once per run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import REPO, bundle_copy, interleaved, machine, median, timed  # noqa: E402
from harness.bundle import load_bundle  # noqa: E402
from harness.worker import feed  # noqa: E402
from harness.worker import model as model_mod  # noqa: E402
from harness.worker.data import prepare  # noqa: E402
from harness.worker.determinism import apply, set_seed  # noqa: E402
from harness.worker.train import split_indices, train_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "examples" / "optuna_best"))
    ap.add_argument("--epochs", type=int, default=60, help="epochs per timed run (overrides the config)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--determinism", default="default", help="strict or default (the switches set in-process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    a = ap.parse_args()
    apply(a.determinism, tf32=False, threads=a.threads or None)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(bundle_copy(Path(a.bundle), Path(tmp) / "b", a.epochs))
    data = prepare(bundle.data)
    spec = replace(bundle.training, epochs=a.epochs)
    split = split_indices(len(data.X), bundle.data.split, spec.data_split_seed)
    y = data.y  # unscaled: the timing does not depend on it
    digests: dict[str, set[str]] = {"loader": set(), "fast": set()}

    def one(path: str) -> float:
        def go() -> None:
            set_seed(spec.seed)
            _, out = train_reference(data, split, y, bundle.model, spec, torch.device("cpu"), data_path=path)
            assert out.extra["data_path"]["effective"] == path, out.extra
            digests[path].add(model_mod.state_sha256(out.last_state))
        return timed(go) / a.epochs

    print(f"{machine()}\n{Path(a.bundle).name}: {len(split.train)} train samples, batch {spec.batch_size}, "
          f"{a.epochs} epochs, determinism {a.determinism}, {torch.get_num_threads()} thread(s), {a.rounds} rounds")
    one("loader"), one("fast")  # warm-up: imports, first-call allocations
    times = interleaved({"loader": lambda: one("loader"), "fast": lambda: one("fast")}, a.rounds)
    proof = median([timed(lambda: feed.prove(len(split.train), spec.batch_size, spec.seed)) for _ in range(5)])
    lo, fa = median(times["loader"]), median(times["fast"])
    same = digests["loader"] == digests["fast"] and len(digests["fast"]) == 1
    print(f"loader {lo * 1000:.2f} ms/epoch   fast {fa * 1000:.2f} ms/epoch   (medians of {a.rounds})")
    print(f"loader / fast: {lo / fa:.2f}x   proof (once per run): {proof * 1000:.1f} ms   "
          f"weights identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
