"""Bring your own trainer: the contract between the harness and a user's code.

A user names ``module:function`` (``trainer.entrypoint`` in config.yaml, or
``--trainer``) and the folders holding it (``trainer.code_dir`` or the repeatable
``--trainer-path``; each goes on sys.path, in order). Before calling it the harness
has already started the process with ``CUBLAS_WORKSPACE_CONFIG``/``PYTHONHASHSEED``
set, applied the determinism switches and called ``set_seed(training.seed)``.

The function is called with the arguments its signature names (:data:`ARGUMENTS`:
``config``, ``optuna_best_dir``, ``data_path``, ``device``, ``seed``, ``out_dir``,
``ctx`` and their synonyms; see :func:`call`), so a project's own
``retrain(config, optuna_best_dir, data_path=None)`` is named as it is. A function
whose first two positional parameters have other names is called the original way,
``function(config, ctx)``.

It returns a mapping; :func:`normalise_result` validates it and puts it into the
record's one shape:

* ``predictions``: ``{"val": (y_true, y_pred), "test": (...)}`` in original
  target units; the harness computes R²/MSE/MAE from them itself (preferred)
* metrics, under ``metrics`` or at the top level, nested per split or flat, per
  target or one number over all targets (stored under target ``"*"``); see
  :func:`normalise_metrics`
* ``val_loss`` (or ``loss``): the objective value, comparable with trial_info.yaml's ``value``
* ``state_dict`` (or ``model``): the best weights, compared tensor by tensor with the
  bundle's weights/best.pt, digested into ``weights_sha256`` and saved
* ``weights_sha256``: the trainer's own digest, compared with trial_info's as its convention
* ``target_names``: names for prediction columns
* ``extra``: anything JSON-serialisable, stored as is
* ``n_samples``, ``split_indices``, ``y_train`` (or ``train_targets``): the seed's
  checks, as ``ctx.declare_length``/``ctx.report_split``/``ctx.check_scaler`` take them

Two optional hooks in config.yaml's ``trainer`` section evaluate the *archived*
weights before the trainer runs: ``model_fn`` (builds the model, called like a
trainer; :meth:`TrainerContext.build_model`) and ``predict`` (given that model with
weights/best.pt loaded strictly, returns predictions or metrics as a trainer does).
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import HarnessError, InputError, RunFailed
from .seed_checks import Checks, as_indices, custom_scaler_check, declared_length


@dataclass
class TrainerContext:
    """What a custom trainer gets besides its config.

    Besides the seeded helpers, it carries the seed's checks a trainer can feed
    (each optional, each recorded; see docs/your-own-project.md, "Bring your own trainer"):
    :meth:`split` / :meth:`declare_length` / :meth:`report_split` for the split,
    :meth:`check_scaler` for the scaler refit. :attr:`model_fn` is config.yaml's
    ``trainer.model_fn`` hook (None without one); :meth:`build_model` calls it.
    """

    config: dict[str, Any]
    seed: int
    device: str
    bundle_dir: str
    data_path: str
    out_dir: str
    scaler: Any = None  # the archived target scaler (target_scaler.joblib) as loaded by the harness, or None
    model_fn: Callable[..., Any] | None = None  # trainer.model_fn: builds the nn.Module from the config
    model_fn_name: str | None = None  # its module:function, for messages
    _progress: Callable[[int, int, dict[str, float]], None] | None = field(default=None, repr=False)
    _data_spec: Any = field(default=None, repr=False)
    _scaler_reference: Any = field(default=None, repr=False)  # a copy of the archived scaler the trainer cannot touch
    _checks: Checks = field(default_factory=Checks, repr=False)
    _perturber: Any = field(default=None, repr=False)  # harness.worker.perturb.Perturber of this run
    _split_seed: int | None = field(default=None, repr=False)  # the split's seed, when not ``seed`` (a seed band member)
    _tracer: Any = field(default=None, repr=False)  # harness.worker.trace.TraceWriter once ctx.on_step traces
    _trace_path: str | None = field(default=None, repr=False)  # where the trace goes under --trace, else None
    _hooks: Any = field(default=None, repr=False)  # harness.worker.hooks.TorchHooks of this run

    def on_step(self, model: Any, loss: Any, epoch: int | None = None) -> None:
        """Optional: call after each optimizer step with the model and that step's loss (a tensor or a float).

        Under ``--trace`` it writes the step's loss bits and the digests of the model's
        tensors to ``trace.jsonl`` (what ``harness diverge`` reads); otherwise it does nothing.
        A trainer that never calls it is traced through PyTorch's process-wide hooks
        (:mod:`harness.worker.hooks`); the first call takes the trace over from them.
        """
        if self._tracer is None:
            if self._trace_path is None:
                return
            from .trace import TraceWriter

            if self._hooks is not None:
                self._hooks.yield_trace()
            self._tracer = TraceWriter(Path(self._trace_path), "ctx.on_step")
        value = loss.detach().item() if hasattr(loss, "detach") else loss
        self._tracer.step(epoch, float(value), model)

    def perturb(self, model: Any) -> Any:
        """Optional: call right after building (and seeding) your model, before training: returns the model.

        In an ulp band member (``harness band``, ``--band N``) it moves exactly one initial
        parameter value by one ulp, chosen by a private RNG (the global RNGs are untouched);
        in every other run it does nothing. A trainer that never calls it is perturbed by
        PyTorch's process-wide hooks before its model's first forward (:mod:`harness.worker.hooks`).
        """
        if self._perturber is not None:
            self._perturber(model)
        return model

    def perturbation(self) -> Any:
        """What :meth:`perturb` did, for the record (None when this run asked for no perturbation)."""
        if self._perturber is None:
            return None
        return self._perturber.record("the trainer never called ctx.perturb(model) after building its model; "
                                      "an unperturbed run is not an ulp band member")

    def load_data(self) -> Any:
        """The dataset after the config's preprocessing (harness.data.Dataset)."""
        from .data import prepare

        return prepare(self._data_spec)

    def split(self, n: int) -> Any:
        """The seeded ``random_split`` indices the reference trainer uses (the trial's, in a seed band member too);
        the harness records what it handed out."""
        from .train import split_indices

        n = declared_length(n, "ctx.split(n)")
        s = split_indices(n, self._data_spec.split, self.seed if self._split_seed is None else self._split_seed)
        self._checks.handed = (n, [list(s.train), list(s.val), list(s.test)])
        return s

    def declare_length(self, n: int) -> None:
        """The dataset's number of samples: the harness re-derives the seeded split from ``data.split`` and the seed."""
        self._checks.declared_n = declared_length(n, "ctx.declare_length(n)")

    def report_split(self, train: Any, val: Any, test: Any) -> None:
        """The split the trainer used (indices, arrays or ``Subset`` objects), compared with the seeded split."""
        self._checks.reported = [as_indices(v, f"ctx.report_split {name}")
                                 for name, v in (("train", train), ("val", val), ("test", test))]

    def check_scaler(self, y_train: Any) -> dict[str, Any]:
        """Refit a clone of the archived scaler on these train targets (original units) and compare; returns the record."""
        self._checks.scaler = custom_scaler_check(self._scaler_reference, y_train, "ctx.check_scaler")
        return dict(self._checks.scaler)

    def build_model(self) -> Any:
        """A fresh model from ``trainer.model_fn`` (called like a trainer: by its parameter names)."""
        if self.model_fn is None:
            raise InputError("config.yaml", "trainer.model_fn is not set, so the harness cannot build the model",
                             hint="add `trainer: {model_fn: mypkg.model:build}` returning the torch.nn.Module")
        what = f"trainer.model_fn {self.model_fn_name}"
        model = call_hook(self.model_fn, self, what)
        if not (callable(getattr(model, "state_dict", None)) and callable(getattr(model, "load_state_dict", None))):
            raise InputError("config.yaml", f"{what} returned {type(model).__name__}, not a torch.nn.Module",
                             hint="return the model (an nn.Module) built from the config, untrained")
        return model

    def train_loader(self, dataset: Any, batch_size: int) -> Any:
        """A DataLoader shuffled by a generator seeded with ``training.seed``, num_workers=0."""
        from .train import make_train_loader

        return make_train_loader(dataset, batch_size, self.seed)

    def progress(self, epoch: int, epochs: int, **values: float) -> None:
        """Report an epoch; drives the progress bar and the record's history."""
        if self._progress is not None:
            self._progress(epoch, epochs, {"epoch": epoch, **{k: float(v) for k, v in values.items()}})


