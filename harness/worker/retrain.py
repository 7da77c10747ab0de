"""The retrain entry point: one run of one cell, in the process that trains.

Started by a backend (a local child process, or a container's ENTRYPOINT) as::

    python -m harness.worker --spec spec.json
    python -m harness.worker --bundle DIR --out DIR --cell NAME [--device cuda] ...

It is the only process that loads the target scaler (joblib, i.e. pickle: code)
and the only one that trains (a trainer command is its child: harness.worker.trainer_cmd).
It writes ``OUT/record.json`` atomically whatever happens, and prints progress
events on stdout as ``HARNESS-EVENT {json}`` lines. Exit status: 0 ok, 2 bad input, 1 the run failed.

This module and what it imports need only torch, numpy, pyyaml, joblib and
scikit-learn: it runs inside the minimal images.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from . import EVENT_PREFIX
from ..errors import EXIT_OK, ErrorKind, HarnessError, InputError, RunFailed, disk_failure
from ..record import Env, ResultRecord, RunSpec, Status, write
from ..safeio import CellPaths, atomic_write
from .seed_checks import scaler_check as _scaler_check
from .seed_checks import sha_json as _sha_json



def emit(event: str, **data: Any) -> None:
    """One progress event on stdout, for the launcher's progress bar."""
    print(EVENT_PREFIX + json.dumps({"event": event, **data}, sort_keys=True), flush=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- files


def save_weights(state: Any, path: Path) -> None:
    """``torch.save`` atomically (:func:`harness.safeio.atomic_write`): never a truncated file.

    torch's zip writer turns a short write (a full disk, a quota, a file size limit) into
    ``RuntimeError: ... unexpected pos``, which names no cause. On a RuntimeError the same
    bytes are serialised in memory and written through the file object, whose ``write``
    raises the ``OSError`` with its errno; a RuntimeError that is not the disk's is raised
    again by that second ``torch.save``. An OSError without a file name gets ``path``.
    """
    import io

    import torch

    def write(fh: Any) -> None:
        try:
            torch.save(state, fh)
        except RuntimeError:
            fh.seek(0)  # flushes what torch left buffered: a full disk raises its OSError here
            fh.truncate()
            buf = io.BytesIO()
            torch.save(state, buf)
            if fh.write(buf.getbuffer()) != buf.getbuffer().nbytes:  # a short write that raised nothing
                raise

    try:
        atomic_write(path, write)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


# --------------------------------------------------------------------------- scaler


def _load_scaler(path: str, custom: bool = False) -> Any:
    """Load the archived scaler. joblib files are pickles: this executes code from the bundle.

    The reference trainer needs ``transform()``/``inverse_transform()``; a custom trainer's
    file is its own business (``custom``): the object is handed over as it is (``ctx.scaler``),
    and the scaler check says in the record what it could not do with it.
    """
    import joblib

    try:
        scaler = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise InputError(path, f"cannot be loaded as a joblib scaler ({exc.__class__.__name__}: {exc})",
                         hint="re-export it with joblib.dump(scaler, path), or remove it to refit on the train split") from None
    for attr in (() if custom else ("transform", "inverse_transform")):
        if not callable(getattr(scaler, attr, None)):
            raise InputError(path, f"holds a {type(scaler).__name__}, which has no {attr}()",
                             hint="archive the fitted target scaler (e.g. sklearn StandardScaler)")
    return scaler


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


def scaled_targets(bundle: Any, data: Any, split: Any) -> tuple[Any, Any, dict[str, Any], Any]:
    """The reference trainer's targets: (the archived scaler or None, the scaler used or None, the record's
    ``scaler`` part, the targets in the scaled space as float32). The archived scaler is used, checked against
    one refitted on the train split; without one, a scaler is fitted there (unless the config scales nothing)."""
    import numpy as np

    archived = _load_scaler(bundle.scaler_path) if bundle.scaler_path else None
    y_train = data.y[split.train].astype(np.float64)
    if not bundle.training.scale_targets and archived is None:  # no scaler: scikit-learn is not imported
        scaler, info = None, {"archived": False, "used": "none"}
    else:
        scaler, info = _scaler_check(archived, y_train)
    y_scaled = (scaler.transform(data.y.astype(np.float64)) if scaler is not None else data.y).astype(np.float32)
    return archived, scaler, info, y_scaled


def _reference_run(spec: RunSpec, bundle: Any, data: Any, device: Any, out: Path, rec: ResultRecord) -> None:
    import torch

    from . import model as model_mod
    from .perturb import Perturber
    from .train import split_indices, train_reference

    split = split_indices(len(data.X), bundle.data.split, bundle.training.data_split_seed)
    rec.split = {"sizes": [len(split.train), len(split.val), len(split.test)],
                    "indices_sha256": _sha_json([split.train, split.val, split.test])}

    archived_scaler, scaler, rec.scaler, y_scaled = scaled_targets(bundle, data, split)
    if archived_scaler is None and scaler is not None:
        import joblib

        joblib.dump(scaler, CellPaths(out).scaler)  # the scaler this run fitted, for archiving

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

    from .trace import TRACE_FILE, TraceWriter

    tracer = TraceWriter(out / TRACE_FILE, "reference") if spec.trace else None

    def on_step(epoch: int, step: int, loss: float, model: Any) -> None:
        if tracer is not None:
            tracer.step(epoch, loss, model)

    def progress(epoch: int, epochs: int, row: dict[str, float]) -> None:
        emit("epoch", cell=spec.cell, epoch=epoch, epochs=epochs, val_loss=row.get("val_loss"))

    perturber = Perturber(spec.perturb)

    def perturb(model: Any) -> None:
        perturber(model, via="the reference trainer, right after building the model")

    t0 = time.perf_counter()
    try:
        net, result = train_reference(data, split, y_scaled, bundle.model, bundle.training, device,
                                      progress=progress, on_step=on_step if tracer else None,
                                      perturb=perturb if spec.perturb else None, data_path=spec.data_feed)
    finally:
        if tracer is not None:
            rec.trace = tracer.close()
    rec.perturbation = perturber.record("the reference model was never built")
    rec.train_s = time.perf_counter() - t0
    rec.data_feed = result.extra.get("data_path")
    if rec.data_feed and rec.data_feed.fell_back:
        rec.warnings.append(f"--data-path fast was not used: {rec.data_feed.proof}")
    net.load_state_dict(result.best_state)
    retrained = _evaluate(net, data, split, scaler, device, y_scaled)
    retrained["val_loss"] = result.val_loss  # the objective's value: best epoch's validation loss
    retrained["best_epoch"] = result.best_epoch
    rec.metrics = {"retrained": retrained, "archived": archived_metrics}
    rec.history = result.history
    files = CellPaths(out)
    files.weights.mkdir(parents=True, exist_ok=True)
    save_weights(result.best_state, files.best)
    save_weights(result.last_state, files.last)
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


def _archived_through_hooks(ctx: Any, predict: Any, bundle: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """The archived best weights evaluated through config.yaml's trainer.model_fn / trainer.predict.

    Returns the metrics (None when they cannot be had) and the record's account:
    ``{model_fn, predict, loaded, evaluated, why}``; ``why`` says what is missing.
    """
    from .trainer_api import MODEL_ARGUMENTS, as_hook_result, call_hook, load_strict, normalise_result

    trainer = bundle.trainer
    info: dict[str, Any] = {"model_fn": trainer.model_fn, "predict": trainer.predict, "loaded": None,
                            "evaluated": False, "why": None}
    if ctx.model_fn is None:
        info["why"] = ("trainer.predict needs trainer.model_fn to build the model" if predict is not None else
                       "config.yaml names no trainer.model_fn/trainer.predict hooks: the archived weights were not "
                       "evaluated")
        return None, info
    if not bundle.best_weights:
        info["why"] = "the bundle has no weights/best.pt to evaluate"
        return None, info
    weights = f"{Path(bundle.best_weights).parent.name}/{Path(bundle.best_weights).name}"
    state = _load_archived_state(bundle.best_weights)
    if state is None:
        info.update(loaded=False, why=f"{weights} is not a state dict torch.load(weights_only=True) can read")
        return None, info
    model = ctx.build_model()
    load_strict(model, state, f"trainer.model_fn {trainer.model_fn}", weights)
    info["loaded"] = True
    if predict is None:
        info["why"] = "no trainer.predict hook: the archived weights load into trainer.model_fn's model but were not evaluated"
        return None, info
    model.to(device)
    model.eval()
    what = f"trainer.predict {trainer.predict}"
    result = call_hook(predict, ctx, what, extra=dict.fromkeys(MODEL_ARGUMENTS, model), first=model)
    metrics = normalise_result(as_hook_result(result), what)["metrics"]
    if not any(k in metrics for k in ("val", "test", "val_loss")):
        raise InputError("config.yaml", f"{what} returned no predictions or metrics for the val or test split",
                         hint="return {val: (y_true, y_pred), test: ...} in original units, or metrics as a trainer does")
    info["evaluated"] = True
    return metrics, info


NO_STEP_SEEN = ("{trainer} made no torch.optim optimizer step the hooks could see (an optimizer that is not a "
                "torch.optim.Optimizer, e.g. a hand-written or C++ update): no trace was written; calling "
                "ctx.on_step(model, loss) after each step gives one")


def _custom_run(spec: RunSpec, bundle: Any, device: Any, out: Path, rec: ResultRecord) -> None:
    import copy

    import torch  # noqa: F401 - imported (and seeded) before the user's module is

    from . import determinism, seed_checks
    from .perturb import Perturber
    from .trainer_api import TrainerContext, call_hook, normalise_result, resolve

    assert bundle.trainer is not None
    trainer = bundle.trainer
    entry = trainer.entrypoint
    _USER_CODE_IN_PROCESS.append(entry)  # its atexit handlers and open files are its own: exit in full
    # the job always passes the entrypoint on: it is config.yaml's when it is what config.yaml says, else --trainer's
    written = bundle.config.get("trainer")
    from_config = isinstance(written, dict) and written.get("entrypoint") == entry
    func = resolve(entry, trainer.code_dirs, "config.yaml trainer.entrypoint" if from_config else "--trainer")
    model_fn = resolve(trainer.model_fn, trainer.code_dirs, "config.yaml trainer.model_fn") if trainer.model_fn else None
    predict = resolve(trainer.predict, trainer.code_dirs, "config.yaml trainer.predict") if trainer.predict else None
    scaler = _load_scaler(bundle.scaler_path, custom=True) if bundle.scaler_path else None
    history: list[dict[str, float]] = []

    def progress(epoch: int, epochs: int, row: dict[str, float]) -> None:
        history.append(row)
        emit("epoch", cell=spec.cell, epoch=epoch, epochs=epochs, val_loss=row.get("val_loss"))

    def context(perturber: Any = None) -> TrainerContext:
        return TrainerContext(config=bundle.config, seed=bundle.training.seed, device=str(device),
                              bundle_dir=bundle.root, data_path=bundle.data.resolved, out_dir=str(out),
                              scaler=scaler, model_fn=model_fn, model_fn_name=trainer.model_fn, _progress=progress,
                              _data_spec=bundle.data, _scaler_reference=copy.deepcopy(scaler),
                              _perturber=perturber, _split_seed=bundle.training.split_seed)

    # Archived weights first, before the trainer touches any RNG state (as the reference run
    # orders it): inference drift, measured apart from training drift. Then the seed again.
    archived_metrics, archived_info = _archived_through_hooks(context(), predict, bundle, device)
    determinism.set_seed(bundle.training.seed)
    ctx = context(Perturber(spec.perturb) if spec.perturb else None)  # what the hooks did is not what the trainer did
    from .hooks import TorchHooks
    from .trace import TRACE_FILE, no_trace

    # A band member or --trace without ctx: PyTorch's process-wide hooks do it (harness.worker.hooks).
    ctx._trace_path = str(out / TRACE_FILE) if spec.trace else None
    hooks = ctx._hooks = TorchHooks(perturber=ctx._perturber, trace=out / TRACE_FILE if spec.trace else None)
    t0 = time.perf_counter()
    hooked: dict[str, Any] = {"perturbation": None, "trace": None}
    try:
        hooks.install()
        result = call_hook(func, ctx, f"trainer {entry}")
    finally:
        hooked = hooks.close()
        if ctx._tracer is not None:
            rec.trace = ctx._tracer.close()
        elif spec.trace:
            rec.trace = hooked["trace"]
            if rec.trace is None or not rec.trace.steps:
                (out / TRACE_FILE).unlink(missing_ok=True)
                rec.trace = no_trace(NO_STEP_SEEN.format(trainer=f"the trainer {entry}"))
    rec.train_s = time.perf_counter() - t0
    rec.perturbation = hooked["perturbation"]
    got = normalise_result(result, entry)
    rec.history = history
    facts = _keep_custom_result(bundle, out, rec, got, archived_metrics)
    checks = ctx._checks
    _returned_checks(checks, got, ctx._scaler_reference)
    rec.split = seed_checks.split_record(checks, bundle.data.split, bundle.data.split_note, bundle.training.data_split_seed)
    rec.scaler = checks.scaler or {"archived": scaler is not None, "refit_matches": None, "max_abs_diff": None,
                                   "why": seed_checks.NO_SCALER_CHECK}
    rec.trainer = {"entrypoint": entry, "code_dir": trainer.code_dir, "code_dirs": list(trainer.code_dirs),
                   "archived": archived_info, **facts}


def _returned_checks(checks: Any, got: dict[str, Any], scaler_reference: Any) -> None:
    """What a trainer returned for the seed's checks (split, length, train targets), where it did not call ctx for them."""
    from . import seed_checks

    if checks.reported is None and got["split_indices"] is not None:
        checks.reported = got["split_indices"]
    if checks.declared_n is None and got["n_samples"] is not None:
        checks.declared_n = got["n_samples"]
    if checks.scaler is None and got["y_train"] is not None:
        key, y_train = got["y_train"]
        checks.scaler = seed_checks.custom_scaler_check(scaler_reference, y_train, f"returned {key}")


def _keep_custom_result(bundle: Any, out: Path, rec: ResultRecord, got: dict[str, Any],
                        archived: Any = None) -> dict[str, Any]:
    """A custom trainer's normalised result into the record: metrics, weights against the archive, its own digest.

    Returns the facts for the record's ``trainer`` section: ``seed_key`` (where the seed was read and,
    in a seed band member, written), ``objective`` (trainer.objective, None when not declared) and
    ``weights`` (which file was compared with which archived one and how it was chosen, or why not).
    """
    from . import checkpoint
    from .model import state_sha256

    rec.metrics = {"retrained": got["metrics"], "archived": archived}
    trainer = bundle.trainer
    state = got["state"]
    weights: dict[str, Any] = {"file": None, "archived": None, "how": None}
    if trainer.weights is None and state is not None:
        weights["how"] = "returned"
    else:
        found = checkpoint.find(out, trainer.weights)
        weights.update(file=found.file, how=found.how, why=found.why)
        for link in found.links:
            rec.warnings.append(f"{link} in the output directory is a link; it was not followed")
        state = None
        if found.file is not None:
            try:
                state, source = checkpoint.load(out, found.file)
            except checkpoint.Unreadable as exc:
                weights["why"] = f"{exc}: the weights were not compared"
                if found.how == "declared":
                    rec.warnings.append(f"trainer.weights: {weights['why']}")
            else:
                weights["tensors_from"] = source  # the checkpoint's sub-mapping compared (None: the whole file)
    if state is not None:
        state = {k: v.detach().cpu() for k, v in state.items()}
        wdir = CellPaths(out).weights
        if weights["file"] != checkpoint.BEST and not wdir.is_symlink():
            wdir.mkdir(parents=True, exist_ok=True)
            save_weights(state, out / checkpoint.BEST)  # what export carries; the trainer's own file stays as written
            weights["saved"] = checkpoint.BEST
        rec.weights_sha256 = state_sha256(state)
        name = Path(weights["file"]).name if weights["file"] else None
        weights["archived"] = checkpoint.archived_counterpart(bundle.root, name, bundle.best_weights)
        if weights["archived"] is None:
            weights["why"] = "the bundle has no weights to compare with"
        else:
            try:
                kept, _ = checkpoint.load(Path(bundle.root), weights["archived"], follow=True)
            except checkpoint.Unreadable as exc:
                weights["why"] = f"the bundle's {exc}: the weights were not compared"
            else:
                rec.archived_weights_sha256 = state_sha256(kept)
                rec.weights_vs_archived = compare_state(state, kept)
    if got["user_digest"]:
        recorded = bundle.recorded.weights_sha256 if bundle.recorded else None
        rec.user_weights = {"sha256": got["user_digest"], "recorded": recorded,
                            "identical_to_recorded": None if recorded is None else got["user_digest"] == recorded}
    rec.extra = got["extra"] if isinstance(got["extra"], dict) else {"value": got["extra"]}
    return {"seed_key": bundle.training.seed_key, "objective": trainer.objective, "weights": weights}


def _member_config(bundle: Any, out: Path) -> str:
    """A seed band member's config.yaml for a trainer command (``{config}``, ``$HARNESS_CONFIG``): the bundle's,
    with the member's seed at the key it was read from (``training.seed_key``); written into the cell's directory."""
    import yaml

    path = CellPaths(out).member_config
    from ..safeio import atomic_write_text

    config = dict(bundle.config)
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and bundle.data.resolved is not None:
        config["data"] = {**data, "path": bundle.data.resolved}  # the copy lies elsewhere: its data path, absolute
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _command_run(spec: RunSpec, bundle: Any, device: Any, out: Path, rec: ResultRecord, workdir: str) -> None:
    """A command as the trainer (harness.worker.trainer_cmd): run it in ``workdir``, then read its metrics and weights."""
    import shutil
    import tempfile

    from ..bundle import CONFIG, split_command
    from . import trainer_cmd as tc
    from .trainer_api import normalise_result

    trainer = bundle.trainer
    code_dirs = list(trainer.code_dirs)
    config = str(Path(bundle.root) / CONFIG) if spec.seed is None else _member_config(bundle, out)
    # every check of the bundle that can refuse the run happens before the command trains
    scaler = _load_scaler(bundle.scaler_path, custom=True) if bundle.scaler_path else None
    values = {"bundle": bundle.root, "config": config, "data": bundle.data.resolved, "out_dir": str(out),
              "seed": str(bundle.training.seed), "device": str(device), "python": sys.executable,
              "code_dir": code_dirs[0] if code_dirs else None}
    argv = tc.substitute(split_command(trainer.command), values)
    from .trace import TRACE_FILE, no_trace

    for stale in (tc.METRICS_FILE, CellPaths.BEST, TRACE_FILE):
        tc.remove_stale(out / stale)  # a standalone worker's --out may hold an earlier run's
    history: list[dict[str, float]] = []

    def on_line(line: str) -> None:
        row = tc.child_event(line)
        if row is not None:
            history.append(row)
            emit("epoch", cell=spec.cell, epoch=row["epoch"], epochs=int(row.get("epochs", bundle.training.epochs)),
                 val_loss=row.get("val_loss"))

    private = Path(tempfile.mkdtemp(prefix="harness-cmd-"))
    try:
        markers = private / "markers"
        markers.mkdir()
        site = tc.install_site(private / "site")
        env = tc.command_env(os.environ, seed=bundle.training.seed, device=str(device), bundle=bundle.root,
                             config=config, data=bundle.data.resolved, out_dir=str(out), determinism=spec.determinism,
                             threads=spec.threads, tf32=spec.tf32, code_dirs=code_dirs, site_dir=str(site),
                             markers=str(markers), worker_pid=os.getpid(), perturb=spec.perturb,
                             trace=str(out / TRACE_FILE) if spec.trace else None)
        t0 = time.perf_counter()
        done = tc.run_command(argv, cwd=workdir, env=env, out_dir=out, on_line=on_line)
        rec.train_s = time.perf_counter() - t0
        processes = tc.read_markers(markers)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if done.exit_status != 0:
        last = next((ln.strip() for ln in reversed(done.stderr_tail.splitlines()) if ln.strip()), "")
        failure = RunFailed(f"the trainer command {done.how}" + (f": {last}" if last else "")
                            + f" (stderr in {tc.STDERR_LOG})")
        failure.log_tail = done.stderr_tail or None  # type: ignore[attr-defined]
        failure.missing_file = any(w in done.stderr_tail for w in MISSING_FILE_WORDS)  # type: ignore[attr-defined]
        raise failure
    metrics_file = out / tc.METRICS_FILE
    mapping = tc.read_metrics_file(metrics_file)
    source = f"$HARNESS_METRICS_FILE ({tc.METRICS_FILE})"
    if mapping is None:
        found = tc.metrics_from_stdout(done.stdout)
        if found is None:
            failure = RunFailed(f"the trainer command left no metrics: it wrote no $HARNESS_METRICS_FILE "
                                f"({metrics_file}), and its stdout ({tc.STDOUT_LOG}) holds no JSON object on one line "
                                "and no YAML mapping after a '---' line")
            failure.log_tail = done.stdout[-tc.TAIL_CHARS:] or None  # type: ignore[attr-defined]
            raise failure
        mapping, source = found
    got = normalise_result(mapping, f"the trainer command's {source}")
    if not got["metrics"]:
        raise RunFailed(f"the trainer command's {source} holds no metric (keys: {', '.join(map(str, mapping)) or 'none'}); "
                        "see docs/your-own-project.md#a-script-as-the-trainer for the accepted names")
    rec.history = history
    rec.perturbation, hook_warnings = tc.hooks_outcome(processes, spec.perturb)
    rec.warnings.extend(hook_warnings)
    if spec.trace:
        traced, trace_warnings = tc.trace_outcome(processes)
        rec.warnings.extend(trace_warnings)
        rec.trace = traced or no_trace(NO_STEP_SEEN.format(trainer="the trainer command"))
        if traced is None:
            tc.remove_stale(out / TRACE_FILE)
    facts = _keep_custom_result(bundle, out, rec, got)
    # What the command returned for the seed's checks (it has no ctx to call): split, length, train targets.
    from . import seed_checks

    checks = seed_checks.Checks()
    _returned_checks(checks, got, scaler)
    rec.split = seed_checks.split_record(checks, bundle.data.split, bundle.data.split_note, bundle.training.data_split_seed)
    rec.scaler = checks.scaler or {"archived": scaler is not None, "refit_matches": None, "max_abs_diff": None,
                                   "why": seed_checks.NO_SCALER_CHECK}
    seeded = [p for p in processes if p.get("seeded") and not p.get("error")]
    rec.trainer = {
        "command": trainer.command, "argv": argv, "cwd": workdir, "code_dir": trainer.code_dir, "code_dirs": code_dirs,
        "exit_status": done.exit_status, "metrics_from": source, "stdout_log": tc.STDOUT_LOG, "stderr_log": tc.STDERR_LOG,
        "seeded_by_harness": bool(seeded), "python_processes": processes[:tc.MARKERS_KEPT], "config": config, **facts,
    }
    if not processes:
        rec.warnings.append("the trainer command started no Python process the harness could seed (a non-Python "
                            "program, or python -S/-I): it got HARNESS_SEED and the other variables only, so its "
                            "seeding is its own")
    for p in processes:
        if p.get("error"):
            rec.warnings.append(f"the seeding hook failed in {p.get('executable')} (pid {p.get('pid')}): {p['error']}")


MISSING_FILE_WORDS = ("FileNotFoundError", "No such file")  # a command's stderr saying a file was not found


def trainer_workdir(bundle: Any, out: Path) -> tuple[str | None, str]:
    """Where a custom trainer runs, and the record's ``cwd_mode`` (pure).

    ``trainer.cwd: bundle``: the optuna_best directory; ``project``: its first code directory
    (``/harness/trainer/0`` in a container). Unset (``default``): a function stays in the worker's
    own working directory (None), a command runs in its cell's directory.
    """
    trainer = bundle.trainer
    if trainer.cwd == "bundle":
        return bundle.root, "bundle"
    if trainer.cwd == "project":
        return trainer.code_dirs[0], "project"
    return (str(out) if trainer.command is not None else None), "default"


@contextlib.contextmanager
def _working_dir(path: str | None) -> Iterator[None]:
    """Run the block in ``path`` (None: where the worker is), then come back, whatever the block did."""
    if path is None:
        yield
        return
    before = os.getcwd()
    try:
        os.chdir(path)
    except OSError as exc:
        raise InputError(path, f"cannot be the trainer's working directory ({exc.strerror or exc})",
                         hint="check trainer.cwd and the folder it names") from None
    try:
        yield
    finally:
        os.chdir(before)


_CWD_WHY = {"bundle": "trainer.cwd: bundle, the optuna_best directory",
            "project": "trainer.cwd: project, its code directory"}
_CWD_FIX = {
    "default": "set trainer.cwd: project in config.yaml (or --trainer-cwd project) to run it in its code directory, "
               "where a relative data.path is looked up too, or trainer.cwd: bundle for the optuna_best directory; "
               "or give the data with --data",
    "bundle": "fix the path for that directory, or set trainer.cwd: project to run it in its code directory; "
              "or give the data with --data",
    "project": "fix the path for that directory, or set trainer.cwd: bundle to run it in the optuna_best directory; "
               "or give the data with --data",
}


def missing_file_hint(cwd: str, mode: str, command: bool) -> str:
    """The hint a trainer's FileNotFoundError gets: the directory it ran in, why that one, and the way out (pure)."""
    why = _CWD_WHY.get(mode) or ("trainer.cwd unset: the cell's results directory" if command else
                                 "trainer.cwd unset: the worker's own working directory")
    return f"the trainer ran in {cwd} ({why}), where relative paths are looked up: {_CWD_FIX[mode]}"


def _with_workdir(exc: HarnessError, cwd: str, mode: str, command: bool) -> HarnessError:
    """``exc`` with the trainer's working directory for the failed record, and, when the trainer did not find a
    file, the directory and the way out in its reason."""
    facts = {"cwd": cwd, "cwd_mode": mode}
    if getattr(exc, "missing_file", False) and exc.hint is None:
        failure = RunFailed(exc.message, hint=missing_file_hint(cwd, mode, command))
        for name in ("user_traceback", "log_tail"):
            if hasattr(exc, name):
                setattr(failure, name, getattr(exc, name))
        exc = failure
    exc.trainer_facts = facts  # type: ignore[attr-defined]
    return exc


def seed_via(bundle: Any) -> list[str]:
    """Where a seed member's seed reaches its trainer, in words, for the record (pure)."""
    rngs = "the global RNGs (random, numpy, torch) seeded before training"
    if bundle.trainer is None:
        return ["training.seed", rngs]
    if bundle.trainer.command is not None:
        from ..bundle import placeholders, split_command

        used = placeholders(split_command(bundle.trainer.command))
        copy = f"a copy of config.yaml with the seed at {bundle.training.seed_key}"
        return [*(["{seed} in the command"] if "seed" in used else []),
                *([f"{{config}} in the command: {copy}"] if "config" in used else []),
                f"the environment: HARNESS_SEED, and HARNESS_CONFIG ({copy})",
                "the global RNGs of every Python process of the command, seeded at interpreter start"]
    return [f"config.yaml {bundle.training.seed_key}, as the trainer is handed it", "the seed argument and ctx.seed",
            rngs]


def run(spec: RunSpec) -> ResultRecord:
    """Run one cell and return its record (raises HarnessError on failure). Measures; never judges."""
    from ..bundle import config_digest, expected_data_digests, load_bundle
    from . import determinism, envinfo, isa
    from .data import prepare, require_exists, sha256_path

    t_start = time.perf_counter()
    out = Path(spec.out_dir).absolute()  # a trainer may run elsewhere (trainer.cwd)
    out.mkdir(parents=True, exist_ok=True)
    if spec.determinism not in determinism.MODES:
        raise InputError("--determinism", f"unknown mode {spec.determinism!r}", hint=f"use one of {', '.join(determinism.MODES)}")
    missing = determinism.missing_launch_env(spec.determinism)
    if missing:
        raise RunFailed(f"the worker started without {', '.join(missing)} in its environment; these must be set before "
                        "Python starts (start it through `harness`, or export them first)")
    bundle = load_bundle(spec.bundle_dir, data_override=spec.data_path,
                         trainer_override=spec.trainer, trainer_path=spec.trainer_path,
                         trainer_cmd_override=spec.trainer_cmd, data_dir=spec.data_dir,
                         seed_key_override=spec.seed_key, trainer_cwd_override=spec.trainer_cwd)
    config_sha256 = config_digest(bundle.config)  # the bundle's own: a seed band member's too
    if spec.seed is not None:
        bundle = bundle.with_seed(spec.seed)

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
        bundle={"path": bundle.root, "trial": bundle.recorded.number if bundle.recorded else None,
                "config_sha256": config_sha256},
        env=Env.from_json({**envinfo.measure(spec.device), **isa.capture(spec.isa)}, "env"),
        band=dataclasses.replace(spec.band, seed=bundle.training.seed,
                                 seed_via=seed_via(bundle) if spec.seed is not None else None) if spec.band else None,
    )
    isa_warning = isa.mismatch(spec.isa, rec.env.cpu_capability)
    if isa_warning:
        rec.warnings.append(isa_warning)
    if bundle.data.resolved is not None:
        rec.data_sha256 = sha256_path(bundle.data.resolved)  # bytes, whatever the format
        rec.data = {"path": bundle.data.path, "file": Path(bundle.data.resolved).name}
        if bundle.data.dir is not None:  # --data-dir: the files beside the data are inputs too
            rec.data.update(dir=bundle.data.dir, dir_sha256=sha256_path(bundle.data.dir),
                            in_dir=Path(bundle.data.resolved).relative_to(bundle.data.dir).as_posix())
    else:
        rec.warnings.append("config.yaml has no data.path: the trainer found its own data, which was not hashed")
    rec.expected_data_sha256 = expected_data_digests(bundle)
    if bundle.trainer is not None:  # its data is its own: hashed, never opened here
        if spec.data_feed is not None:
            rec.warnings.append(f"--data-path {spec.data_feed} applies to the reference trainer only: "
                                "this trainer feeds its own data")
        if bundle.data.resolved is not None:
            require_exists(bundle.data.resolved)
        from .trainer_cmd import remove_stale

        remove_stale(CellPaths(out).best)  # a standalone worker's --out may hold an earlier run's
        workdir, mode = trainer_workdir(bundle, out)
        command = bundle.trainer.command is not None
        ran_in = workdir or os.getcwd()
        try:
            if command:
                _command_run(spec, bundle, device, out, rec, ran_in)
            else:
                with _working_dir(workdir):  # the function, its hooks and its module's import run there
                    _custom_run(spec, bundle, device, out, rec)
        except HarnessError as exc:
            raise _with_workdir(exc, ran_in, mode, command) from None
        rec.trainer = {**(rec.trainer or {}), "cwd": ran_in, "cwd_mode": mode}
    else:
        rec.data.update({"exclude_channels": list(bundle.data.exclude_channels), "downsample": bundle.data.downsample,
                         "split": list(bundle.data.split)})
        data = prepare(bundle.data)
        rec.data["shape"] = list(data.raw_shape)
        rec.data["targets"] = data.target_names
        _reference_run(spec, bundle, data, device, out, rec)
    if rec.perturbation is not None and not rec.perturbation.applied:
        rec.warnings.append(f"ulp band member not perturbed: {rec.perturbation.skipped}; "
                            "it is left out of the band")
    rec.determinism = determinism.capture(spec.determinism, bundle.training.seed, reference=bundle.trainer is None)
    rec.gpu_memory = envinfo.gpu_memory(torch)  # in-process trainers only: a command's GPU is its own process's
    recorded = bundle.recorded
    rec.recorded = None if recorded is None else {
        "number": recorded.number, "value": recorded.value, "params": recorded.params, "r2": recorded.r2,
        "mse": recorded.mse, "mae": recorded.mae, "data_sha256": recorded.data_sha256,
        "weights_sha256": recorded.weights_sha256,
        **({"environment": dict(recorded.environment)} if recorded.environment else {}),
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
    p.add_argument("--data-dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--determinism", default="strict")
    p.add_argument("--threads", type=int)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--trainer")
    p.add_argument("--trainer-path", action="append")
    p.add_argument("--trainer-cmd")
    p.add_argument("--seed-key")
    p.add_argument("--trainer-cwd", choices=("bundle", "project"))
    p.add_argument("--trace", action="store_true")
    p.add_argument("--data-path", dest="data_feed", choices=("loader", "fast"))
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
    return RunSpec(cell=a.cell, bundle_dir=a.bundle, out_dir=a.out, data_path=a.data, data_dir=a.data_dir, device=device,
                   determinism=a.determinism, threads=a.threads, tf32=a.tf32, trainer=a.trainer,
                   trainer_path=a.trainer_path, trainer_cmd=a.trainer_cmd, seed_key=a.seed_key,
                   trainer_cwd=a.trainer_cwd, trace=a.trace,
                   backend="standalone",
                   data_feed=a.data_feed)


_SPEC_FALLBACK: dict[str, str] = {}
_USER_CODE_IN_PROCESS: list[str] = []  # the custom trainer functions this process imported


def exit_now(code: int) -> None:
    """End the worker with ``code`` without tearing the interpreter down, when that loses nothing.

    Once ``record.json`` is written (atomically, closed) the process has nothing left to do,
    but a normal exit then unwinds torch, Dynamo (which every optimizer imports) and
    scikit-learn: about a second and a half of CPU per cell, measured on the bundled
    example. ``os._exit`` skips that after flushing stdout and stderr. Not when a custom
    trainer function ran in this process (its atexit handlers and buffered files must
    run and flush), nor under coverage measurement; then :func:`sys.exit` as usual.
    """
    if _USER_CODE_IN_PROCESS or "coverage" in sys.modules:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        spec = _parse(argv)
    except HarnessError as exc:
        print(f"harness.worker: {exc.one_line()}", file=sys.stderr)
        if _SPEC_FALLBACK:
            write(CellPaths(_SPEC_FALLBACK["out_dir"]).record, ResultRecord.without_metrics(
                _SPEC_FALLBACK["cell"], Status.FAILED, exc.kind, exc.one_line(), harness_version=__version__))
        return exc.exit_code
    try:
        rec = run(spec)
        code = EXIT_OK
    except HarnessError as exc:
        rec = ResultRecord.without_metrics(spec.cell, Status.FAILED, exc.kind, exc.one_line(), spec=spec.to_dict(),
                                           harness_version=__version__, wall_s=time.perf_counter() - t0,
                                           exit_status=exc.exit_code, traceback=getattr(exc, "user_traceback", None),
                                           log_tail=getattr(exc, "log_tail", None),
                                           trainer=getattr(exc, "trainer_facts", None))
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - anything else is a failed run, with its traceback kept
        disk = disk_failure(exc) if isinstance(exc, OSError) else None
        if disk is not None:  # a full (or read-only) disk: one line, no traceback to read
            rec = ResultRecord.without_metrics(spec.cell, Status.FAILED, ErrorKind.DISK, disk, spec=spec.to_dict(),
                                               harness_version=__version__, wall_s=time.perf_counter() - t0,
                                               exit_status=RunFailed.exit_code)
        else:
            rec = ResultRecord.without_metrics(spec.cell, Status.FAILED, ErrorKind.RUN,
                                               f"{exc.__class__.__name__}: {exc}", spec=spec.to_dict(),
                                               harness_version=__version__, wall_s=time.perf_counter() - t0,
                                               exit_status=RunFailed.exit_code, traceback=traceback.format_exc())
        code = RunFailed.exit_code
    write(spec.record_path, rec)
    emit("done", cell=spec.cell, status=rec.status.value)
    if code != EXIT_OK and rec.error is not None:
        print(f"harness.worker: {rec.error.message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
