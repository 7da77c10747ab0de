"""The harness from Python: ``run``, ``matrix``, ``band``, ``compare`` and ``diverge`` for notebooks and CI scripts.

Each function takes the options of the command of the same name as keyword arguments (the flag's long
name with dashes as underscores: ``--band-seeds 8`` is ``band_seeds=8``, ``--isa native,baseline`` is
``isa=("native", "baseline")``), does what the command does, and returns the typed result the command
renders: a :class:`harness.judge.Comparison`, or for :func:`diverge` a :class:`harness.diverge.Divergence`.
Nothing is printed on stdout unless ``show=True``, which prints what the command prints; progress and
warnings go to stderr as on the command line. Bad input raises the :class:`harness.errors.HarnessError`
family with the message the command prints after ``harness: error:``; nothing calls ``sys.exit``.
:func:`exit_code` is the command's exit code for a result.

Example, a CI step that fails the job when a cell drifted (more in docs/api.md):

```python
import sys
from harness import api

comparison = api.matrix("optuna_best", backend="local", devices="cpu", threads=(1, "all"),
                        out="harness-results/ci")
for cell in comparison.cells:
    print(cell.cell, cell.verdict.value)
sys.exit(api.exit_code(comparison))  # 0 reproduced, 1 failed or incomplete, 3 drifted
```

Importing this module imports nothing heavy (no torch, numpy or rich): each function imports what it
needs when it is called. The ``build_*`` functions turn option values as the command line gives them
into the typed options (:mod:`harness.options`); they are the one place each option is checked, for
this module and for :mod:`harness.cli` alike.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from .errors import (EXIT_DRIFTED, EXIT_OK, EXIT_RUN_FAILED, BackendError, BuildFailed, HarnessError, InputError,
                     Interrupted, RunFailed, UsageError)
from .options import (DEFAULT_TIMEOUT_S, Axes, ImageOptions, ReportOptions, RunOptions, SlurmFlags,
                      base_image_overrides, parse_alpha, parse_band, parse_band_auto, parse_band_seeds, parse_cells,
                      parse_count, parse_devices, parse_isa, parse_jobs, parse_modes, parse_repeats, parse_tf32,
                      parse_threads, parse_timeout)

if TYPE_CHECKING:
    from .diverge import Divergence, Parting
    from .judge import Comparison, Tolerances

__all__ = ["run", "matrix", "band", "compare", "diverge", "exit_code", "verdict_exit", "parting_exit",
           "HarnessError", "InputError", "UsageError", "RunFailed", "BackendError", "BuildFailed", "Interrupted"]

PathLike = Union[str, "os.PathLike[str]"]
Values = Union[str, int, None, Sequence[Union[str, int, None]]]  # "1,all", 1, or (1, "all")


# --------------------------------------------------------------------------- exit codes


def verdict_exit(comparison: Comparison) -> int:
    """The exit code of a verdict, as ``harness run``/``matrix``/``band``/``compare`` exit with it.

    0: every cell that ran reproduced (or nothing was recorded to judge against, or a difference was not
    judged); 1: a cell failed, was skipped or is not comparable, or the run is incomplete; 3: a cell drifted.
    """
    from .judge import Verdict

    return {
        Verdict.REPRODUCED: EXIT_OK, Verdict.UNRECORDED: EXIT_OK, Verdict.UNJUDGED: EXIT_OK,
        Verdict.DRIFTED: EXIT_DRIFTED,
        Verdict.FAILED: EXIT_RUN_FAILED, Verdict.INCOMPLETE: EXIT_RUN_FAILED, Verdict.SKIPPED: EXIT_RUN_FAILED,
        Verdict.NOT_COMPARABLE: EXIT_RUN_FAILED,  # trained on other data; --allow-data-change judges it anyway
    }[comparison.overall]


def parting_exit(parting: Parting) -> int:
    """The exit code of ``harness diverge``: 0 when the runs never part, 3 when they do (or only evaluation drifts)."""
    from .diverge import Parting

    return {Parting.NEVER: EXIT_OK, Parting.TRAINING: EXIT_DRIFTED, Parting.EVALUATION_ONLY: EXIT_DRIFTED,
            Parting.BEYOND_TRACE: EXIT_DRIFTED}[parting]


def exit_code(result: Comparison | Divergence) -> int:
    """The exit code the command line gives ``result``: for a CI script, ``sys.exit(api.exit_code(result))``.

    :param result: what :func:`run`, :func:`matrix`, :func:`band`, :func:`compare` (a Comparison, through
        :func:`verdict_exit`) or :func:`diverge` (a Divergence, through :func:`parting_exit`) returned.

    :returns: 0, 1 or 3, as the command exits (bad input, exit 2, is raised as an
        :class:`~harness.errors.InputError` instead: ``exc.exit_code``).
    """
    from .diverge import Divergence

    if isinstance(result, Divergence):
        return parting_exit(result.parting)
    return verdict_exit(result)


# --------------------------------------------------------------------------- option values -> typed options


def build_run_options(bundle: str, *, command: str, backend: str | None = None, image: str | None = None,
                      device: str | None = None, devices: str | None = None, cells: str | None = None,
                      determinism: str | None = None, threads: str | None = None, tf32: Any = None,
                      repeats: Any = 1, isa: str | None = None, n: Any = 8, band: Any = "auto",
                      band_seeds: Any = "auto", cell_seeds: Any = 0, band_from: str | None = None,
                      data: str | None = None, data_dir: str | None = None, trainer: str | None = None,
                      trainer_path: list[str] | None = None, trainer_cmd: str | None = None,
                      seed_key: str | None = None, trainer_cwd: str | None = None, out: str | None = None,
                      resume: bool | str = False, force: bool = False, trace: bool = False, progress: bool = True,
                      jobs: Any = "auto", cold: bool = False, strict_config: bool = False, timeout: Any = None,
                      data_path: str | None = None, matrix: Path | None = None, compat: Path | None = None,
                      base_image: Sequence[str] | None = None, site_config: Path | None = None,
                      wheelhouse: Sequence[str] | None = None, gpus: str | None = "all", memory: str | None = None,
                      offline: bool = False, partition: str | None = None, account: str | None = None,
                      qos: str | None = None, time: str | None = None, mem: str | None = None,
                      cpus_per_task: str | None = None, runtime: str | None = None, python: str | None = None,
                      gpu_types: str | None = None) -> RunOptions:
    """``harness run`` / ``matrix`` / ``band`` options (``command``) as :class:`~harness.options.RunOptions`.

    The values are as the command line gives them (text such as ``"1,all"``; ``tf32`` a flag for run and
    band, text for matrix); each axis is read by its parser in :mod:`harness.options`.
    """
    single, band_only = command in ("run", "band"), command == "band"
    if band_only:
        backend = "docker" if image else (backend or "local")
        if backend == "docker" and not image:
            raise UsageError("harness band --backend docker needs the image the baseline runs in",
                             hint="add --image CELL (a cell of `harness images list`)")
        if backend not in ("docker", "local"):  # the command line's choices refuse it before
            raise UsageError(f"harness band --backend {backend!r} is not one of docker, local",
                             hint="--backend local, or --backend docker --image CELL")
    else:
        backend = "docker" if (single and image) else ("local" if single else backend)
    parsed_devices = None
    if single and device and not (image and device == "auto"):
        parsed_devices = parse_devices(device, "--device")
    elif not single and devices:
        parsed_devices = parse_devices(devices)
    tf32_text = ("on" if tf32 else "off") if single else (tf32 or "off,on")
    axes = Axes(
        devices=parsed_devices,
        modes=parse_modes(determinism) if determinism else None,
        threads=parse_threads(threads) if threads else None,
        tf32=parse_tf32(tf32_text),
        repeats=parse_repeats(repeats),
        isa=parse_isa(isa) if isa else None,
    )
    n_seeds, auto_band = 0, 0
    if band_only:
        n_band, (seeds, auto), from_dir = parse_band(n, "--n"), parse_band_seeds(band_seeds), None
        if n_band < 2 and seeds < 2:
            raise UsageError("harness band measures nothing: --n 0 and no --band-seeds",
                             hint="e.g. --n 8, or --n 0 --band-seeds 8")
    else:
        (n_band, auto_band), (seeds, auto) = parse_band_auto(band), parse_band_seeds(band_seeds)
        from_dir = band_from
        n_seeds = parse_count(cell_seeds, "--cell-seeds", example="8")
        if n_seeds == 1:
            raise UsageError("--cell-seeds 1 gives one pair: a paired test needs at least 2", hint="e.g. --cell-seeds 8")
        if n_seeds and auto and not from_dir:  # the band's seeds are the pairs' other half: measure them first
            seeds, auto = max(n_seeds, auto), 0
    chosen = parse_cells(image) if single else parse_cells(cells)
    out, resumed = resume_options(out, resume, force)
    return RunOptions(bundle=bundle, backend=backend, single=single, cells=chosen,
                      cells_flag="--image" if single else "--cells", axes=axes,
                      images=build_image_options(matrix=matrix, compat=compat, base_image=base_image,
                                                 site_config=site_config, wheelhouse=wheelhouse, gpus=gpus,
                                                 memory=memory, offline=offline),
                      data=data, data_dir=data_dir, trainer=trainer,
                      trainer_path=trainer_path, trainer_cmd=trainer_cmd, seed_key=seed_key, trainer_cwd=trainer_cwd,
                      out=out, trace=trace, progress=progress,
                      resume=resumed, force=force, jobs=parse_jobs(jobs), cold=bool(cold), strict_config=strict_config,
                      timeout=parse_timeout(timeout) if timeout is not None else DEFAULT_TIMEOUT_S,
                      band=n_band, band_seeds=seeds, auto_band=auto_band, auto_seeds=auto, cell_seeds=n_seeds,
                      band_from=from_dir,
                      band_only=band_only,
                      slurm=build_slurm_flags(partition=partition, account=account, qos=qos, time=time, mem=mem,
                                              cpus_per_task=cpus_per_task, runtime=runtime, python=python,
                                              gpu_types=gpu_types),
                      data_feed=data_path)


def resume_options(out: str | None, resume: bool | str, force: bool) -> tuple[str | None, bool]:
    """``--out`` and ``--resume [DIR]`` as (results directory, resume); ``--force`` needs ``--resume``."""
    if isinstance(resume, str):
        if out and os.path.abspath(out) != os.path.abspath(resume):
            raise UsageError(f"--resume {resume} and --out {out} name two results directories",
                             hint="give one: --resume DIR, or --out DIR --resume")
        out, resume = resume, True
    if force and not resume:
        raise UsageError("--force reruns the cells --resume would reuse; without --resume every cell runs anyway",
                         hint="drop --force, or add --resume")
    return out, bool(resume)


def build_image_options(*, matrix: Path | None = None, compat: Path | None = None,
                        base_image: Sequence[str] | None = None, site_config: Path | None = None,
                        wheelhouse: Sequence[str] | None = None, gpus: str | None = "all", memory: str | None = None,
                        offline: bool = False) -> ImageOptions:
    """The docker backend's options, from the values of the flags every image-using command shares."""
    return ImageOptions(
        matrix=matrix, compat=compat, base_images=base_image_overrides(base_image), site_config=site_config,
        wheelhouses=ImageOptions.wheelhouse_values(wheelhouse), gpus=gpus or "all", memory=memory,
        offline=bool(offline),
    )