def resolve(entrypoint: str, code_dirs: str | list[str] | tuple[str, ...] | None,
            where: str = "trainer") -> Callable[..., Any]:
    """Import ``module:function`` with the ``code_dirs`` first on sys.path, in the order given.

    ``where`` names the setting in messages (``trainer``, ``config.yaml trainer.predict``).
    """
    module_name, _, func_name = entrypoint.partition(":")
    dirs = [code_dirs] if isinstance(code_dirs, str) else list(code_dirs or [])
    for d in reversed(dirs):
        sys.path.insert(0, str(Path(d)))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(where, f"cannot import {module_name!r} ({exc.__class__.__name__}: {exc})",
                         hint=_import_hint(module_name, dirs)) from None
    except Exception as exc:  # noqa: BLE001 - user code failed at import time
        tb = traceback.format_exc(limit=-3)
        failure = RunFailed(f"{where} module {module_name!r} raised on import: {exc.__class__.__name__}: {exc}\n{tb}")
        failure.missing_file = isinstance(exc, FileNotFoundError)  # type: ignore[attr-defined]
        raise failure from None
    func = getattr(module, func_name, None)
    if not callable(func):
        close = closest_callables(module, func_name)
        guess = f" (did you mean {module_name}:{close[0]}?)" if close else ""
        raise InputError(where, f"{module_name!r} has no function {func_name!r}{guess}",
                         hint="name an existing function as module:function")
    return func


