"""Reading and validating an ``optuna_best/`` directory.

Everything here is plain YAML parsing and checking (``yaml.safe_load`` only);
nothing executes content from the bundle. The target scaler (a joblib/pickle
file, i.e. code) is only *located* here; it is loaded by the worker process,
which is the process that would run inside a container.

The accepted schema is documented in docs/your-own-project.md ("The optuna_best schema").
"""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import InputError
from .options import trainer_cwd_error

CONFIG = "config.yaml"
TRIAL_INFO = "trial_info.yaml"
SCALER = "target_scaler.joblib"
WEIGHTS_DIR = "weights"
BEST_NAMES = ("best.pt", "best_model.pt", "model_best.pt", "best.pth")
LAST_NAMES = ("last.pt", "last_model.pt", "last_epoch.pt", "last.pth")

OPTIMIZERS = ("adam", "adamw", "sgd")
ACTIVATIONS = ("relu", "gelu", "tanh")
MODEL_NAMES = ("mlp", "conv1d", "gru")  # harness.worker.model builds each


@dataclass(frozen=True)
class DataSpec:
    path: str | None  # as written in config.yaml (or given with --data); None: a custom trainer finds its own
    resolved: str | None  # absolute path, or None
    sha256: str | None  # expected digest, when the config records one
    exclude_channels: tuple[int, ...] = ()
    downsample: int = 1
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # custom trainer only: why the seeded split cannot be re-derived from config.yaml (no data.split, or not
    # ratios); None when data.split was read. The reference trainer always has one (the default above).
    split_note: str | None = None
    dir: str | None = None  # --data-dir: the directory around the data, mounted whole (trainers that read siblings)


@dataclass(frozen=True)
class ModelSpec:
    name: str = "mlp"
    hidden: int = 64
    num_layers: int = 2
    dropout_rate: float = 0.0
    use_residual: bool = False
    activation: str = "relu"
    kernel_size: int = 5  # conv1d only


@dataclass(frozen=True)
class TrainingSpec:
    seed: int
    batch_size: int = 0  # 0: not read (a custom trainer's config is its own)
    epochs: int = 0
    learning_rate: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adam"
    scale_targets: bool = True
    split_seed: int | None = None  # seeds the data split when it is not ``seed``: a seed band member keeps the trial's
    # where config.yaml holds the seed (dotted): a custom trainer's trainer.seed_key, else training.seed or seed
    seed_key: str = "training.seed"

    @property
    def data_split_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed


@dataclass(frozen=True)
class TrainerSpec:
    """A user's own trainer: ``module:function`` importable from ``code_dir``, or a command to run."""

    entrypoint: str | None
    code_dirs: tuple[str, ...] = ()  # each goes on sys.path (and a command's PYTHONPATH), in order
    command: str | None = None  # a command line with {placeholders} (check_command; harness.worker.trainer_cmd runs it)
    model_fn: str | None = None  # trainer.model_fn: module:function building the nn.Module from the config
    predict: str | None = None  # trainer.predict: module:function evaluating a model (the archived weights)
    objective: str | None = None  # trainer.objective: the metric trial_info's value is (val_loss, val.mse, test.r2.a)
    weights: str | None = None  # trainer.weights: the file the trainer writes its weights to, relative to its out_dir
    # trainer.cwd (or --trainer-cwd): where the trainer runs, "bundle" (the optuna_best directory) or "project"
    # (code_dirs[0]; a relative data.path is resolved there too); None: a function runs in the worker's working
    # directory, a command in its cell's directory (harness.worker.retrain.trainer_workdir)
    cwd: str | None = None

    @property
    def code_dir(self) -> str | None:
        return self.code_dirs[0] if self.code_dirs else None


@dataclass(frozen=True)
class RecordedTrial:
    """What the Optuna trial recorded, normalised from trial_info.yaml."""

    number: int | None
    value: float | None  # the objective: best validation loss
    params: dict[str, Any] = field(default_factory=dict)
    r2: dict[str, float] = field(default_factory=dict)  # per target, validation split
    mse: dict[str, float] = field(default_factory=dict)
    mae: dict[str, float] = field(default_factory=dict)
    data_sha256: str | None = None
    weights_sha256: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    root: str
    config: dict[str, Any]
    data: DataSpec
    model: ModelSpec
    training: TrainingSpec
    trainer: TrainerSpec | None
    recorded: RecordedTrial | None
    scaler_path: str | None
    best_weights: str | None
    last_weights: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_seed(self, seed: int) -> "Bundle":
        """This bundle trained with another seed (a seed band member), in the config too, at the key the
        seed was read from (``training.seed_key``): a custom trainer reads its seed from either. The data
        split keeps the trial's seed (``split_seed``; the reference trainer and ``ctx.split``), so every
        seed is scored on the same validation samples."""
        from dataclasses import replace

        config = with_value(self.config, self.training.seed_key, seed)
        return replace(self, config=config,
                       training=replace(self.training, seed=seed, split_seed=self.training.data_split_seed))


# --------------------------------------------------------------------------- helpers

_MISSING = object()