def build_slurm_flags(*, partition: str | None = None, account: str | None = None, qos: str | None = None,
                      time: str | None = None, mem: str | None = None, cpus_per_task: str | None = None,
                      runtime: str | None = None, python: str | None = None,
                      gpu_types: str | None = None) -> SlurmFlags:
    """The slurm backend's flags as typed options (a flag left out: the site file decides)."""
    return SlurmFlags(partition=partition, account=account, qos=qos, time=time, mem=mem, cpus_per_task=cpus_per_task,
                      runtime=runtime, python=python,
                      gpu_types=tuple(dict.fromkeys(t.strip() for t in gpu_types.split(",") if t.strip()))
                      if gpu_types else None)


def build_tolerances(tol: Sequence[str] | None = None, tolerances: str | None = None) -> Tolerances:
    """``--tolerances FILE``, then each ``--tol METRIC=abs:X[,rel:Y]`` over it, as :class:`~harness.judge.Tolerances`."""
    from .judge import Tolerances, load_tolerances as load_file, parse_tolerance

    out = Tolerances()
    if tolerances:
        out = load_file(tolerances, out)
    for t in tol or []:
        out = parse_tolerance(t, out)
    return out


def build_report_options(*, command: str = "", json_out: str | None = None, markdown: str | None = None,
                         html: str | None = None, detail: bool = False, allow_data_change: bool = False,
                         alpha: Any = None, paths: Sequence[str] = (), show: bool = True) -> ReportOptions:
    """Where the comparison goes (``--json``, ``--markdown``, ``--html``, the terminal) and ``--alpha``.

    An ``--html`` target that is a directory or a link is refused here, before anything trains.
    """
    if html:
        from .report_html import check_target

        check_target(html)
    return ReportOptions(json_out=json_out, markdown=markdown, allow_data_change=bool(allow_data_change),
                         alpha=parse_alpha(alpha), html=html, command=command, detail=bool(detail),
                         trace_dirs=tuple(p for p in paths if Path(p).is_dir()), show=show)