def closest_callables(module: Any, name: str) -> list[str]:
    """The public callable of ``module`` (a function or class it defines or imports) whose name is closest
    to ``name`` (a misspelt ``trian``), as a list of at most one; empty when none is close. Only names are
    read: nothing is called."""
    import difflib

    public = [k for k, v in vars(module).items() if not k.startswith("_") and callable(v)]
    return difflib.get_close_matches(name, public, n=1)


def _import_hint(module_name: str, dirs: list[str]) -> str:
    """Which folders were searched, and where the module's top-level package is when it is one level off."""
    top = module_name.split(".", 1)[0]
    searched = ", ".join(dirs) if dirs else "none given"
    hint = f"searched the --trainer-path folders ({searched}) and sys.path"
    for d in dirs:
        p = Path(d)
        if p.name == top and ((p / "__init__.py").is_file() or (p / (module_name.split(".", 1)[-1].replace(".", "/") + ".py")).is_file()):
            return hint + f"; {p} is the package {top!r} itself: pass its parent, --trainer-path {p.parent}"
        for child in (p.iterdir() if p.is_dir() else ()):
            if child.is_dir() and ((child / top).is_dir() or (child / f"{top}.py").is_file()):
                return hint + f"; {top!r} is in {child}: pass --trainer-path {child}"
    return hint + "; give --trainer-path the folder that holds the module's top-level package (repeatable)"


# --------------------------------------------------------------------------- calling convention

#: The parameter names a trainer function may ask for, and what each receives.
ARGUMENTS: dict[str, str] = {
    "config": "config", "cfg": "config", "conf": "config",
    "optuna_best_dir": "bundle_dir", "bundle_dir": "bundle_dir", "bundle": "bundle_dir",
    "data_path": "data_path", "data": "data_path",
    "device": "device", "seed": "seed", "out_dir": "out_dir",
    "ctx": "ctx", "context": "ctx",
}


#: The names under which trainer.predict receives the model (besides :data:`ARGUMENTS`).
MODEL_ARGUMENTS = ("model", "net", "module")

_UNSET: Any = object()


def _value(what: str, ctx: TrainerContext) -> Any:
    return ctx if what == "ctx" else getattr(ctx, what)


