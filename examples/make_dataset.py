"""Generate the bundled example dataset: noisy multichannel signals, three regression targets.

Deterministic (numpy's PCG64 with a fixed seed). The committed file's sha256
is recorded in optuna_best/config.yaml; rerunning this script with the same
numpy major version rewrites the same arrays (the .npz container itself is
rewritten only when asked, since zip headers carry a timestamp).

    python examples/make_dataset.py [--out examples/data/signals.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

N, CHANNELS, TIME = 400, 4, 64
TARGETS = ["amplitude", "frequency", "coupling"]
CHANNEL_NAMES = ["ch0", "ch1", "ch2", "noise"]


def generate(seed: int = 20261129) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, TIME, endpoint=False)
    amp = rng.uniform(0.5, 2.0, N)
    freq = rng.uniform(1.0, 6.0, N)
    phase = rng.uniform(0, 2 * np.pi, N)
    coupling = rng.uniform(-1.0, 1.0, N)
    base = amp[:, None] * np.sin(2 * np.pi * freq[:, None] * t[None, :] + phase[:, None])
    X = np.empty((N, CHANNELS, TIME), dtype=np.float32)
    X[:, 0] = base + 0.1 * rng.standard_normal((N, TIME))
    X[:, 1] = amp[:, None] * np.cos(2 * np.pi * freq[:, None] * t[None, :] + phase[:, None]) + 0.1 * rng.standard_normal((N, TIME))
    X[:, 2] = coupling[:, None] * base + 0.2 * rng.standard_normal((N, TIME))
    X[:, 3] = rng.standard_normal((N, TIME))  # carries nothing: the config excludes it
    y = np.stack([amp, freq, coupling], axis=1).astype(np.float32)
    return {"X": X, "y": y, "target_names": np.array(TARGETS), "channel_names": np.array(CHANNEL_NAMES)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data" / "signals.npz"))
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **generate())
    print(out)


if __name__ == "__main__":
    main()
