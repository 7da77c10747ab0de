"""Everything that can be checked before any cell trains, in the CLI process.

Nothing here executes content from the bundle: YAML is safe-loaded, the data
is never loaded here: its shapes are read from the ``.npy`` headers inside the
``.npz``, and what its members would expand to is bounded from those headers and the
zip's directory (:func:`harness.worker.data.check_expansion`: zip bombs, crafted sizes,
``$HARNESS_DATA_LIMIT``); the worker loads the arrays, with ``allow_pickle=False``. Weights
are loaded with ``weights_only=True``.
The scaler (a pickle) is left to the worker, which loads it before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .bundle import Bundle, expected_data_digests
from .errors import InputError
from .worker.data import read_layout, require_exists, sha256_path


def data_mismatches(bundle: Bundle, digest: str) -> list[str]:
    """One loud line per recorded digest that the data file does not match (pure)."""
    return [f"DATA MISMATCH: {source} is {want[:12]}..., but {bundle.data.resolved} hashes to {digest[:12]}...; "
            "this is not the data the trial was trained on"
            for source, want in expected_data_digests(bundle).items() if want != digest]


@dataclass
class Preflight:
    data_sha256: str | None  # None: a custom trainer without data.path finds its own data
    shape: tuple[int, ...] | None  # None with a custom trainer: its data is its own, only hashed
    n_features: int | None
    targets: list[str] | None
    warnings: list[str]
    layout: Any = None  # the reference trainer's data layout, for check_weights when it was deferred


def check(bundle: Bundle, weights: bool = True) -> Preflight:
    """Everything checkable before training; ``weights=False`` leaves the weights to :func:`check_weights`
    (which imports torch), for a run that may reuse every cell (``--resume``) and need not train at all."""
    data = None
    if bundle.trainer is None:
        data = read_layout(bundle.data)  # the reference trainer's .npz, checked from its headers
    elif bundle.data.resolved is not None:
        require_exists(bundle.data.resolved, "the trainer's code directory, as trainer.cwd: project says"
                       if bundle.trainer.cwd == "project" else "the optuna_best directory")
    digest = sha256_path(bundle.data.resolved) if bundle.data.resolved is not None else None
    warnings = data_mismatches(bundle, digest) if digest is not None else []
    if digest is None:
        warnings.append("config.yaml has no data.path: the trainer finds its own data, which is not hashed or checked")
    from .bundle import unknown_config_keys, unknown_trainer_keys

    warnings += unknown_config_keys(bundle.config) if bundle.trainer is None else unknown_trainer_keys(bundle.config)
    if bundle.recorded is None:
        warnings.append("no trial_info.yaml: the runs go ahead, but there is nothing recorded to compare with")
    if bundle.scaler_path is not None:
        with open(bundle.scaler_path, "rb") as fh:
            if not fh.read(1):
                raise InputError(bundle.scaler_path, "is empty", hint="re-export it with joblib.dump(scaler, path), or remove it to refit")
    if data is not None and weights:
        check_weights(bundle, data)
    if data is None:
        return Preflight(data_sha256=digest, shape=None, n_features=None, targets=None, warnings=warnings)
    return Preflight(data_sha256=digest, shape=data.raw_shape, n_features=data.n_features,
                     targets=data.target_names, warnings=warnings, layout=data)


def check_weights(bundle: Bundle, data: Any) -> None:
    """The archived weights load into the model config.yaml describes (weights_only=True); one line when not."""
    from .worker.model import build, load_checked

    net = build(data.n_features, data.n_targets, bundle.model, len(data.keep))
    for path in (bundle.best_weights, bundle.last_weights):
        if path is not None:
            load_checked(path, net)