# --------------------------------------------------------------------------- Python values -> command-line values


def _path(value: Any) -> str | None:
    return None if value is None else os.fspath(value)


def _text(value: Values) -> str | None:
    """``(1, "all")`` -> ``"1,all"``, ``1`` -> ``"1"``, ``None`` in a sequence -> ``"all"``: what the flag reads."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    return ",".join("all" if v is None else str(v) for v in value)


def _switches(value: Any) -> str | None:
    """matrix's ``tf32``: ``True``, ``"on"``, ``(False, True)`` or ``"off,on"`` -> the flag's text."""
    if value is None or isinstance(value, str):
        return value
    parts = [value] if isinstance(value, bool) else list(value)
    return ",".join(("on" if v else "off") if isinstance(v, bool) else str(v) for v in parts)


def _strings(value: Any) -> list[str]:
    """A repeatable flag's values: one value, or a sequence of them."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def _train(command: str, given: Mapping[str, Any]) -> Comparison:
    """run / matrix / band: the options built as the command builds them (run options, tolerances,
    report options, in that order), then :func:`harness.runner.execute`."""
    from .runner import execute

    kw = dict(given)
    show = kw.pop("show")
    report = {k: kw.pop(k, None) for k in ("json_out", "markdown", "html", "detail", "allow_data_change", "alpha")}
    tol, tol_file = kw.pop("tol", None), kw.pop("tolerances", None)
    for key in ("bundle", "data", "data_dir", "out", "band_from"):
        kw[key] = _path(kw.get(key))
    for key in ("devices", "determinism", "threads", "isa", "cells", "device", "repeats", "band", "band_seeds",
                "cell_seeds", "n", "jobs", "timeout"):  # as the flag's text: an error quotes what was given as it
        if key in kw:
            kw[key] = _text(kw[key])
    if "tf32" in kw and command == "matrix":
        kw["tf32"] = _switches(kw["tf32"])
    if isinstance(kw.get("resume"), os.PathLike):
        kw["resume"] = os.fspath(kw["resume"])
    kw["trainer_path"] = _strings(kw.get("trainer_path")) or None
    kw["base_image"], kw["wheelhouse"] = _strings(kw.get("base_image")), _strings(kw.get("wheelhouse"))
    for key in ("matrix", "compat"):
        kw[key] = Path(kw[key]) if kw.get(key) is not None else None
    site = kw.get("site_config") or os.environ.get("HARNESS_SITE_CONFIG") or None  # as the flag's default
    kw["site_config"] = Path(site) if site is not None else None
    if "gpu_types" in kw:
        kw["gpu_types"] = _text(kw["gpu_types"])
    bundle = kw.pop("bundle")
    opts = build_run_options(bundle, command=command, **kw)
    if command == "band":
        from .judge import Tolerances

        tolerance = Tolerances()
    else:
        tolerance = build_tolerances(_strings(tol), _path(tol_file))
    report_opts = build_report_options(command=command, show=show, json_out=_path(report["json_out"]),
                                       markdown=_path(report["markdown"]), html=_path(report["html"]),
                                       detail=bool(report["detail"]), allow_data_change=bool(report["allow_data_change"]),
                                       alpha=_text(report["alpha"]))
    return execute(opts, report_opts, tolerance)