def call(func: Callable[..., Any], ctx: TrainerContext, extra: Mapping[str, Any] | None = None,
         first: Any = _UNSET) -> Any:
    """Call a trainer (or a hook) with the arguments its signature names (see :data:`ARGUMENTS`).

    ``extra`` fills further names (trainer.predict's ``model``). Without ``first``, a
    function whose first two positional parameters both have other names keeps the
    original ``func(config, ctx)`` convention; with ``first``, a first positional
    parameter of another name receives it (``predict(m, config)`` gets the model).
    """
    extra = dict(extra or {})
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return func(ctx.config, ctx) if first is _UNSET else func(first, ctx)
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    known = set(ARGUMENTS) | set(extra)
    if first is _UNSET and len(positional) >= 2 and positional[0].name not in known and positional[1].name not in known:
        return func(ctx.config, ctx)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in known or (first is not _UNSET and positional and p is positional[0]):
            if p.name in extra:
                value = extra[p.name]
            elif p.name in ARGUMENTS:
                value = _value(ARGUMENTS[p.name], ctx)
            else:
                value = first
            if p.kind is p.POSITIONAL_ONLY:
                args.append(value)
            else:
                kwargs[p.name] = value
        elif p.default is p.empty:
            name = getattr(func, "__qualname__", repr(func))
            raise InputError("trainer", f"{name}() requires parameter {p.name!r}, which the harness cannot fill; "
                             f"accepted names: {', '.join([*ARGUMENTS, *extra])}",
                             hint="rename it, give it a default, or wrap the function")
        elif p.kind is p.POSITIONAL_ONLY:
            break  # a defaulted positional-only parameter we cannot fill: leave it and the rest to their defaults
    return func(*args, **kwargs)


def call_hook(func: Callable[..., Any], ctx: TrainerContext, what: str, extra: Mapping[str, Any] | None = None,
              first: Any = _UNSET) -> Any:
    """:func:`call`, with what the user's code raises turned into one failure naming ``what``, its traceback kept."""
    try:
        return call(func, ctx, extra, first)
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code failed
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        failure = RunFailed(f"{what} raised {exc.__class__.__name__}: {exc}")
        failure.user_traceback = tb  # type: ignore[attr-defined]
        # a file it looked for is not where it looked: the worker adds the working directory to the reason
        failure.missing_file = isinstance(exc, FileNotFoundError)  # type: ignore[attr-defined]
        raise failure from None