def _lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def with_value(cfg: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``cfg`` with ``value`` at the dotted key, intermediate mappings copied or created (pure)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return {**cfg, head: value}
    inner = cfg.get(head)
    return {**cfg, head: with_value(inner if isinstance(inner, Mapping) else {}, rest, value)}


def _typename(value: Any) -> str:
    return type(value).__name__


class _Reader:
    """Typed access to a YAML mapping with errors that name file, key and fix."""

    def __init__(self, data: Mapping[str, Any], filename: str) -> None:
        self.data = data
        self.filename = filename
        self.missing_hint: str | None = None  # said after a required key's "add ...": BYOT_HINT for the reference keys

    def err(self, key: str, message: str, hint: str | None = None) -> InputError:
        return InputError(self.filename, f"{key} {message}", hint=hint)

    def get(self, key: str, kind: str, *, default: Any = _MISSING, why: str = "", example: str = "") -> Any:
        value = _lookup(self.data, key)
        if value is _MISSING or value is None:
            if default is not _MISSING:
                return default
            near = self.misspelt(key)
            if near is not None:
                leaf = key.rpartition(".")[2]
                raise InputError(self.filename, f"{key} is missing; {near} is there: did you mean {leaf}? (rename it)")
            reason = f" (needed {why})" if why else ""
            return_hint = f"add e.g. `{example}`" if example else f"add `{key}`"
            if self.missing_hint:
                return_hint += f"; {self.missing_hint}"
            raise self.err(key, f"is missing{reason}", return_hint)
        return self._check(key, value, kind, example)

    def misspelt(self, key: str) -> str | None:
        """The key beside a missing ``key`` that looks like it misspelt (``training.learnig_rate`` for
        ``training.learning_rate``), dotted; None when none is close. A sibling that is itself a key the
        harness reads is not a misspelling of another."""
        import difflib

        parent, _, leaf = key.rpartition(".")
        node = _lookup(self.data, parent) if parent else self.data
        if not isinstance(node, Mapping):
            return None
        known = set(KNOWN_KEYS.get(parent, ()))
        others = [str(k) for k in node if str(k) != leaf and str(k) not in known]
        close = difflib.get_close_matches(leaf, others, n=1, cutoff=0.8)
        return f"{parent}.{close[0]}" if close and parent else (close[0] if close else None)

    def _check(self, key: str, value: Any, kind: str, example: str) -> Any:
        fix = f"write e.g. `{example}`" if example else None
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.err(key, f"must be an integer, got {_typename(value)} {value!r}", fix)
            return value
        if kind == "posint":
            value = self._check(key, value, "int", example)
            if value < 1:
                raise self.err(key, f"must be >= 1, got {value}", fix)
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.err(key, f"must be a number, got {_typename(value)} {value!r}", fix)
            if not math.isfinite(float(value)):
                raise self.err(key, f"must be finite, got {value!r}", fix)
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.err(key, f"must be true or false, got {_typename(value)} {value!r}", fix)
            return value
        if kind == "str":
            if not isinstance(value, str) or not value:
                raise self.err(key, f"must be a non-empty string, got {_typename(value)} {value!r}", fix)
            return value
        if kind == "intlist":
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise self.err(key, f"must be a list of integers, got {value!r}", fix)
            return tuple(value)
        if kind == "list":
            if not isinstance(value, list):
                raise self.err(key, f"must be a list, got {_typename(value)}", fix)
            return value
        if kind == "mapping":
            if not isinstance(value, Mapping):
                raise self.err(key, f"must be a mapping, got {_typename(value)}", fix)
            return value
        raise AssertionError(kind)


MAX_YAML_BYTES = 1 << 20  # bundle, tolerance, matrix and site files are small; anything bigger is refused
MAX_YAML_DEPTH = 32


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and nesting deeper than :data:`MAX_YAML_DEPTH`.

    Aliases are what make a 1 KB file expand into gigabytes (billion laughs); no
    bundle file needs them. The depth is checked while composing, so a deeply
    nested file is refused before Python's recursion limit is reached.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(event.start_mark.line + 1, f"uses a YAML alias (*{event.anchor})")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                event = self.peek_event()
                raise _Refused(event.start_mark.line + 1, f"is nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml_text(text: str, label: str) -> Any:
    """Safe-load YAML text with aliases refused and size and depth bounded; every failure is an InputError."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise InputError(label, f"is over 1 MB ({len(text.encode('utf-8', 'surrogatepass'))} bytes)",
                         hint="bundle and setting files are small; trim it")
    loader = None
    try:
        loader = BoundedLoader(text)  # the reader refuses control characters here already
        return loader.get_single_data()
    except _Refused as exc:
        hint = ("aliases are refused in bundle files, write the value out" if "alias" in exc.message
                else "flatten it")
        raise InputError(label, f"line {exc.line} {exc.message}", hint=hint) from None
    except RecursionError:
        raise InputError(label, f"is nested deeper than {MAX_YAML_DEPTH} levels", hint="flatten it") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(label, f"is not valid YAML{where}: {problem}", hint="fix the syntax") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(path: Path, label: str | None = None) -> Any:
    """Read a YAML file with :func:`parse_yaml_text`, turning every failure into an InputError."""
    label = label or path.name
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise InputError(label, f"is over 1 MB ({size} bytes)", hint="bundle and setting files are small; trim it")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(str(path), "not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(str(path), f"cannot be read ({exc.__class__.__name__}: {exc})") from None
    return parse_yaml_text(text, label)


# --------------------------------------------------------------------------- config.yaml


def parse_config(cfg: Any, root: Path, data_override: str | None = None,
                 custom_trainer: bool = False,
                 seed_key: str | None = None) -> tuple[DataSpec, ModelSpec, TrainingSpec, TrainerSpec | None]:
    """Validate a parsed config.yaml. Pure apart from resolving paths.

    With a custom trainer (a ``trainer`` section, or ``custom_trainer`` when one is
    named with --trainer) only what the harness itself reads is validated:
    the seed (:func:`_custom_seed`: ``seed_key`` from --seed-key, else ``trainer.seed_key``,
    else ``training.seed``, else a top-level ``seed``), ``data.path`` (and ``data.sha256``)
    and the trainer section; every other key is the user's and is passed through
    untouched. The reference trainer's keys (``training.seed`` among them) are
    validated by :func:`parse_reference_config`.
    """
    if not isinstance(cfg, Mapping):
        what = "your trainer's settings and its seed" if custom_trainer else "sections (data, model, training)"
        raise InputError(CONFIG, f"must be a mapping of {what}, got {_typename(cfg)}",
                         hint="see docs/your-own-project.md#the-optuna_best-schema")
    r = _Reader(cfg, CONFIG)
    trainer = _parse_trainer_section(r, entrypoint_required=not custom_trainer)
    custom = trainer is not None or custom_trainer
    if custom:
        seed, seed_key = _custom_seed(r, seed_key)
    else:
        if seed_key is not None:
            raise InputError("--seed-key", f"{seed_key} names where a custom trainer reads its seed; the reference "
                             "trainer reads training.seed", hint="drop --seed-key, or name your trainer with --trainer")
        r.missing_hint = BYOT_HINT  # a required key of the reference trainer is missing: maybe it is not its config
        r.get("training", "mapping", example="training: {seed: 42, batch_size: 32, epochs: 20, learning_rate: 0.001}")
        seed = r.get("training.seed", "int", why="to seed every RNG and the split", example="training: {seed: 42}")
    # a custom trainer may find its data itself: then data.path is optional (nothing is hashed)
    r.get("data", "mapping", default={} if custom else _MISSING, example="data: {path: data/signals.npz}")
    if data_override is not None:
        data_path: str | None = data_override
        resolved: Path | None = Path(data_override).expanduser().resolve()
    else:
        data_path = r.get("data.path", "str", why="to find the dataset", example="data: {path: data/signals.npz}",
                          default=None if custom else _MISSING)
        p = Path(data_path).expanduser() if data_path is not None else None
        resolved = None if p is None else (p if p.is_absolute() else root / p).resolve()
    sha = r.get("data.sha256", "str", default=None)
    if custom:
        epochs = _lookup(cfg, "training.epochs")
        epochs = epochs if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0 else 0
        split, split_note = _custom_split(r)
        data = DataSpec(path=None if data_path is None else str(data_path),
                        resolved=None if resolved is None else str(resolved), sha256=sha.lower() if sha else None,
                        split=split, split_note=split_note)
        return data, ModelSpec(), TrainingSpec(seed=seed, epochs=epochs, seed_key=seed_key), trainer
    assert data_path is not None and resolved is not None
    data, model, training = parse_reference_config(r, seed, str(data_path), str(resolved), sha)
    return data, model, training, None


def _parse_trainer_section(r: _Reader, entrypoint_required: bool = True) -> TrainerSpec | None:
    """``trainer:``; without ``entrypoint`` only when --trainer names it (the section then holds the hooks)."""
    tcfg = r.get("trainer", "mapping", default=None)
    if tcfg is None:
        return None
    command = r.get("trainer.command", "str", default=None)
    if command is not None and _lookup(tcfg, "entrypoint") not in (_MISSING, None):
        raise r.err("trainer", "names both an entrypoint and a command",
                    hint="keep one: `entrypoint: module:function` or `command: \"{python} -m mypkg.retrain {bundle}\"`")
    entry = None if command is not None else r.get(
        "trainer.entrypoint", "str", example="trainer: {entrypoint: 'my_train:train', code_dir: code} (or command: ...)",
        default=_MISSING if entrypoint_required else "")
    hooks = {k: r.get(f"trainer.{k}", "str", default=None, example=f"trainer: {{{k}: 'mypkg.model:{k}'}}")
             for k in TRAINER_HOOKS}
    hooks.update(_trainer_settings(r))
    raw = _lookup(tcfg, "code_dir")
    if isinstance(raw, list):
        if not raw or not all(isinstance(v, str) and v for v in raw):
            raise r.err("trainer.code_dir", f"must be a folder or a list of folders, got {raw!r}")
        return TrainerSpec(entrypoint=entry, code_dirs=tuple(raw), command=command, **hooks)
    code_dir = r.get("trainer.code_dir", "str", default=None)
    return TrainerSpec(entrypoint=entry, code_dirs=(code_dir,) if code_dir else (), command=command, **hooks)


TRAINER_HOOKS = ("model_fn", "predict")  # optional trainer.* functions that evaluate the archived weights
# optional trainer.* settings: what trial_info's value is, and where the trainer writes its weights; like the
# hooks, they describe the bundle and stay when --trainer/--trainer-cmd names the trainer (trainer.seed_key is
# read into TrainingSpec.seed_key by _custom_seed)
TRAINER_SETTINGS = ("objective", "weights", "cwd")
TRAINER_KEYS = ("entrypoint", "command", "code_dir", *TRAINER_HOOKS, *TRAINER_SETTINGS, "seed_key")
OBJECTIVE_SPLITS = ("val", "test")
OBJECTIVE_METRICS = ("r2", "mse", "mae")
OBJECTIVE_EXAMPLE = "trainer: {objective: val.mse}"


def objective_parts(text: str) -> tuple[str, str, str | None] | None:
    """``val.mse.target_a`` -> ("val", "mse", "target_a"); ``test.r2`` -> ("test", "r2", None); ``val_loss``
    -> ("val", "val_loss", None); the flat names a trainer returns are taken too (``val_mse`` is ``val.mse``,
    ``test_r2.target_a`` is ``test.r2.target_a``); None when ``text`` is not a metric path of the record (pure)."""
    if text == "val_loss":
        return "val", "val_loss", None
    head, dot, tail = text.partition(".")
    for split in OBJECTIVE_SPLITS:
        if head.startswith(split + "_") and head[len(split) + 1:] in OBJECTIVE_METRICS:
            text = f"{split}.{head[len(split) + 1:]}{dot}{tail}"
    split, _, rest = text.partition(".")
    metric, _, target = rest.partition(".")
    if split not in OBJECTIVE_SPLITS or metric not in OBJECTIVE_METRICS or (rest.endswith(".") and not target):
        return None
    return split, metric, target or None


def _trainer_settings(r: _Reader) -> dict[str, str | None]:
    """``trainer.objective`` and ``trainer.weights``, checked: a bad one is one line, before anything trains."""
    objective = r.get("trainer.objective", "str", default=None, example=OBJECTIVE_EXAMPLE)
    if objective is not None and objective_parts(objective) is None:
        raise r.err("trainer.objective", f"{objective!r} is not a metric of the record: write val_loss, or "
                    f"SPLIT.METRIC[.TARGET] with SPLIT one of {', '.join(OBJECTIVE_SPLITS)} and METRIC one of "
                    f"{', '.join(OBJECTIVE_METRICS)}", hint=f"e.g. `{OBJECTIVE_EXAMPLE}` or `objective: test.r2.target_a`")
    weights = r.get("trainer.weights", "str", default=None, example="trainer: {weights: model.pt}")
    if weights is not None:
        from pathlib import PurePosixPath

        path = PurePosixPath(weights)
        if path.is_absolute() or ".." in path.parts or "\\" in weights or not path.parts or path.parts == (".",):
            raise r.err("trainer.weights", f"{weights!r} must be a path inside the cell's output directory "
                        "(relative, without ..)", hint="write e.g. `weights: model.pt` or `weights: checkpoints/best.ckpt`")
        weights = path.as_posix()
    cwd = _lookup(r.data, "trainer.cwd")
    cwd = None if cwd is _MISSING else cwd
    why = trainer_cwd_error(cwd, "trainer.cwd")
    if why is not None:
        raise InputError(CONFIG, why, hint="write e.g. `trainer: {cwd: project}`, or leave it out")
    return {"objective": objective, "weights": weights, "cwd": cwd}


def _custom_seed(r: _Reader, override: str | None) -> tuple[int, str]:
    """A custom trainer's seed and the dotted key it was read from: ``override`` (--seed-key), else
    ``trainer.seed_key``, else ``training.seed``, else a top-level ``seed``; one line when none is there."""
    declared = override if override is not None else r.get("trainer.seed_key", "str", default=None,
                                                           example="trainer: {seed_key: seed}")
    where = "--seed-key" if override is not None else "trainer.seed_key"
    if declared is not None:
        if not all(part.strip() for part in declared.split(".")):
            raise InputError(CONFIG, f"{where} {declared!r} is not a dotted key of config.yaml",
                             hint="write e.g. `seed_key: seed` or `seed_key: train.random_state`")
        value = _lookup(r.data, declared)
        if value is _MISSING or value is None:
            raise InputError(CONFIG, f"{where} names {declared}, which config.yaml does not have",
                             hint=f"add `{declared}: 42`, or name the key your trainer reads its seed from")
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(CONFIG, f"{declared} (the seed, {where}) must be an integer, got {_typename(value)} "
                                     f"{value!r}", hint=f"write e.g. `{declared}: 42`")
        return value, declared
    for key in ("training.seed", "seed"):
        value = _lookup(r.data, key)
        if value is not _MISSING and value is not None:
            return r._check(key, value, "int", "training: {seed: 42}" if key == "training.seed" else "seed: 42"), key
    raise InputError(CONFIG, "no seed found (looked for training.seed and seed)",
                     hint="declare where your trainer reads it with trainer: {seed_key: KEY}")


def _custom_split(r: _Reader) -> tuple[tuple[float, float, float], str | None]:
    """A custom trainer's ``data.split`` as ratios when it is written as the reference trainer's, else why not.

    The key is the trainer's own: a value of another shape is not an error, only a split
    the harness cannot re-derive (the ratios then stay the reference default for ``ctx.split``).
    """
    if _lookup(r.data, "data.split") in (_MISSING, None):
        return DataSpec.split, "config.yaml has no data.split"
    try:
        return _split_ratios(r), None
    except InputError as exc:
        return DataSpec.split, exc.message.removeprefix(f"{CONFIG}: ")


def _split_ratios(r: _Reader) -> tuple[float, float, float]:
    """``data.split`` as a mapping ``{train, val, test}`` or a list ``[train, val, test]``."""
    split_raw = r.get("data.split", "mapping" if not isinstance(_lookup(r.data, "data.split"), list) else "list",
                      default={"train": 0.7, "val": 0.15, "test": 0.15})
    if isinstance(split_raw, list):
        if len(split_raw) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in split_raw):
            raise r.err("data.split", f"as a list must be three numbers [train, val, test], got {split_raw!r}",
                        hint="write e.g. `split: [0.7, 0.15, 0.15]`")
        train_r, val_r, test_r = (float(v) for v in split_raw)
    else:
        sr = _Reader(split_raw, CONFIG)
        split = tuple(sr.get(k, "float", default=None) for k in ("train", "val", "test"))
        if split[0] is None or split[1] is None:
            raise r.err("data.split", "needs train and val ratios", hint="write e.g. `split: {train: 0.7, val: 0.15, test: 0.15}`")
        train_r, val_r, test_r = split
        if test_r is None:
            test_r = round(1.0 - train_r - val_r, 12)
    if min(train_r, val_r, test_r) < 0 or abs(train_r + val_r + test_r - 1.0) > 1e-6:
        raise r.err("data.split", f"ratios must be >= 0 and sum to 1, got train={train_r}, val={val_r}, test={test_r}")
    if train_r <= 0 or val_r <= 0:
        raise r.err("data.split", "train and val ratios must be > 0 (best weights are chosen on val)")
    return float(train_r), float(val_r), float(test_r)


def parse_reference_config(r: _Reader, seed: int, data_path: str, resolved: str,
                           sha: str | None) -> tuple[DataSpec, ModelSpec, TrainingSpec]:
    """The reference trainer's keys (training, data preprocessing, model): only when no custom trainer is named."""
    training = TrainingSpec(
        seed=seed,
        batch_size=r.get("training.batch_size", "posint", example="training: {batch_size: 32}"),
        epochs=r.get("training.epochs", "posint", example="training: {epochs: 20}"),
        learning_rate=r.get("training.learning_rate", "float", example="training: {learning_rate: 0.001}"),
        weight_decay=r.get("training.weight_decay", "float", default=0.0),
        optimizer=str(r.get("training.optimizer", "str", default="adam")).lower(),
        scale_targets=r.get("training.scale_targets", "bool", default=True),
    )
    if training.learning_rate <= 0:
        raise r.err("training.learning_rate", f"must be > 0, got {training.learning_rate}")
    if training.optimizer not in OPTIMIZERS:
        raise r.err("training.optimizer", f"is {training.optimizer!r}, not one of {', '.join(OPTIMIZERS)}")

    data = DataSpec(
        path=data_path,
        resolved=resolved,
        sha256=sha.lower() if sha else None,
        exclude_channels=r.get("data.exclude_channels", "intlist", default=()),
        downsample=r.get("data.downsample", "posint", default=1, example="data: {downsample: 2}"),
        split=_split_ratios(r),
    )

    r.get("model", "mapping", default={})
    model = ModelSpec(
        name=str(r.get("model.name", "str", default="mlp")),
        hidden=r.get("model.hidden", "posint", default=64, example="model: {hidden: 64}"),
        num_layers=r.get("model.num_layers", "posint", default=2),
        dropout_rate=r.get("model.dropout_rate", "float", default=0.0),
        use_residual=r.get("model.use_residual", "bool", default=False),
        activation=str(r.get("model.activation", "str", default="relu")).lower(),
        kernel_size=r.get("model.kernel_size", "posint", default=5, example="model: {kernel_size: 5}"),
    )
    if not 0.0 <= model.dropout_rate < 1.0:
        raise r.err("model.dropout_rate", f"must be in [0, 1), got {model.dropout_rate}")
    if model.kernel_size % 2 == 0:
        raise r.err("model.kernel_size", f"must be odd (the output keeps the input's length), got {model.kernel_size}",
                    hint=f"write e.g. `kernel_size: {model.kernel_size + 1}`")
    if model.activation not in ACTIVATIONS:
        raise r.err("model.activation", f"is {model.activation!r}, not one of {', '.join(ACTIVATIONS)}")
    if model.name not in MODEL_NAMES:
        raise r.err("model.name", f"is {model.name!r}; the reference trainer builds {', '.join(MODEL_NAMES)}",
                    hint="name your own trainer with `trainer: {entrypoint: module:function}` or --trainer")
    return data, model, training


# --------------------------------------------------------------------------- keys the reference trainer reads

# The keys parse_config reads for the reference trainer, per section (data.split by its ratios).
REFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("path", "sha256", "exclude_channels", "downsample", "split"),
    "data.split": ("train", "val", "test"),
    "model": ("name", "hidden", "num_layers", "dropout_rate", "use_residual", "activation", "kernel_size"),
    "training": ("seed", "batch_size", "epochs", "learning_rate", "weight_decay", "optimizer", "scale_targets"),
}


# Every key the harness reads, per section ("" the top level): a key beside a missing one that is
# not among these may be its misspelling (_Reader.misspelt).
KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "": ("data", "model", "training", "trainer"),
    **REFERENCE_KEYS,
    "trainer": TRAINER_KEYS,
}

