"""The retrain entry point: one run of one cell, in the process that trains.

Started by a backend (a local child process, or a container's ENTRYPOINT) as::

    python -m harness.worker --spec spec.json
    python -m harness.worker --bundle DIR --out DIR --cell NAME [--device cuda] ...

It is the only process that loads the target scaler (joblib, i.e. pickle: code)
and the only one that trains. It writes ``OUT/record.json`` atomically whatever
happens, and prints progress events on stdout as ``HARNESS-EVENT {json}``
lines. Exit status: 0 ok, 2 bad input, 1 the run failed.

This module and what it imports need only torch, numpy, pyyaml, joblib and
scikit-learn: it runs inside the minimal images.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .. import __version__
from . import EVENT_PREFIX
from ..errors import EXIT_OK, HarnessError, InputError, RunFailed
from ..record import Env, ResultRecord, RunSpec, Status, atomic_write, write



def emit(event: str, **data: Any) -> None:
    """One progress event on stdout, for the launcher's progress bar."""
    print(EVENT_PREFIX + json.dumps({"event": event, **data}, sort_keys=True), flush=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- files


def save_weights(state: Any, path: Path) -> None:
    """``torch.save`` atomically (:func:`harness.record.atomic_write`): never a truncated file."""
    import torch

    atomic_write(path, lambda fh: torch.save(state, fh))


DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


def disk_failure(exc: OSError) -> str | None:
    """The one line for a write that failed because of the disk, or None for any other OSError."""
    what = DISK_ERRNOS.get(exc.errno or 0)
    if what is None:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return f"{what}{where}; free space or pass --out DIR on another disk, then rerun the cell"


# --------------------------------------------------------------------------- scaler


def _load_scaler(path: str) -> Any:
    """Load the archived scaler. joblib files are pickles: this executes code from the bundle."""
    import joblib

    try:
        scaler = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise InputError(path, f"cannot be loaded as a joblib scaler ({exc.__class__.__name__}: {exc})",
                         hint="re-export it with joblib.dump(scaler, path), or remove it to refit on the train split") from None
    for attr in ("transform", "inverse_transform"):
        if not callable(getattr(scaler, attr, None)):
            raise InputError(path, f"holds a {type(scaler).__name__}, which has no {attr}()",
                             hint="archive the fitted target scaler (e.g. sklearn StandardScaler)")
    return scaler


def _scaler_check(archived: Any, y_train: Any) -> tuple[Any, dict[str, Any]]:
    """Refit a fresh scaler on the reproduced train split; compare with the archived one.

    A match is direct evidence that the split (and the data) reproduced.
    """
    import numpy as np
    from sklearn.base import clone
    from sklearn.preprocessing import StandardScaler

    fresh = clone(archived) if archived is not None else StandardScaler()
    fresh.fit(y_train)
    info: dict[str, Any] = {"archived": archived is not None, "class": type(fresh).__name__}
    if archived is None:
        info.update(refit_matches=None, max_abs_diff=None, used="refit")
        return fresh, info
    try:
        a = np.asarray(archived.transform(y_train), dtype=np.float64)
        b = np.asarray(fresh.transform(y_train), dtype=np.float64)
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        params = {}
        for attr in ("mean_", "scale_", "var_", "min_", "data_min_", "data_max_", "center_"):
            if hasattr(archived, attr) and hasattr(fresh, attr):
                params[attr] = float(np.max(np.abs(np.asarray(getattr(archived, attr), dtype=np.float64)
                                                    - np.asarray(getattr(fresh, attr), dtype=np.float64))))
        info.update(refit_matches=bool(diff <= 1e-9 and all(v <= 1e-9 for v in params.values())),
                    max_abs_diff=diff, param_max_abs_diff=params, used="archived")
    except Exception as exc:  # noqa: BLE001
        raise InputError("target_scaler.joblib", f"does not fit the data's {y_train.shape[1]} targets ({exc})",
                         hint="archive the scaler fitted on this dataset's targets") from None
    return archived, info


# --------------------------------------------------------------------------- evaluation


def _evaluate(net: Any, data: Any, split: Any, scaler: Any, device: Any, y_scaled: Any) -> dict[str, Any]:
    from .metrics import per_target
    from .train import predict, scaled_mse

    out: dict[str, Any] = {}
    for name in ("val", "test"):
        idx = getattr(split, name)
        if not idx:
            out[name] = None
            continue
        pred_scaled = predict(net, data.X[idx], device)
        if name == "val":
            out["val_loss"] = scaled_mse(pred_scaled, y_scaled[idx])
        pred = scaler.inverse_transform(pred_scaled) if scaler is not None else pred_scaled
        out[name] = per_target(data.y[idx], pred, data.target_names)
    return out


# --------------------------------------------------------------------------- the run


def _reference_run(spec: RunSpec, bundle: Any, data: Any, device: Any, out: Path, rec: ResultRecord) -> None:
    import numpy as np
    import torch

    from . import model as model_mod
    from .train import split_indices, train_reference

    seed = bundle.training.seed
    split = split_indices(len(data.X), bundle.data.split, seed)
    rec.split = {"sizes": [len(split.train), len(split.val), len(split.test)],
                    "indices_sha256": _sha_json([split.train, split.val, split.test])}

    archived_scaler = _load_scaler(bundle.scaler_path) if bundle.scaler_path else None
    y_train = data.y[split.train].astype(np.float64)
    scaler, info = _scaler_check(archived_scaler, y_train)
    if not bundle.training.scale_targets and archived_scaler is None:
        scaler, info = None, {"archived": False, "used": "none"}
    rec.scaler = info
    if archived_scaler is None and scaler is not None:
        import joblib

        joblib.dump(scaler, out / "target_scaler.joblib")  # the scaler this run fitted, for archiving
    y_scaled = (scaler.transform(data.y.astype(np.float64)) if scaler is not None else data.y).astype(np.float32)

    # Archived weights first, before training touches any RNG state: this
    # isolates inference drift (same weights, this environment) from training drift.
    archived_metrics = None
    channels = int(data.X.shape[1])
    probe = model_mod.build(data.n_features, data.n_targets, bundle.model, channels)
    if bundle.best_weights:
        state = model_mod.load_checked(bundle.best_weights, probe)
        probe.load_state_dict(state)
        probe.to(device)
        archived_metrics = _evaluate(probe, data, split, scaler, device, y_scaled)
        rec.archived_weights_sha256 = model_mod.state_sha256(state)
    if bundle.last_weights:
        model_mod.load_checked(bundle.last_weights,
                               model_mod.build(data.n_features, data.n_targets, bundle.model, channels))
    del probe

    trace_fh = open(out / "trace.jsonl", "w", encoding="utf-8") if spec.trace else None

    def on_step(epoch: int, step: int, loss: float) -> None:
        if trace_fh is not None:
            trace_fh.write(json.dumps({"epoch": epoch, "step": step, "loss": loss.hex()}) + "\n")

    def progress(epoch: int, epochs: int, row: dict[str, float]) -> None:
        emit("epoch", cell=spec.cell, epoch=epoch, epochs=epochs, val_loss=row.get("val_loss"))

    t0 = time.perf_counter()
    try:
        net, result = train_reference(data, split, y_scaled, bundle.model, bundle.training, device,
                                      progress=progress, on_step=on_step if trace_fh else None)
    finally:
        if trace_fh is not None:
            trace_fh.close()
    rec.train_s = time.perf_counter() - t0
    net.load_state_dict(result.best_state)
    retrained = _evaluate(net, data, split, scaler, device, y_scaled)
    retrained["val_loss"] = result.val_loss  # the objective's value: best epoch's validation loss
    retrained["best_epoch"] = result.best_epoch
    rec.metrics = {"retrained": retrained, "archived": archived_metrics}
    rec.history = result.history
    wdir = out / "weights"
    wdir.mkdir(parents=True, exist_ok=True)
    save_weights(result.best_state, wdir / "best.pt")
    save_weights(result.last_state, wdir / "last.pt")
    rec.weights_sha256 = model_mod.state_sha256(result.best_state)
    if bundle.best_weights:
        rec.weights_vs_archived = compare_state(result.best_state, state)
    rec.last_weights_sha256 = model_mod.state_sha256(result.last_state)


def compare_state(retrained: Any, archived: Any) -> dict[str, Any]:
    """Two state dicts tensor by tensor: identical, the first differing name (sorted), the largest |difference|."""
    import torch

    first = None
    max_diff = 0.0
    for name in sorted(set(retrained) | set(archived)):
        a, b = retrained.get(name), archived.get(name)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            return {"identical": False, "first_difference": first or name, "max_abs_diff": None}
        a, b = a.detach().cpu(), b.detach().cpu()
        if torch.equal(a, b):
            continue
        first = first or name
        if a.is_floating_point() or a.is_complex():
            d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        else:
            d = float((a.long() - b.long()).abs().max()) if a.numel() else 0.0
        max_diff = max(max_diff, d if d == d else float("inf"))
    return {"identical": first is None, "first_difference": first, "max_abs_diff": max_diff}


def _load_archived_state(path: str) -> Any:
    """The bundle's best weights as a state dict (``weights_only=True``), or None when they are not one."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the trainer's own format; nothing to compare tensor by tensor
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and all(hasattr(v, "detach") for v in state.values()):
        return state
    return None


def _custom_run(spec: RunSpec, bundle: Any, device: Any, out: Path, rec: ResultRecord) -> None:
    import torch

    from .model import state_sha256
    from .trainer_api import TrainerContext, call, normalise_result, resolve

    assert bundle.trainer is not None
    entry = bundle.trainer.entrypoint
    func = resolve(entry, bundle.trainer.code_dirs)
    scaler = _load_scaler(bundle.scaler_path) if bundle.scaler_path else None
    history: list[dict[str, float]] = []

    def progress(epoch: int, epochs: int, row: dict[str, float]) -> None:
        history.append(row)
        emit("epoch", cell=spec.cell, epoch=epoch, epochs=epochs, val_loss=row.get("val_loss"))

    ctx = TrainerContext(config=bundle.config, seed=bundle.training.seed, device=str(device),
                         bundle_dir=bundle.root, data_path=bundle.data.resolved, out_dir=str(out),
                         scaler=scaler, _progress=progress, _data_spec=bundle.data)
    t0 = time.perf_counter()
    try:
        result = call(func, ctx)
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's trainer failed
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        failure = RunFailed(f"trainer {entry} raised {exc.__class__.__name__}: {exc}")
        failure.user_traceback = tb  # type: ignore[attr-defined]
        raise failure from None
    rec.train_s = time.perf_counter() - t0
    got = normalise_result(result, entry)
    rec.metrics = {"retrained": got["metrics"], "archived": None}
    rec.history = history
    state = got["state"]
    written = out / "weights" / "best.pt"
    if state is None and written.is_file():  # a trainer that saved its best weights into out_dir
        state = _load_archived_state(str(written))
    if state is not None:
        state = {k: v.detach().cpu() for k, v in state.items()}
        (out / "weights").mkdir(parents=True, exist_ok=True)
        save_weights(state, written)
        rec.weights_sha256 = state_sha256(state)
        if bundle.best_weights:
            archived = _load_archived_state(bundle.best_weights)
            if archived is not None:
                rec.archived_weights_sha256 = state_sha256(archived)
                rec.weights_vs_archived = compare_state(state, archived)
    if got["user_digest"]:
        recorded = bundle.recorded.weights_sha256 if bundle.recorded else None
        rec.user_weights = {"sha256": got["user_digest"], "recorded": recorded,
                            "identical_to_recorded": None if recorded is None else got["user_digest"] == recorded}
    rec.trainer = {"entrypoint": entry, "code_dir": bundle.trainer.code_dir, "code_dirs": list(bundle.trainer.code_dirs)}
    rec.extra = got["extra"] if isinstance(got["extra"], dict) else {"value": got["extra"]}


def _sha_json(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def run(spec: RunSpec) -> ResultRecord:
    """Run one cell and return its record (raises HarnessError on failure). Measures; never judges."""
    from ..bundle import load_bundle
    from ..preflight import expected_data_digests
    from . import determinism, envinfo, isa
    from .data import prepare, require_exists, sha256_path

    t_start = time.perf_counter()
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.determinism not in determinism.MODES:
        raise InputError("--determinism", f"unknown mode {spec.determinism!r}", hint=f"use one of {', '.join(determinism.MODES)}")
    missing = determinism.missing_launch_env(spec.determinism)
    if missing:
        raise RunFailed(f"the worker started without {', '.join(missing)} in its environment; these must be set before "
                        "Python starts (start it through `harness`, or export them first)")
    bundle = load_bundle(spec.bundle_dir, data_override=spec.data_path,
                         trainer_override=spec.trainer, trainer_path=spec.trainer_path)

    import torch

    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device", f"{spec.device} requested but torch {torch.__version__} sees no CUDA device",
                         hint="use --device cpu, or run where a GPU and driver are visible")
    device = torch.device(spec.device)
    determinism.apply(spec.determinism, tf32=spec.tf32, threads=spec.threads)
    determinism.set_seed(bundle.training.seed)

    emit("start", cell=spec.cell, epochs=bundle.training.epochs)
    rec = ResultRecord(
        cell=spec.cell, status=Status.OK, harness_version=__version__, started_at=_now(), backend=spec.backend,
        spec=spec.to_dict(), labels=dict(spec.labels),
        bundle={"path": bundle.root, "trial": bundle.recorded.number if bundle.recorded else None},
        env=Env.from_json({**envinfo.measure(spec.device), **isa.capture(spec.isa)}, "env"),
    )
    isa_warning = isa.mismatch(spec.isa, rec.env.cpu_capability)
    if isa_warning:
        rec.warnings.append(isa_warning)
    if bundle.data.resolved is not None:
        rec.data_sha256 = sha256_path(bundle.data.resolved)  # bytes, whatever the format
        rec.data = {"path": bundle.data.path, "file": Path(bundle.data.resolved).name}
    else:
        rec.warnings.append("config.yaml has no data.path: the trainer found its own data, which was not hashed")
    rec.expected_data_sha256 = expected_data_digests(bundle)
    if bundle.trainer is not None:  # its data is its own: hashed, never opened here
        if bundle.data.resolved is not None:
            require_exists(bundle.data.resolved)
        _custom_run(spec, bundle, device, out, rec)
    else:
        rec.data.update({"exclude_channels": list(bundle.data.exclude_channels), "downsample": bundle.data.downsample,
                         "split": list(bundle.data.split)})
        data = prepare(bundle.data)
        rec.data["shape"] = list(data.raw_shape)
        rec.data["targets"] = data.target_names
        _reference_run(spec, bundle, data, device, out, rec)
    rec.determinism = determinism.capture(spec.determinism, bundle.training.seed)
    recorded = bundle.recorded
    rec.recorded = None if recorded is None else {
        "number": recorded.number, "value": recorded.value, "params": recorded.params, "r2": recorded.r2,
        "mse": recorded.mse, "mae": recorded.mae, "data_sha256": recorded.data_sha256,
        "weights_sha256": recorded.weights_sha256,
    }
    if recorded is None:
        rec.warnings.append("no trial_info.yaml: nothing recorded to compare with")
    rec.finished_at = _now()
    rec.wall_s = time.perf_counter() - t_start
    return rec


def _parse(argv: list[str] | None) -> RunSpec:
    p = argparse.ArgumentParser(prog="python -m harness.worker", description="Run one harness cell (the retrain entry point).")
    p.add_argument("--spec", help="a RunSpec JSON file (what backends pass)")
    p.add_argument("--bundle", help="the optuna_best directory")
    p.add_argument("--out", help="directory for record.json and weights")
    p.add_argument("--cell", default="run")
    p.add_argument("--data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--determinism", default="strict")
    p.add_argument("--threads", type=int)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--trainer")
    p.add_argument("--trainer-path", action="append")
    p.add_argument("--trace", action="store_true")
    a = p.parse_args(argv)
    if a.spec:
        path = Path(a.spec)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(str(path), f"cannot be read as JSON ({exc})") from None
        try:
            return RunSpec.from_json(data, str(path))
        except InputError:
            # Write the refusal where the launcher looks for the record, when the spec says where.
            if isinstance(data, dict) and isinstance(data.get("out_dir"), str) and isinstance(data.get("cell"), str):
                _SPEC_FALLBACK.update(cell=data["cell"], out_dir=data["out_dir"])
            raise
    if not a.bundle or not a.out:
        p.error("give --spec FILE, or --bundle DIR and --out DIR")
    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return RunSpec(cell=a.cell, bundle_dir=a.bundle, out_dir=a.out, data_path=a.data, device=device,
                   determinism=a.determinism, threads=a.threads, tf32=a.tf32, trainer=a.trainer,
                   trainer_path=a.trainer_path, trace=a.trace, backend="standalone")


_SPEC_FALLBACK: dict[str, str] = {}


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        spec = _parse(argv)
    except HarnessError as exc:
        print(f"harness.worker: {exc.one_line()}", file=sys.stderr)
        if _SPEC_FALLBACK:
            write(Path(_SPEC_FALLBACK["out_dir"]) / "record.json", ResultRecord.without_metrics(
                _SPEC_FALLBACK["cell"], Status.FAILED, exc.kind, exc.one_line(), harness_version=__version__))
        return exc.exit_code
    try:
        rec = run(spec)
        code = EXIT_OK
    except HarnessError as exc:
        rec = ResultRecord.without_metrics(spec.cell, Status.FAILED, exc.kind, exc.one_line(), spec=spec.to_dict(),
                                           harness_version=__version__, wall_s=time.perf_counter() - t0,
                                           exit_status=exc.exit_code, traceback=getattr(exc, "user_traceback", None))
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - anything else is a failed run, with its traceback kept
        disk = disk_failure(exc) if isinstance(exc, OSError) else None
        if disk is not None:  # a full (or read-only) disk: one line, no traceback to read
            rec = ResultRecord.without_metrics(spec.cell, Status.FAILED, "disk", disk, spec=spec.to_dict(),
                                               harness_version=__version__, wall_s=time.perf_counter() - t0,
                                               exit_status=RunFailed.exit_code)
        else:
            rec = ResultRecord.without_metrics(spec.cell, Status.FAILED, "run", f"{exc.__class__.__name__}: {exc}",
                                               spec=spec.to_dict(), harness_version=__version__,
                                               wall_s=time.perf_counter() - t0, exit_status=RunFailed.exit_code,
                                               traceback=traceback.format_exc())
        code = RunFailed.exit_code
    write(spec.record_path, rec)
    emit("done", cell=spec.cell, status=rec.status.value)
    if code != EXIT_OK and rec.error is not None:
        print(f"harness.worker: {rec.error.message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