# --------------------------------------------------------------------------- the commands


def run(bundle: PathLike, *, device: str = "auto", determinism: str = "strict", threads: Values = None,
        tf32: bool = False, isa: Values = None, image: str | None = None, repeats: int = 1,
        band: int | str = "auto", band_seeds: int | str = "auto", cell_seeds: int = 0,
        band_from: PathLike | None = None, alpha: float | None = None, tol: str | Sequence[str] = (),
        tolerances: PathLike | None = None, allow_data_change: bool = False, data: PathLike | None = None,
        data_dir: PathLike | None = None, trainer: str | None = None,
        trainer_path: PathLike | Sequence[PathLike] | None = None, trainer_cmd: str | None = None,
        seed_key: str | None = None, trainer_cwd: str | None = None, out: PathLike | None = None,
        resume: bool | PathLike = False, force: bool = False, json_out: PathLike | None = None,
        markdown: PathLike | None = None, html: PathLike | None = None, detail: bool = False, trace: bool = False,
        data_path: str | None = None, progress: bool = True, timeout: float | str | None = None,
        strict_config: bool = False, jobs: int | str = "auto", cold: bool = False,
        matrix: PathLike | None = None, compat: PathLike | None = None,
        base_image: str | Sequence[str] = (), site_config: PathLike | None = None,
        wheelhouse: PathLike | Sequence[PathLike] = (), gpus: str = "all", memory: str | None = None,
        offline: bool = False, show: bool = False) -> Comparison:
    """``harness run``: retrain once, here (or in one matrix cell's image), and judge it against the trial.

    :param bundle: the ``optuna_best`` directory.
    :param device: ``auto`` (cuda when visible), ``cpu``, ``cuda`` or ``cuda:N``.
    :param determinism: ``strict``, ``warn`` or ``default``.
    :param threads: torch intra-op threads: a number, or ``"all"`` (torch's default).
    :param tf32: allow TF32 matmuls on GPU.
    :param isa: CPU instruction sets the CPU kernels may use, e.g. ``("native", "baseline")``.
    :param image: run inside this matrix cell's image (the docker backend).
    :param repeats: run the cell this many times.
    :param band: ulp band members to measure first, ``"auto"`` (only when needed) or 0 (never).
    :param band_seeds: seed band members, ``"auto"`` or a number.
    :param cell_seeds: also retrain the cell with the first K of the band's seeds (a paired test).
    :param band_from: judge against a band measured earlier (a results directory).
    :param alpha: the false-alarm rate of "drifted" (default 0.01).
    :param tol: explicit tolerance gates, e.g. ``"r2=abs:1e-4"`` (one, or a sequence).
    :param tolerances: a YAML file of tolerance gates.
    :param allow_data_change: judge a cell whose data does not match the digest the bundle records.
    :param data: the dataset file (overrides config.yaml ``data.path``).
    :param data_dir: the directory around the data, for trainers that read files beside it.
    :param trainer: your own trainer as ``module:function``.
    :param trainer_path: directories holding the trainer's package (one, or a sequence).
    :param trainer_cmd: your own trainer as a command (not with ``trainer``).
    :param seed_key: the dotted key of config.yaml your trainer reads its seed from.
    :param trainer_cwd: where your trainer runs: ``bundle`` or ``project``.
    :param out: the results directory (default ``harness-results/<bundle>-<time>``).
    :param resume: reuse the records of ``out`` (True) or of this directory.
    :param force: with ``resume``, rerun every cell.
    :param json_out: also write the records and the comparison as JSON here.
    :param markdown: also write a Markdown table here.
    :param html: also write a self-contained HTML page here.
    :param detail: with ``show``, print every table instead of the first screen.
    :param trace: write each training step's loss bits and parameter digests (for :func:`diverge`).
    :param data_path: the reference trainer's batches: ``fast`` or ``loader``.
    :param progress: progress on stderr as on the command line (False: ``--no-progress``).
    :param timeout: stop a cell that runs longer: seconds, or ``"30m"``, ``"2h"`` (default 6 h).
    :param strict_config: refuse a config.yaml key the reference trainer does not read.
    :param jobs: cells run at once: a number or ``"auto"``.
    :param cold: start the worker as a fresh interpreter rather than from a warm server.
    :param matrix: the version matrix file (docker backend; default ``images/matrix.yaml``).
    :param compat: the compatibility data file (docker backend).
    :param base_image: ``IMAGE`` or ``CELL=IMAGE`` to build on instead of the matrix's (one, or a sequence).
    :param site_config: a YAML site file (default ``$HARNESS_SITE_CONFIG``).
    :param wheelhouse: offline wheels: a directory, or ``CELL=DIR`` (one, or a sequence).
    :param gpus: GPUs for CUDA cells: ``all``, ``none`` or ids such as ``"0,1"``.
    :param memory: the memory limit per container, e.g. ``"8g"``.
    :param offline: never pull a base image.
    :param show: print on stdout what ``harness run`` prints (default: nothing).

    :returns: The judged run: its overall verdict, each cell's verdict and evidence, the band.

    :raises InputError: bad input (exit 2 on the command line), before anything trains where it can be seen then.
    :raises RunFailed: the run could not go on (a backend or an image build failed).
    :raises Interrupted: Ctrl-C; the records written so far are kept.
    """
    return _train("run", locals())