# Said with a missing required key of the reference trainer when no trainer is named: the config may be
# another project's, whose keys the reference trainer was never meant to read.
BYOT_HINT = ("is this your own project? name its trainer with --trainer module:function or --trainer-cmd CMD "
             "(docs/your-own-project.md#bring-your-own-trainer)")


def unknown_config_keys(cfg: Any, strict: bool = False) -> list[str]:
    """One message per key of ``data``/``model``/``training`` the reference trainer does not read.

    A misspelt key (``model.hiden``) used to be ignored silently: the run trained with the
    default and could report ``reproduced``. A config naming its own ``trainer`` is left
    alone: its keys are that trainer's. ``strict`` (--strict-config refuses the keys): the
    messages do not end in "it was ignored"; the caller says they were refused.
    """
    if not isinstance(cfg, Mapping) or cfg.get("trainer") is not None:
        return []
    import difflib

    out = []
    for section, known in REFERENCE_KEYS.items():
        node: Any = cfg
        for part in section.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if not isinstance(node, Mapping):
            continue
        for key in node:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            guess = f" (did you mean {section}.{close[0]}?)" if close else ""
            out.append(f"{CONFIG}: {section}.{key} is not a key the reference trainer reads{guess}"
                       + ("" if strict else "; it was ignored"))
    return out


