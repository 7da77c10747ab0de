"""What PyTorch's process-wide hooks (harness.worker.hooks) cost a training step, side by side.

    python benchmarks/bench_hooks.py [--bundle examples/optuna_best_conv] [--epochs 20] [--rounds 5] [--device cpu]

In one process, interleaved, the same train_reference call (the Conv1d example by default):
  none         no hook installed
  perturb      a band member's hooks: one ulp moved before the first forward; they remove themselves
               after the first optimizer step (the optimizer is seen being built: no search; the
               fallback search, for an optimizer built before the hooks, is timed apart)
  hooks only   the trace's hooks (autograd.backward wrapped, an optimizer step post-hook) with a writer
               that writes nothing: what the hook machinery itself costs per step
  trace hooks  --trace through the hooks (digests every tensor after every step)
  trace ctx    --trace through an explicit ctx.on_step, as a trainer that calls it gets it
Prints the median seconds per training step of each and its ratio to `none` (to `trace ctx` for
`trace hooks`). The perturbed run's weights are checked equal to an explicit ctx.perturb's.
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
from harness.worker.data import prepare  # noqa: E402
from harness.worker.determinism import apply  # noqa: E402
from harness.worker.hooks import TorchHooks  # noqa: E402
from harness.worker.perturb import Perturber  # noqa: E402
from harness.worker.trace import TraceWriter  # noqa: E402
from harness.worker.train import split_indices, train_reference  # noqa: E402


class _Null:
    """A trace writer that writes nothing: the hooks' own cost, without the digests."""

    steps = 0

    def step(self, *_a: object) -> None:
        self.steps += 1

    def close(self) -> dict:
        return {"steps": self.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "examples" / "optuna_best_conv"))
    ap.add_argument("--epochs", type=int, default=20, help="epochs per timed run (overrides the config)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    a = ap.parse_args()
    apply("strict", tf32=False, threads=a.threads or None)
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(bundle_copy(Path(a.bundle), Path(tmp) / "b", a.epochs))
        data = prepare(bundle.data)
        spec = replace(bundle.training, epochs=a.epochs)
        split = split_indices(len(data.X), bundle.data.split, spec.data_split_seed)
        steps = a.epochs * -(-len(split.train) // spec.batch_size)
        states: dict[str, dict] = {}

        def train(name: str, *, hooks: TorchHooks | None = None, perturb=None, on_step=None) -> float:
            def go() -> None:
                if hooks is not None:
                    hooks.install()
                try:
                    _, out = train_reference(data, split, data.y, bundle.model, spec, device, perturb=perturb,
                                             on_step=on_step, data_path="fast")
                finally:
                    if hooks is not None:
                        hooks.close()
                states[name] = out.last_state
            return timed(go) / steps

        scanned: list[bool] = []

        def perturb() -> float:
            hooks = TorchHooks(perturber=Perturber({"kind": "ulp", "seed": 1}))
            try:
                return train("perturb", hooks=hooks)
            finally:
                scanned.append(hooks.scanned)

        def hooks_only() -> float:
            hooks = TorchHooks(trace=Path(tmp) / "null.jsonl")
            hooks.trace_exclusive = True  # opens nothing: the null writer below stands in
            hooks.tracer = _Null()  # type: ignore[assignment]
            return train("hooks only", hooks=hooks)

        def trace_ctx() -> float:
            writer = TraceWriter(Path(tmp) / "ctx.jsonl", "ctx.on_step")
            try:
                return train("trace ctx", on_step=lambda e, s, loss, m: writer.step(None, loss, m))
            finally:
                writer.close()

        variants = {
            "none": lambda: train("none"),
            "perturb": perturb,
            "hooks only": hooks_only,
            "trace hooks": lambda: train("trace hooks", hooks=TorchHooks(trace=Path(tmp) / "hooks.jsonl")),
            "trace ctx": trace_ctx,
        }
        print(f"{machine()}; {Path(a.bundle).name}, {a.epochs} epochs = {steps} steps per run, device {a.device}")
        times = interleaved(variants, a.rounds, unit="ms")
        explicit = Perturber({"kind": "ulp", "seed": 1})
        train("explicit", perturb=lambda m: explicit(m))
    same = all(torch.equal(states["explicit"][k], states["perturb"][k]) for k in states["perturb"])
    print(f"\nper training step, median of {a.rounds} rounds; the ratio is the median of each round's own ratio:")
    for name, values in times.items():
        against = "trace ctx" if name == "trace hooks" else "none"
        ratio = median([v / r for v, r in zip(values, times[against])])
        print(f"  {name:12s} {median(values) * 1e3:8.3f} ms   {ratio:5.3f}x {against}")
    print(f"the hooks' perturbation trains the same weights as ctx.perturb: {same}")
    import gc

    from harness.worker.hooks import _optimizers

    scans = []
    for _ in range(5):
        scans.append(timed(_optimizers))
    print(f"the perturbation's hooks searched the process for optimizers in {sum(scanned)} of {len(scanned)} runs; "
          f"per step after the first: nothing installed")
    print(f"that search, the fallback for an optimizer built before the hooks: {median(scans) * 1e3:.1f} ms "
          f"({len(gc.get_objects())} objects in this process)")


if __name__ == "__main__":
    main()