def matrix(bundle: PathLike, *, backend: str = "docker", cells: Values = None, devices: Values = None,
           determinism: Values = None, threads: Values = None, tf32: bool | str | Sequence[bool | str] | None = None,
           isa: Values = None, repeats: int = 1, band: int | str = "auto", band_seeds: int | str = "auto",
           cell_seeds: int = 0, band_from: PathLike | None = None, alpha: float | None = None,
           tol: str | Sequence[str] = (), tolerances: PathLike | None = None, allow_data_change: bool = False,
           data: PathLike | None = None, data_dir: PathLike | None = None, trainer: str | None = None,
           trainer_path: PathLike | Sequence[PathLike] | None = None, trainer_cmd: str | None = None,
           seed_key: str | None = None, trainer_cwd: str | None = None, out: PathLike | None = None,
           resume: bool | PathLike = False, force: bool = False, json_out: PathLike | None = None,
           markdown: PathLike | None = None, html: PathLike | None = None, detail: bool = False, trace: bool = False,
           data_path: str | None = None, progress: bool = True, timeout: float | str | None = None,
           strict_config: bool = False, jobs: int | str = "auto", cold: bool = False,
           matrix: PathLike | None = None, compat: PathLike | None = None,
           base_image: str | Sequence[str] = (), site_config: PathLike | None = None,
           wheelhouse: PathLike | Sequence[PathLike] = (), gpus: str = "all", memory: str | None = None,
           offline: bool = False, partition: str | None = None, account: str | None = None, qos: str | None = None,
           time: str | None = None, mem: str | None = None, cpus_per_task: int | str | None = None,
           runtime: str | None = None, python: str | None = None, gpu_types: Values = None,
           show: bool = False) -> Comparison:
    """``harness matrix``: run every cell of a matrix and judge how the environment moves the metrics.

    The keywords not listed here are :func:`run`'s.

    :param bundle: the ``optuna_best`` directory.
    :param backend: ``docker`` (pinned images, the default), ``local`` (axes that vary inside this
        environment) or ``slurm``.
    :param cells: docker, slurm: the matrix cells to run (default every one); slurm: ``CELL@GPU_TYPE``.
    :param devices: local: the devices, e.g. ``("cpu", "cuda")`` (default cpu, plus cuda when visible).
    :param determinism: the modes to compare, e.g. ``("strict", "default")``.
    :param threads: the thread counts, e.g. ``(1, "all")``.
    :param tf32: CUDA cells: ``False``, ``True`` or ``(False, True)`` (the default).
    :param isa: CPU instruction sets, e.g. ``("native", "baseline")``.
    :param partition: slurm: the partition of every cell's job (each slurm keyword overrides the site file).
    :param account: slurm: the account to charge.
    :param qos: slurm: the quality of service.
    :param time: slurm: the time limit per cell, e.g. ``"2h"``.
    :param mem: slurm: the memory per cell's job, e.g. ``"16G"``.
    :param cpus_per_task: slurm: CPUs per cell's job.
    :param runtime: slurm: ``python`` or ``docker``.
    :param python: slurm: the node's python.
    :param gpu_types: slurm: run every cell on each of these GPU types.
    :param show: print on stdout what ``harness matrix`` prints (default: nothing).

    :returns: The judged matrix: its overall verdict, each cell's verdict and evidence, the band.

    :raises InputError: bad input (exit 2 on the command line).
    :raises RunFailed: the run could not go on (a backend or an image build failed).
    :raises Interrupted: Ctrl-C; the records written so far are kept.
    """
    given = locals()
    given["cpus_per_task"] = None if cpus_per_task is None else str(cpus_per_task)
    return _train("matrix", given)