def unknown_trainer_keys(cfg: Any) -> list[str]:
    """One message per key of config.yaml's ``trainer`` section the harness does not read (:data:`TRAINER_KEYS`):
    a misspelt ``trainer.seed_kye`` would otherwise leave the seed where the harness looks by default."""
    tcfg = cfg.get("trainer") if isinstance(cfg, Mapping) else None
    if not isinstance(tcfg, Mapping):
        return []
    import difflib

    out = []
    for key in tcfg:
        if key not in TRAINER_KEYS:
            close = difflib.get_close_matches(str(key), TRAINER_KEYS, n=1)
            guess = f" (did you mean trainer.{close[0]}?)" if close else ""
            out.append(f"{CONFIG}: trainer.{key} is not a key of the trainer section{guess}; it was ignored")
    return out


# --------------------------------------------------------------------------- trial_info.yaml


AGGREGATE = "*"  # the target name under which a metric over all targets (one number) is stored


def _float_map(value: Any, key: str) -> dict[str, float]:
    """Per-target numbers, or one aggregate number stored as ``{"*": v}``."""
    if value is None:
        return {}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {AGGREGATE: float(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(TRIAL_INFO, f"{key}.{k} must be a number, got {v!r}")
            out[str(k)] = float(v)
        return out
    raise InputError(TRIAL_INFO, f"{key} must be a number or map target names to numbers, got {_typename(value)}",
                     hint=f"write e.g. `{key}: 0.93` or `{key}: {{target_a: 0.93}}`")


def parse_trial_info(info: Any) -> RecordedTrial:
    """Normalise trial_info.yaml.

    Accepts what Optuna's ``study.best_trial`` naturally gives (``number``,
    ``value``, ``params``, ``user_attrs``), optionally nested under
    ``best_trial:``, plus the flatter spelling (``trial_number``, ``val_loss``,
    ``r2``). Per-target metrics may sit at top level or in ``user_attrs``.
    """
    if not isinstance(info, Mapping):
        raise InputError(TRIAL_INFO, f"must be a mapping, got {_typename(info)}",
                         hint="write at least `number:`, `value:` and `params:`")
    if isinstance(info.get("best_trial"), Mapping):
        info = {**info, **info["best_trial"]}
    attrs = info.get("user_attrs") or {}
    if not isinstance(attrs, Mapping):
        raise InputError(TRIAL_INFO, "user_attrs must be a mapping")

    def pick(*keys: str) -> Any:
        for source in (info, attrs):
            for k in keys:
                if k in source and source[k] is not None:
                    return source[k]
        return None

    number = pick("number", "trial_number", "trial")
    if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
        raise InputError(TRIAL_INFO, f"number must be an integer, got {number!r}")
    value = pick("value", "val_loss", "best_val_loss")
    if isinstance(value, list):  # multi-objective studies store `values`
        value = value[0] if value else None
    if value is None and isinstance(info.get("values"), list) and info["values"]:
        value = info["values"][0]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InputError(TRIAL_INFO, f"value (the validation loss) must be a number, got {value!r}")
    params = info.get("params") or {}
    if not isinstance(params, Mapping):
        raise InputError(TRIAL_INFO, "params must be a mapping of hyperparameter names to values")
    env = pick("environment", "env") or {}
    return RecordedTrial(
        number=number,
        value=float(value) if value is not None else None,
        params=dict(params),
        r2=_float_map(pick("r2", "val_r2", "r2_per_target", "R2", "val_R2", "r2_score", "val_r2_score"), "r2"),
        mse=_float_map(pick("mse", "val_mse", "MSE", "val_MSE"), "mse"),
        mae=_float_map(pick("mae", "val_mae", "MAE", "val_MAE"), "mae"),
        data_sha256=(str(pick("data_sha256")).lower() if pick("data_sha256") else None),
        weights_sha256=(str(pick("weights_sha256")) if pick("weights_sha256") else None),
        environment=dict(env) if isinstance(env, Mapping) else {},
    )


# --------------------------------------------------------------------------- a trainer command's words
#
# config.yaml trainer.command (or --trainer-cmd) is checked here, before anything runs; the worker
# fills the placeholders and runs it (harness.worker.trainer_cmd).

#: The placeholders a command may use, and what each becomes (one word each, never split further).
PLACEHOLDERS: dict[str, str] = {
    "bundle": "the optuna_best directory",
    "config": "its config.yaml",
    "data": "the data file or directory (--data, else data.path)",
    "out_dir": "this cell's results directory, also the command's working directory unless trainer.cwd says otherwise",
    "seed": "the seed (config.yaml at trainer.seed_key, else training.seed, else seed)",
    "device": "cpu, cuda or cuda:N",
    "python": "the worker's own Python interpreter (it has torch)",
    "code_dir": "the first --trainer-path folder (trainer.code_dir)",
}
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def split_command(command: str, where: str = "--trainer-cmd") -> list[str]:
    """The command's words, as a POSIX shell would split them (no expansion, no shell)."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise InputError(where, f"cannot be split into words ({exc}): {command!r}",
                         hint="balance the quotes; the command runs without a shell") from None
    if not argv:
        raise InputError(where, "is empty", hint='give the command, e.g. "{python} -m mypkg.retrain {bundle}"')
    return argv


def _accepted() -> str:
    return ", ".join("{" + name + "}" for name in PLACEHOLDERS)


def placeholders(argv: list[str], where: str = "--trainer-cmd") -> set[str]:
    """The placeholders the words use; an unknown one is refused, naming it and the accepted ones."""
    used: set[str] = set()
    for word in argv:
        for name in PLACEHOLDER.findall(word):
            if name not in PLACEHOLDERS:
                raise InputError(where, f"unknown placeholder {{{name}}} in {word!r}; accepted: {_accepted()}",
                                 hint="use one of these, or move code with braces into a script")
            used.add(name)
    return used


def check_command(command: str, where: str, *, has_data: bool, has_code_dir: bool) -> list[str]:
    """Validate a command before anything runs: it splits, and every placeholder it uses can be filled."""
    argv = split_command(command, where)
    used = placeholders(argv, where)
    if "data" in used and not has_data:
        raise InputError(where, "uses {data}, but config.yaml has no data.path and no --data was given",
                         hint="add data.path to config.yaml, pass --data FILE, or drop {data}")
    if "code_dir" in used and not has_code_dir:
        raise InputError(where, "uses {code_dir}, but no --trainer-path (trainer.code_dir) was given",
                         hint="pass --trainer-path DIR")
    return argv


# --------------------------------------------------------------------------- the bundle


def _find(dirpath: Path, names: tuple[str, ...]) -> str | None:
    for n in names:
        if (dirpath / n).is_file():
            return str(dirpath / n)
    return None


def within_data_dir(data: DataSpec, data_dir: str, given: bool) -> DataSpec:
    """``data`` placed in ``--data-dir``: the data must lie inside the directory.

    ``--data`` (``given``) must name a path inside it; a ``data.path`` resolved from the
    bundle must lie inside it, or, when relative, is taken relative to the directory. With
    no data path at all (a custom trainer) the directory itself is the data.

    A link inside the directory whose target is absolute or lies outside it is refused: the
    host would hash the file it points to here, a container (which mounts the directory
    alone) or a rerun elsewhere would read another one.
    """
    from .safeio import refuse_links_leaving

    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise InputError("--data-dir", f"{data_dir} is not a directory",
                         hint="pass the directory that holds the data file and the files beside it")
    d = d.resolve()
    refuse_links_leaving(d, f"--data-dir {d}")
    if data.resolved is None:
        return replace(data, path=str(d), resolved=str(d), dir=str(d))
    p = Path(data.resolved)
    if p == d or p.is_relative_to(d):
        return replace(data, dir=str(d))
    if not given and data.path and not Path(data.path).expanduser().is_absolute():
        q = (d / data.path).resolve()
        if (q == d or q.is_relative_to(d)) and q.exists():
            return replace(data, resolved=str(q), dir=str(d))
    where, what = ("--data", f"{p}") if given else (CONFIG, f"data.path {data.path} ({p})")
    raise InputError(where, f"{what} lies outside --data-dir {d}",
                     hint="give a --data inside that directory, or a --data-dir that holds the data")


def _project_data(trainer: TrainerSpec, data: DataSpec, where: str, given: bool) -> DataSpec:
    """``trainer.cwd: project`` needs a code directory to run in, and resolves a relative ``data.path`` there
    (``given``: ``--data`` named the data, relative to where harness was started, as always)."""
    if trainer.cwd != "project":
        return data
    if not trainer.code_dirs:
        raise InputError(where, "project runs the trainer in its code directory, but no --trainer-path "
                         "(trainer.code_dir) names one", hint="pass --trainer-path DIR, or use trainer.cwd: bundle")
    if given or data.path is None or Path(data.path).expanduser().is_absolute():
        return data
    return replace(data, resolved=str((Path(trainer.code_dirs[0]) / Path(data.path).expanduser()).resolve()))


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of the parsed config.yaml (canonical JSON): what a band was measured for.

    The parsed document, not the file's bytes: a comment or a reordered key does not
    change what trains, so it does not make a saved band unusable.
    """
    import hashlib
    import json

    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def expected_data_digests(bundle: Bundle) -> dict[str, str]:
    """Where the bundle records the data's sha256, and what it says (pure)."""
    found = {"config.yaml data.sha256": bundle.data.sha256,
             "trial_info.yaml data_sha256": bundle.recorded.data_sha256 if bundle.recorded else None}
    return {source: want for source, want in found.items() if want}


def load_bundle(path: str | os.PathLike[str], *, data_override: str | None = None,
                trainer_override: str | None = None,
                trainer_path: str | list[str] | tuple[str, ...] | None = None,
                trainer_cmd_override: str | None = None, data_dir: str | None = None,
                seed_key_override: str | None = None, trainer_cwd_override: str | None = None) -> Bundle:
    """Read and validate an optuna_best directory (no training, no code execution).

    ``trainer_override`` (``--trainer``) or ``trainer_cmd_override`` (``--trainer-cmd``)
    replaces config.yaml's trainer section, whichever of the two it names.
    ``seed_key_override`` (``--seed-key``) replaces ``trainer.seed_key``, ``trainer_cwd_override``
    (``--trainer-cwd``) ``trainer.cwd``; with ``project``, a relative ``data.path`` is resolved
    against the trainer's code directory instead of the bundle.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(str(root), "no such directory", hint="pass the path of your optuna_best/ directory")
    if not root.is_dir():
        raise InputError(str(root), "is not a directory", hint="pass the optuna_best/ directory, not a file in it")
    root = root.resolve()
    cfg_path = root / CONFIG
    if not cfg_path.is_file():
        raise InputError(str(cfg_path), "not found",
                         hint="an optuna_best/ directory needs config.yaml: your trainer's settings and its seed"
                         if trainer_override or trainer_cmd_override else
                         "an optuna_best/ directory needs config.yaml with data, model and training sections")
    cfg = load_yaml(cfg_path, CONFIG)
    if trainer_override and trainer_cmd_override:
        raise InputError("--trainer-cmd", "cannot be combined with --trainer", hint="name one trainer: a function or a command")
    data, model, training, trainer = parse_config(cfg, root, data_override,
                                                  custom_trainer=bool(trainer_override or trainer_cmd_override),
                                                  seed_key=seed_key_override)
    why = trainer_cwd_error(trainer_cwd_override, "--trainer-cwd")
    if why is not None:
        raise InputError("", why, hint="e.g. --trainer-cwd project")

    paths = tuple([trainer_path] if isinstance(trainer_path, str) else (trainer_path or ()))
    # config.yaml's hooks describe the archived model (its settings the bundle): they stay when --trainer
    # names another entrypoint
    hooks = {k: getattr(trainer, k) for k in (*TRAINER_HOOKS, *TRAINER_SETTINGS)} if trainer is not None else {}
    if trainer_override:
        trainer = TrainerSpec(entrypoint=trainer_override, code_dirs=paths, **hooks)
    elif trainer_cmd_override:
        trainer = TrainerSpec(entrypoint=None, code_dirs=paths, command=trainer_cmd_override, **hooks)
    elif trainer is not None and paths:
        trainer = replace(trainer, code_dirs=paths)
    if trainer is not None:
        if trainer.command is not None:
            check_command(trainer.command, "--trainer-cmd" if trainer_cmd_override else f"{CONFIG}: trainer.command",
                          has_data=data.resolved is not None, has_code_dir=bool(trainer.code_dirs))
        elif trainer.entrypoint is None or ":" not in trainer.entrypoint or not all(trainer.entrypoint.split(":", 1)):
            raise InputError(CONFIG if not trainer_override else "--trainer",
                             f"trainer entrypoint {trainer.entrypoint!r} is not `module:function`",
                             hint="write e.g. `my_train:train`")
        for hook in TRAINER_HOOKS:
            value = getattr(trainer, hook)
            if value is not None and (":" not in value or not all(value.split(":", 1))):
                raise InputError(CONFIG, f"trainer.{hook} {value!r} is not `module:function`",
                                 hint=f"write e.g. `{hook}: mypkg.model:{hook}`")
        resolved_dirs = []
        for code_dir in trainer.code_dirs:
            cd = Path(code_dir).expanduser()
            cd = (cd if cd.is_absolute() else (Path.cwd() if paths else root) / cd).resolve()
            if not cd.is_dir():
                raise InputError(CONFIG if not paths else "--trainer-path",
                                 f"trainer code directory {cd} does not exist", hint="point it at the folder holding your module")
            resolved_dirs.append(str(cd))
        trainer = replace(trainer, code_dirs=tuple(resolved_dirs), cwd=trainer_cwd_override or trainer.cwd)
        data = _project_data(trainer, data, "--trainer-cwd" if trainer_cwd_override else f"{CONFIG}: trainer.cwd",
                             given=data_override is not None)
    elif trainer_cwd_override is not None:
        raise InputError("--trainer-cwd", "sets where your own trainer runs (--trainer, --trainer-cmd or config.yaml "
                         "trainer); the reference trainer reads data.path itself",
                         hint="drop --trainer-cwd, or name your trainer with --trainer")
    if data_dir is not None:
        data = within_data_dir(data, data_dir, given=data_override is not None)

    recorded = None
    info_path = root / TRIAL_INFO
    if info_path.is_file():
        recorded = parse_trial_info(load_yaml(info_path, TRIAL_INFO))

    scaler = root / SCALER
    scaler_path = str(scaler) if scaler.is_file() else None
    wdir = root / WEIGHTS_DIR
    best = _find(wdir, BEST_NAMES) if wdir.is_dir() else None
    last = _find(wdir, LAST_NAMES) if wdir.is_dir() else None
    return Bundle(
        root=str(root), config=dict(cfg), data=data, model=model, training=training, trainer=trainer,
        recorded=recorded, scaler_path=scaler_path, best_weights=best, last_weights=last,
    )