def _few(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_strict(model: Any, state: Mapping[str, Any], what: str, weights: str) -> None:
    """``model.load_state_dict(state, strict=True)``; a state that does not fit is one line naming the hook."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if tuple(own[k].shape) != tuple(state[k].shape)]
    problems = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"] if unexpected else []) \
        + ([f"shape {_few(shapes)}"] if shapes else [])
    if not problems:
        try:
            model.load_state_dict(state, strict=True)
            return
        except Exception as exc:  # noqa: BLE001 - anything else load_state_dict refuses
            problems = [str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__]
    raise InputError("config.yaml", f"{what} builds a model whose state does not fit {weights}: {'; '.join(problems)}",
                     hint="make it build the architecture the archived weights were saved from")


def as_hook_result(result: Any) -> Any:
    """trainer.predict may return ``{split: (y_true, y_pred)}`` bare: that is ``{"predictions": ...}``."""
    if (isinstance(result, Mapping) and result
            and all(str(k).lower() in SPLITS for k in result)
            and all(isinstance(v, (tuple, list)) and len(v) == 2 for v in result.values())):
        return {"predictions": result}
    return result


# --------------------------------------------------------------------------- what the trainer returns

AGGREGATE = "*"  # the target name under which one number over all targets is stored
SPLITS = {"val": "val", "valid": "val", "validation": "val", "test": "test", "train": "train"}
FAMILIES = {"r2": "r2", "r2_score": "r2", "mse": "mse", "mae": "mae"}
LOSSES = ("val_loss", "loss", "best_val_loss", "objective")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or isinstance(v, (str, bytes)):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    item = getattr(v, "item", None)
    if callable(item) and (getattr(v, "ndim", None) == 0 or getattr(v, "shape", None) == ()):
        try:
            out = item()
        except Exception:  # noqa: BLE001
            return None
        return float(out) if isinstance(out, numbers.Real) and not isinstance(out, bool) else None
    return None


def _family_values(value: Any, where: str, entry: str) -> dict[str, float]:
    n = _number(value)
    if n is not None:
        return {AGGREGATE: n}
    if isinstance(value, Mapping):
        out = {}
        for target, v in value.items():
            nv = _number(v)
            if nv is None:
                raise InputError("trainer", f"{entry} returned {where}.{target} = {v!r}, not a number",
                                 hint="return numbers (one per target, or one for all targets)")
            out[str(target)] = nv
        return out
    raise InputError("trainer", f"{entry} returned {where} as {type(value).__name__}, not a number or a mapping of targets",
                     hint=f"return e.g. {where.split('.')[-1]}: 0.93 or {{target: 0.93}}")


def _put(metrics: dict[str, Any], split: str, family: str, values: dict[str, float], where: str, entry: str) -> None:
    fams = metrics.setdefault(split, {})
    if family in fams:
        raise InputError("trainer", f"{entry} returned {family} for the {split} split twice (at {where} too); "
                         "the metric is ambiguous", hint="return each metric once")
    fams[family] = values


def _flat_key(key: str) -> tuple[str, str] | None:
    """``r2`` -> (val, r2); ``test_MAE`` -> (test, mae); None when not a metric name."""
    low = key.lower()
    if low in FAMILIES:
        return "val", FAMILIES[low]
    for prefix, split in SPLITS.items():
        if low.startswith(prefix + "_") and low[len(prefix) + 1:] in FAMILIES:
            return split, FAMILIES[low[len(prefix) + 1:]]
    return None


def normalise_metrics(source: Mapping[str, Any], entry: str, explicit: bool) -> dict[str, Any]:
    """Metrics in the shapes people return, in the record's one shape.

    ``{"val_loss": x, "val": {"r2": {target: v}, "mse": ..., "mae": ...}, "test": ...}``:
    an aggregate number is stored under the target name ``"*"``. Accepted: nested
    per split (``val``/``valid``/``validation``, ``test``, ``train``) or flat
    (``r2``, ``val_r2``, ``test_mae`` ...; unprefixed is the validation split),
    per-target mappings or numbers, ``r2``/``R2``/``r2_score``, ``mse``/``MSE``,
    ``mae``/``MAE``, and ``val_loss``/``loss``/``best_val_loss``. A known key
    with a value of another shape is refused, naming the key.
    """
    out: dict[str, Any] = {}
    for key, value in source.items():
        key = str(key)
        low = key.lower()
        if low in LOSSES:
            n = _number(value)
            if n is None:
                raise InputError("trainer", f"{entry} returned {key} = {value!r}, not a number", hint="return the loss as a float")
            if "val_loss" in out:
                raise InputError("trainer", f"{entry} returned the validation loss twice (at {key} too)",
                                 hint="return it once, as val_loss")
            out["val_loss"] = n
        elif low in SPLITS and isinstance(value, Mapping):
            split = SPLITS[low]
            for mkey, mval in value.items():
                mlow = str(mkey).lower()
                if mlow in FAMILIES:
                    _put(out, split, FAMILIES[mlow], _family_values(mval, f"{key}.{mkey}", entry), f"{key}.{mkey}", entry)
                elif mlow == "loss" and split == "val":
                    n = _number(mval)
                    if n is None:
                        raise InputError("trainer", f"{entry} returned {key}.{mkey} = {mval!r}, not a number")
                    out.setdefault("val_loss", n)
        elif low in SPLITS and explicit and value is not None:
            raise InputError("trainer", f"{entry} returned metrics.{key} as {type(value).__name__}, not a mapping of metrics",
                             hint=f"return e.g. {key}: {{r2: 0.93, mse: 0.01}}")
        else:
            flat = _flat_key(key)
            if flat is not None:
                _put(out, flat[0], flat[1], _family_values(value, key, entry), key, entry)
    return out


def normalise_result(result: Any, entry: str) -> dict[str, Any]:
    """Validate what a trainer returned and put it in one shape, before anything is compared.

    Returns ``{"metrics", "state", "user_digest", "extra", "split_indices", "n_samples",
    "y_train"}``: metrics from
    ``predictions`` (computed here, per target), else from ``metrics``, else from
    the top level of the returned mapping (see :func:`normalise_metrics`).
    """
    import numpy as np

    from .metrics import per_target

    if not isinstance(result, Mapping):
        raise RunFailed(f"trainer {entry} returned {type(result).__name__}; the contract asks for a dict "
                        "(see docs/your-own-project.md#bring-your-own-trainer)")
    metrics: dict[str, Any] = {}
    names = result.get("target_names")
    predictions = result.get("predictions") or {}
    if not isinstance(predictions, Mapping):
        raise InputError("trainer", f"{entry} returned predictions as {type(predictions).__name__}, not {{split: (y_true, y_pred)}}")
    for split_name, pair in predictions.items():
        try:
            y_true, y_pred = (np.asarray(a) for a in pair)
            cols = list(names) if names else [f"target_{i}" for i in range(1 if y_true.ndim == 1 else y_true.shape[1])]
            metrics[SPLITS.get(str(split_name).lower(), str(split_name))] = per_target(y_true, y_pred, cols)
        except (TypeError, ValueError) as exc:
            raise InputError("trainer", f"{entry} returned predictions.{split_name} that cannot be scored ({exc})",
                             hint="return (y_true, y_pred) arrays of the same shape") from None
    explicit = result.get("metrics")
    if explicit is not None and not isinstance(explicit, Mapping):
        raise InputError("trainer", f"{entry} returned metrics as {type(explicit).__name__}, not a mapping")
    given = normalise_metrics(explicit if explicit is not None else result, entry, explicit is not None)
    if explicit is not None:  # a val_loss may also sit next to metrics
        top_loss = normalise_metrics({k: v for k, v in result.items() if str(k).lower() in LOSSES}, entry, False)
        if "val_loss" in top_loss:
            given.setdefault("val_loss", top_loss["val_loss"])
    for key, value in given.items():
        if key == "val_loss" or key not in metrics:
            metrics.setdefault(key, value)
        else:
            for fam, vals in value.items():
                metrics[key].setdefault(fam, vals)
    state = result.get("state_dict")
    if state is None:
        model = result.get("model")
        if model is not None:
            sd = getattr(model, "state_dict", None)
            if not callable(sd):
                raise InputError("trainer", f"{entry} returned model as {type(model).__name__}, which has no state_dict()")
            state = sd()
    if state is not None and not (isinstance(state, Mapping) and all(hasattr(v, "detach") for v in state.values())):
        raise InputError("trainer", f"{entry} returned state_dict that is not a mapping of tensor names to tensors")
    digest = next((result[k] for k in ("weights_sha256", "weights_digest", "sha256") if isinstance(result.get(k), str)), None)
    extra = result.get("extra") or {}
    return {"metrics": metrics, "state": state, "user_digest": digest, "extra": extra, **_seed_check_keys(result, entry)}


def _seed_check_keys(result: Mapping[str, Any], entry: str) -> dict[str, Any]:
    """``split_indices``, ``n_samples`` and ``y_train``/``train_targets``: what ctx.report_split,
    ctx.declare_length and ctx.check_scaler take, for trainers that return them instead."""
    out: dict[str, Any] = {"split_indices": None, "n_samples": None, "y_train": None}
    parts = result.get("split_indices")
    if parts is not None:
        if isinstance(parts, Mapping):
            missing = [k for k in ("train", "val", "test") if k not in parts]
            if missing:
                raise InputError("trainer", f"{entry} returned split_indices without {', '.join(missing)}",
                                 hint="return split_indices: {train: [...], val: [...], test: [...]}")
            parts = [parts["train"], parts["val"], parts["test"]]
        if not isinstance(parts, (list, tuple)) or len(parts) != 3:
            raise InputError("trainer", f"{entry} returned split_indices that is not (train, val, test)",
                             hint="return split_indices: (train_idx, val_idx, test_idx)")
        out["split_indices"] = [as_indices(p, f"{entry} returned split_indices.{name}")
                                for name, p in zip(("train", "val", "test"), parts)]
    if result.get("n_samples") is not None:
        out["n_samples"] = declared_length(result["n_samples"], f"{entry} returned n_samples, which")
    for key in ("y_train", "train_targets"):
        if result.get(key) is not None:
            out["y_train"] = (key, result[key])
            break
    return out