def band(bundle: PathLike, *, n: int = 8, band_seeds: int = 0, alpha: float | None = None,
         backend: str | None = None, device: str = "auto", determinism: str = "strict", threads: Values = None,
         tf32: bool = False, image: str | None = None, data: PathLike | None = None, data_dir: PathLike | None = None,
         trainer: str | None = None, trainer_path: PathLike | Sequence[PathLike] | None = None,
         trainer_cmd: str | None = None, seed_key: str | None = None, trainer_cwd: str | None = None,
         out: PathLike | None = None, resume: bool | PathLike = False, force: bool = False,
         json_out: PathLike | None = None, markdown: PathLike | None = None, html: PathLike | None = None,
         detail: bool = False, trace: bool = False, data_path: str | None = None, progress: bool = True,
         timeout: float | str | None = None, strict_config: bool = False, jobs: int | str = "auto",
         cold: bool = False, matrix: PathLike | None = None, compat: PathLike | None = None,
         base_image: str | Sequence[str] = (), site_config: PathLike | None = None,
         wheelhouse: PathLike | Sequence[PathLike] = (), gpus: str = "all", memory: str | None = None,
         offline: bool = False, show: bool = False) -> Comparison:
    """``harness band``: measure the training's own instability, to judge cells against later (``band_from``).

    The baseline is retrained ``n`` times, each with one initial weight moved by one ulp, and
    ``band_seeds`` times with other training seeds. The keywords not listed here are :func:`run`'s.

    :param bundle: the ``optuna_best`` directory.
    :param n: ulp band members (0, or at least 2).
    :param band_seeds: seed band members (0, or at least 2; 8 or more to judge against).
    :param alpha: the false-alarm rate of "drifted" (default 0.01).
    :param backend: ``local`` (the default) or ``docker`` (with ``image``).
    :param image: the baseline runs inside this matrix cell's image (the docker backend).
    :param show: print on stdout what ``harness band`` prints (default: nothing).

    :returns: The band's members judged; ``comparison.band`` is the band.

    :raises InputError: bad input (exit 2 on the command line), e.g. ``n=0`` without ``band_seeds``.
    :raises RunFailed: the run could not go on.
    :raises Interrupted: Ctrl-C; the records written so far are kept.
    """
    return _train("band", locals())


