"""Bring your own trainer: the contract between the harness and a user's code.

A user names ``module:function`` (``trainer.entrypoint`` in config.yaml, or
``--trainer``) and the directory holding the module (``trainer.code_dir`` or
``--trainer-path``). Before calling it the harness has already started the
process with ``CUBLAS_WORKSPACE_CONFIG``/``PYTHONHASHSEED`` set, applied the
determinism switches and called ``set_seed(training.seed)``. The function is
called as::

    result = function(config: dict, ctx: harness.trainer_api.TrainerContext)

and returns a mapping with any of:

* ``predictions``: ``{"val": (y_true, y_pred), "test": (...)}`` in original
  target units; the harness computes R²/MSE/MAE from them itself (preferred)
* ``metrics``: ``{"val": {"r2": {name: v}, "mse": {...}, "mae": {...}}, "test": ...}``
  when the trainer computes its own
* ``val_loss``: the objective value, comparable with trial_info.yaml's ``value``
* ``state_dict`` (or ``model``): the best weights, digested into ``weights_sha256``
  and saved to the results directory
* ``target_names``: names for prediction columns (default: the dataset's)
* ``extra``: anything JSON-serialisable, stored as is
"""

from __future__ import annotations

import importlib
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, RunFailed


@dataclass
class TrainerContext:
    """What a custom trainer gets besides its config."""

    config: dict[str, Any]
    seed: int
    device: str
    bundle_dir: str
    data_path: str
    out_dir: str
    scaler: Any = None  # the archived target scaler, loaded by the harness, or None
    _progress: Callable[[int, int, dict[str, float]], None] | None = field(default=None, repr=False)
    _data_spec: Any = field(default=None, repr=False)

    def load_data(self) -> Any:
        """The dataset after the config's preprocessing (harness.data.Dataset)."""
        from .data import prepare

        return prepare(self._data_spec)

    def split(self, n: int) -> Any:
        """The seeded ``random_split`` indices the reference trainer uses."""
        from .train import split_indices

        return split_indices(n, self._data_spec.split, self.seed)

    def train_loader(self, dataset: Any, batch_size: int) -> Any:
        """A DataLoader shuffled by a generator seeded with ``training.seed``, num_workers=0."""
        from .train import make_train_loader

        return make_train_loader(dataset, batch_size, self.seed)

    def progress(self, epoch: int, epochs: int, **values: float) -> None:
        """Report an epoch; drives the progress bar and the record's history."""
        if self._progress is not None:
            self._progress(epoch, epochs, {"epoch": epoch, **{k: float(v) for k, v in values.items()}})


def resolve(entrypoint: str, code_dir: str | None) -> Callable[..., Any]:
    """Import ``module:function`` with ``code_dir`` first on sys.path."""
    module_name, _, func_name = entrypoint.partition(":")
    if code_dir:
        sys.path.insert(0, str(Path(code_dir)))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f" from {code_dir}" if code_dir else ""
        raise InputError("trainer", f"cannot import {module_name!r}{where} ({exc.__class__.__name__}: {exc})",
                         hint="set trainer.code_dir / --trainer-path to the folder holding the module") from None
    except Exception as exc:  # noqa: BLE001 - user code failed at import time
        tb = traceback.format_exc(limit=-3)
        raise RunFailed(f"trainer module {module_name!r} raised on import: {exc.__class__.__name__}: {exc}\n{tb}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InputError("trainer", f"{module_name!r} has no function {func_name!r}", hint="name an existing function as module:function")
    return func