def compare(*paths: PathLike, json_out: PathLike | None = None, markdown: PathLike | None = None,
            html: PathLike | None = None, detail: bool = False, alpha: float | None = None,
            tol: str | Sequence[str] = (), tolerances: PathLike | None = None, allow_data_change: bool = False,
            show: bool = False) -> Comparison:
    """``harness compare``: judge records again, merged from results directories, records or JSON reports.

    :param paths: results directories, ``record.json`` files or ``json_out`` reports (several machines' merge).
    :param json_out: also write the records and the comparison as JSON here.
    :param markdown: also write a Markdown table here.
    :param html: also write a self-contained HTML page here.
    :param detail: with ``show``, print every table instead of the first screen.
    :param alpha: the false-alarm rate of "drifted" (default 0.01).
    :param tol: explicit tolerance gates, e.g. ``"r2=abs:1e-4"`` (one, or a sequence).
    :param tolerances: a YAML file of tolerance gates.
    :param allow_data_change: judge a cell whose data does not match the digest the bundle records.
    :param show: print on stdout what ``harness compare`` prints (default: nothing).

    :returns: The comparison of every record found.

    :raises InputError: a path that holds no records, a malformed record, a band of other cells, a bad option.
    """
    from .judge import band_fits, merge
    from .record import load_many
    from .runner import render

    if not paths:  # the command line's PATHS takes one or more
        raise UsageError("harness compare needs a results directory, record.json or JSON report",
                         hint="e.g. compare('harness-results/run-1')")
    given = [os.fspath(p) for p in paths]
    merged = merge(load_many(given))
    why = band_fits(merged.records)
    if why:
        raise InputError("harness compare", f"the band given is not of these cells: {why}",
                         hint="compare the cells with a band measured for their bundle (harness band BUNDLE -o DIR)")
    for w in merged.warnings:
        print(f"harness: warning: {w}", file=sys.stderr)
    return render(merged.records, merged.missing, build_tolerances(_strings(tol), _path(tolerances)), None,
                  build_report_options(command="compare", json_out=_path(json_out), markdown=_path(markdown),
                                       html=_path(html), detail=detail, allow_data_change=allow_data_change,
                                       alpha=_text(alpha), paths=given, show=show))


def _cell(path: str, label: str) -> tuple[Any, Any]:
    """The record and parsed trace of one cell; one line naming which and how when there is no trace."""
    from .diverge import TRACE_FILE, read_trace
    from .record import RECORD_FILE, read

    p = Path(path)
    rec_path = p / RECORD_FILE if p.is_dir() else p
    rec = read(rec_path)  # hostile input, like the trace: harness.safeio
    trace_path = rec_path.parent / TRACE_FILE
    how = "rerun the cell with --trace (harness run/matrix ... --trace)"
    if rec.trace is not None and rec.trace.file is None and rec.trace.why:
        raise InputError(f"{label} {path}", f"has no trace: {rec.trace.why}", hint=how)
    try:
        trace = read_trace(trace_path)
    except InputError as exc:
        raise InputError("", exc.message, hint=exc.hint or how) from None
    if trace is None:
        raise InputError(f"{label} {path}", f"has no {TRACE_FILE} (the run was made without --trace)", hint=how)
    return rec, trace


def diverge(a: PathLike, b: PathLike, *, json_out: PathLike | None = None, html: PathLike | None = None,
            show: bool = False) -> Divergence:
    """``harness diverge A B``: the first training step where two traced cells' runs part.

    :param a: a cell directory of a run made with ``trace=True`` (or its ``record.json``).
    :param b: the other cell directory (or ``record.json``).
    :param json_out: also write the result as JSON here.
    :param html: also write a self-contained HTML page here: both loss curves, where they part.
    :param show: print on stdout what ``harness diverge`` prints (default: nothing).

    :returns: Where they part (``parting``, ``parts_at``, ``first_tensor`` ...), how far apart their metrics
        end, and ``cause``: the cause class the evidence supports (None: none is supported).

    :raises InputError: a cell without a record or a trace, or a trace that is refused (a link, too large, malformed).
    """
    from .causes import classify
    from .diverge import diverge as part, render
    from .record import atomic_write_text, dumps

    a, b, json_out, html = os.fspath(a), os.fspath(b), _path(json_out), _path(html)
    if html:
        from .report_html import check_target

        check_target(html)
    rec_a, trace_a = _cell(a, "A")
    rec_b, trace_b = _cell(b, "B")
    result = part(trace_a, trace_b, rec_a.retrained, rec_b.retrained, f"{rec_a.cell} ({a})", f"{rec_b.cell} ({b})")
    finding = classify(rec_a, rec_b, result)
    result.cause = finding.to_dict() if finding is not None else None
    if show:
        from .report import console

        out = console()
        for line in render(result):
            out.print(line, soft_wrap=True, markup=False, highlight=False)
    if json_out:
        atomic_write_text(json_out, dumps(result.to_dict()))
    if html:
        from .report_html import diverge_page, write_page

        write_page(html, diverge_page(result, trace_a, trace_b))
    return result
