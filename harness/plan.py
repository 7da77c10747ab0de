"""The one planner: typed options in, named cells out, for every backend.

Pure part: :func:`local_cells` and :func:`image_run_cells` expand the axes
(devices, determinism modes, threads, TF32, CPU ISA levels, repeats) into :class:`Cell` s
with stable names, the first cell being the strictest (the baseline the
others are compared with). Effects are gathered in :func:`make_plan` alone:
whether torch sees CUDA, the host's driver, GPUs and CPU flags, the matrix
files and the wheelhouses the image builds will use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .band import REDRAW_OF
from .errors import HarnessError, InputError, UsageError
from .options import ImageOptions, RunOptions
from .record import BandKind, BandMember
from .safeio import CellPaths

LOCAL_DEFAULT_MODES = ("strict", "default")
IMAGE_DEFAULT_MODES = ("strict",)


@dataclass
class Cell:
    """One point of the matrix: where and how a retrain runs."""

    name: str
    device: str = "cpu"
    determinism: str = "strict"
    threads: int | None = None
    tf32: bool = False
    repeat: int = 0
    isa: str | None = None  # CPU instruction-set level (harness.worker.isa); None: no ISA axis
    image: Any = None  # harness.images.matrix.ImageCell, for cells that run in an image
    skip_reason: str | None = None  # this host cannot run it (decided before anything starts)
    warning: str | None = None  # it runs, but the user should know (e.g. an old driver)
    labels: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # a seed band member: overrides training.seed
    perturb: dict[str, Any] | None = None  # an ulp band member: {"kind": "ulp", "seed": s}
    band: BandMember | None = None  # a band member: its kind and number
    gpu: str | None = None  # slurm: the GPU type the cell's job asks for (a GRES type); None: no GPU
    slot: Any = None  # harness.schedule.Slot: its cores and GPU while it runs (--jobs); None: unpinned
    notes: tuple[str, ...] = ()  # what the launcher adds to its record's warnings (e.g. why it ran again alone)


@dataclass
class Job:
    """What every cell of one invocation shares (host paths)."""

    bundle_dir: str
    data_path: str | None  # None: a custom trainer that finds its own data
    results_dir: str
    trainer: str | None = None
    trainer_path: list[str] | None = None  # the trainer's folders, in sys.path order
    trainer_cmd: str | None = None  # a command as the trainer, instead of `trainer`
    trace: bool = False
    run_id: str = ""
    timeout_s: float | None = None  # a cell running longer is killed and recorded as ``timeout``
    data_dir: str | None = None  # --data-dir: holds data_path; mounted whole and hashed
    band_from: str | None = None  # a band measured earlier that this run's cells are judged against
    data_feed: str | None = None  # --data-path: the reference trainer's data path (None: the default)
    seed_key: str | None = None  # --seed-key: where a custom trainer reads its seed (None: config.yaml says)
    trainer_cwd: str | None = None  # where a custom trainer runs, bundle | project (--trainer-cwd, else trainer.cwd)

    def cell_dir(self, cell: Cell) -> Path:
        return Path(self.results_dir) / cell.name

    def cell_paths(self, cell: Cell) -> CellPaths:
        """The files of the cell's directory (``spec.json``, ``worker.log``, ``record.json`` ...)."""
        return CellPaths(self.cell_dir(cell))


@dataclass
class Plan:
    """What one invocation will run, in order, before anything runs."""

    backend: str  # "local" | "docker" | "slurm"
    cells: list[Cell]  # every planned cell, skipped ones included, in table order
    builds: dict[str, Any] = field(default_factory=dict)  # image cell name -> images.build.BuildPlan
    blocked: dict[str, HarnessError] = field(default_factory=dict)  # cell name -> why it cannot start
    options: ImageOptions | None = None
    # image cell name -> its ``harness:<cell>`` alias, for wheelhouse cells given no wheelhouse: the
    # runner uses the image already built under that alias (unchecked), or skips the cell without one
    aliases: dict[str, str] = field(default_factory=dict)
    slurm: Any = None  # slurm_site.SlurmSettings, for the slurm backend

    @property
    def runnable(self) -> list[Cell]:
        return [c for c in self.cells if c.skip_reason is None]

    @property
    def skipped(self) -> list[Cell]:
        return [c for c in self.cells if c.skip_reason is not None]


# --------------------------------------------------------------------------- pure expansion


def _suffix(device: str, mode: str, threads: int | None, tf32: bool, repeat: int, repeats: int,
            isa: str | None = None) -> list[str]:
    parts = [device.replace(":", ""), mode, f"t{threads}" if threads else "tdef"]
    if device.startswith("cuda"):
        parts.append("tf32" if tf32 else "fp32")
    if isa is not None:
        parts.append(isa)
    if repeats > 1:
        parts.append(f"r{repeat + 1}")
    return parts


def local_cells(devices: Sequence[str], modes: Sequence[str], threads: Sequence[int | None],
                tf32: Sequence[bool] = (False,), repeats: int = 1,
                isa: Sequence[str | None] = (None,)) -> list[Cell]:
    """Every combination of the axes; TF32 only varies on CUDA devices. Names like ``cpu-strict-t1``,
    and ``cpu-strict-t1-baseline`` when an ISA level is asked for."""
    cells: list[Cell] = []
    seen: set[str] = set()
    for device, mode, t, tf, level, r in itertools.product(devices, modes, threads, tf32, isa, range(repeats)):
        on_cuda = device.startswith("cuda")
        if tf and not on_cuda:
            continue
        name = "-".join(_suffix(device, mode, t, tf, r, repeats, level))
        if name in seen:
            continue
        seen.add(name)
        labels: dict[str, Any] = {"device": device, "determinism": mode, "threads": t, "tf32": bool(tf) and on_cuda,
                                  "repeat": r + 1}
        if level is not None:
            labels["isa"] = level
        cells.append(Cell(name=name, device=device, determinism=mode, threads=t, tf32=bool(tf) and on_cuda, repeat=r,
                          isa=level, labels=labels))
    return cells


def isa_skips(cells: Sequence[Cell], supported: Sequence[str], machine: str = "") -> None:
    """Mark the cells whose ISA level this host's CPU lacks as skipped, with the reason (pure)."""
    from .worker.isa import unsupported_reason

    for c in cells:
        why = unsupported_reason(c.isa, tuple(supported), machine)
        if why is not None and c.skip_reason is None:
            c.skip_reason = why


def image_run_cells(image_cells: Sequence[Any], modes: Sequence[str], threads: Sequence[int | None],
                    tf32: Sequence[bool], repeats: int, devices: dict[str, str],
                    skips: dict[str, str | None], warnings: dict[str, str | None],
                    isa: Sequence[str | None] = (None,)) -> list[Cell]:
    """Image cells x modes x threads x TF32 x ISA levels x repeats; a suffix names an axis only where it
    varies (an ISA level also when it is the only one and not ``native``).

    ``devices``, ``skips`` and ``warnings`` are the host's verdicts per image cell.
    """
    cells: list[Cell] = []
    name_isa = len(isa) > 1 or any(level not in (None, "native") for level in isa)
    for ic in image_cells:
        device = devices[ic.name]
        tf_axis = [t for t in tf32 if not t or device.startswith("cuda")] or [False]
        for mode, t, tf, level, r in itertools.product(modes, threads, tf_axis, isa, range(repeats)):
            name = ic.name
            if len(modes) > 1:
                name += f"-{mode}"
            if len(threads) > 1:
                name += f"-t{t}" if t else "-tdef"
            if len(tf_axis) > 1:
                name += "-tf32" if tf else "-fp32"
            if name_isa and level is not None:
                name += f"-{level}"
            if repeats > 1:
                name += f"-r{r + 1}"
            labels = {"image": ic.name, "torch": ic.torch, "variant": ic.variant, "determinism": mode,
                      "threads": t, "tf32": tf, "repeat": r + 1}
            if level is not None:
                labels["isa"] = level
            cells.append(Cell(name=name, device=device, determinism=mode, threads=t, tf32=tf, repeat=r, image=ic,
                              isa=level, skip_reason=skips.get(ic.name), warning=warnings.get(ic.name),
                              labels=labels))
    return cells


BAND_PREFIX = "band-"


def band_cells(baseline: Cell, n: int, seeds: int, training_seed: int) -> list[Cell]:
    """The band of ``baseline``: ``n`` ulp members, then ``seeds`` seed members (pure).

    Each member is the baseline cell (same device, mode, threads, TF32, ISA, image) with one
    difference: ulp member ``i`` moves one initial parameter value by one ulp, chosen by
    a private RNG seeded with ``i``; seed member ``i`` trains with ``training_seed + i``.
    """
    base_labels = {k: v for k, v in baseline.labels.items() if k != "repeat"}
    out = []
    for kind, count in (("ulp", n), ("seed", seeds)):
        for i in range(1, count + 1):
            band = BandMember(BandKind(kind), i)
            out.append(Cell(
                name=f"{BAND_PREFIX}{kind}-{i}", device=baseline.device, determinism=baseline.determinism,
                threads=baseline.threads, tf32=baseline.tf32, repeat=0, image=baseline.image, isa=baseline.isa,
                skip_reason=baseline.skip_reason, warning=baseline.warning,
                labels={**base_labels, "band": kind, "member": i, "band_of": baseline.name},
                seed=training_seed + i if kind == "seed" else None,
                perturb={"kind": "ulp", "seed": i} if kind == "ulp" else None, band=band, gpu=baseline.gpu))
    return out


def redraw_cell(member: Cell, number: int) -> Cell:
    """Ulp member ``member`` drawn again as member ``number`` (pure): the same cell, another one-ulp change.

    Used in place of a member whose change training rounded away (:func:`harness.band.absorbed`): its
    private RNG is seeded with ``number``, so the value and direction it moves are drawn afresh.
    """
    return replace(member, name=f"{BAND_PREFIX}ulp-{number}", perturb={"kind": "ulp", "seed": number},
                   band=BandMember(BandKind.ULP, number), slot=None, notes=(),
                   labels={**member.labels, "member": number, REDRAW_OF: member.name})


def choose_baseline(cells: list[Cell], trial_environment: Mapping[str, Any] | None = None) -> Cell | None:
    """The cell a band is measured on: where the trial ran, when a cell runs there, else the first (pure).

    A band is the yardstick of "would a retrain in the reference environment give this": it is
    measured in the trial's environment as far as ``trial_info.yaml`` says what that was (a CPU or
    a CUDA device, and the torch version among image cells), not wherever the first cell happens to be.
    """
    if not cells:
        return None
    env = trial_environment or {}
    if not env:
        return cells[0]
    cuda = env.get("cuda")
    want = "cpu" if cuda in (None, "", "none", "None") else "cuda"
    on_device = [c for c in cells if (c.device or "cpu").split(":", 1)[0] == want] or list(cells)
    torch = str(env.get("torch") or "").split("+", 1)[0]
    same_torch = [c for c in on_device if torch and c.image is not None
                  and str(getattr(c.image, "torch", "") or "").split("+", 1)[0] == torch]
    return (same_torch or on_device)[0]


def with_band(plan: Plan, n: int, seeds: int, training_seed: int, *, only: bool = False,
              baseline: Cell | None = None) -> Plan:
    """``plan`` with the band of ``baseline`` (default: its first runnable cell) run first; ``only``: the band
    alone (pure).

    Band members run where the baseline runs (same backend, image, device, mode, threads,
    TF32): an image cell's build or skip is the baseline's.
    """
    base = baseline or next(iter(plan.runnable), None) or (plan.cells[0] if only and plan.cells else None)
    if base is None or not (n or seeds):
        return plan
    members = band_cells(base, n, seeds, training_seed)
    blocked = dict(plan.blocked)
    if base.name in blocked:
        blocked.update({c.name: blocked[base.name] for c in members})
    if only:
        blocked = {k: v for k, v in blocked.items() if k.startswith(BAND_PREFIX)}
    return replace(plan, cells=members + ([] if only else plan.cells), blocked=blocked)


CELL_SEED_INFIX = "-seed-"


def cell_seed_cells(cells: list[Cell], k: int, training_seed: int) -> list[Cell]:
    """Each cell retrained with ``training_seed + 1 ... + k``, the band's seeds (pure): the paired test of
    its shift (``--cell-seeds``). A cell's repeats share one set (the first repeat's)."""
    out = []
    for cell in cells:
        if cell.band or cell.repeat > 1:
            continue
        for i in range(1, k + 1):
            out.append(Cell(
                name=f"{cell.name}{CELL_SEED_INFIX}{i}", device=cell.device, determinism=cell.determinism,
                threads=cell.threads, tf32=cell.tf32, repeat=0, image=cell.image, isa=cell.isa,
                skip_reason=cell.skip_reason, warning=cell.warning,
                labels={**{k_: v for k_, v in cell.labels.items() if k_ != "repeat"}, "cell_seed": i,
                        "seed_of": cell.name},
                seed=training_seed + i, band=BandMember(BandKind.CELL_SEED, i, of=cell.name), gpu=cell.gpu))
    return out


def with_cell_seeds(plan: Plan, k: int, training_seed: int) -> Plan:
    """``plan`` with every cell's own seed retrains after the cells (pure); their builds and skips are their cell's."""
    extra = cell_seed_cells(plan.cells, k, training_seed)
    blocked = dict(plan.blocked)
    for c in extra:
        of = (c.band.of if c.band else None) or ""
        if of in blocked:
            blocked[c.name] = blocked[of]
    return replace(plan, cells=plan.cells + extra, blocked=blocked)


def refuse_inapplicable(opts: RunOptions) -> None:
    """Options that do nothing for the chosen backend are refused, not silently ignored."""
    if opts.backend == "local":
        if opts.cells:
            raise UsageError("--cells names image cells of the docker backend; the local backend has none",
                             hint="drop --cells, or use --backend docker")
        im = opts.images
        given = [flag for flag, on in (("--matrix", im.matrix), ("--compat", im.compat), ("--base-image", im.base_images),
                                        ("--wheelhouse", im.wheelhouses), ("--memory", im.memory),
                                        ("--offline", im.offline)) if on]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to the docker backend", hint="drop them, or use --backend docker")
    elif opts.axes.devices is not None:
        raise UsageError("--devices is for the local backend; an image cell runs on its GPU when the host has one",
                         hint="use --gpus none to keep every image cell on the CPU")
    if opts.backend != "slurm" and opts.slurm.any:
        raise UsageError("--partition, --account, --qos, --time, --mem, --cpus-per-task, --runtime, --python and "
                         "--gpu-types only apply to the slurm backend", hint="drop them, or use --backend slurm")
    if opts.backend == "slurm" and opts.images.gpus != "all":
        raise UsageError("--gpus chooses GPUs of this host for the docker backend; Slurm gives each job its GPUs",
                         hint="route a cell to a GPU type with --cells CELL@TYPE or --gpu-types")
    if opts.backend == "slurm" and opts.images.memory:
        raise UsageError("--memory limits a container of the docker backend; a Slurm job's memory is --mem",
                         hint="use --mem 16G (or mem: in the site file's slurm section)")


# --------------------------------------------------------------------------- effects: the host's facts


GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL, ROCm


def cuda_available() -> bool:
    """Whether torch sees a CUDA (or ROCm) device; without any GPU device file torch is not imported."""
    import os

    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _local_plan(opts: RunOptions) -> Plan:
    import os

    has_cuda = cuda_available()
    ax = opts.axes
    if opts.single:
        device = (ax.devices or ("auto",))[0]
        if device == "auto":
            device = "cuda" if has_cuda else "cpu"
        devices: tuple[str, ...] = (device,)
        modes = ax.modes or ("strict",)
        threads = ax.threads or (None,)
    else:
        devices = tuple(("cuda" if has_cuda else "cpu") if d == "auto" else d for d in (ax.devices or ()))
        devices = devices or (("cpu", "cuda") if has_cuda else ("cpu",))
        modes = ax.modes or LOCAL_DEFAULT_MODES
        threads = ax.threads or ((1, None) if (os.cpu_count() or 1) > 1 else (None,))
    cells = local_cells(devices, modes, threads, ax.tf32, ax.repeats, ax.isa or (None,))
    if opts.single and len(cells) == 1:
        cells[0].name = "run"
    for c in cells:
        if c.device.startswith("cuda") and not has_cuda:
            raise UsageError(f"cell {c.name} asks for {c.device}, but torch sees no CUDA device here",
                             hint="drop cuda from --devices, or run where a GPU is visible")
    _skip_unsupported_isa(cells)
    return Plan("local", cells)


def _skip_unsupported_isa(cells: list[Cell]) -> None:
    """Cells asking for an instruction set this host's CPU lacks are skipped (a container runs on it too)."""
    if all(c.isa is None for c in cells):
        return
    import platform

    from .worker.isa import read_host_levels

    isa_skips(cells, read_host_levels(), platform.machine())


def load_image_cells(images: ImageOptions, names: Sequence[str] | None, flag: str = "--cells") -> list[Any]:
    """The selected, validated image cells with base images substituted (site config, then flags);
    ``flag`` is the option that named the cells (``--cells``, ``--image``, ``--cell``), said in its error."""
    from .images import matrix

    cells = matrix.select(matrix.load_matrix(images.matrix, images.compat), list(names) if names else None, flag)
    if images.site_config:
        cells = matrix.apply_base_images(cells, matrix.load_site_config(images.site_config)["base_images"],
                                         f"{images.site_config} base_images")
    return matrix.apply_base_images(cells, dict(images.base_images))


def wheelhouse_dirs(values: Sequence[str], cells: Sequence[Any]) -> dict[str, Path]:
    """Per-cell wheelhouses from ``--wheelhouse ROOT`` (subdir per cell) and ``CELL=DIR``."""
    known = {c.name for c in cells}
    out: dict[str, Path] = {}
    explicit: dict[str, Path] = {}
    for v in values:
        cell, sep, path = v.partition("=")
        if sep and cell in known:
            explicit[cell] = Path(path)
        elif sep and not Path(v).is_dir():
            raise InputError("--wheelhouse", f"{cell!r} is not a selected cell", hint=f"known: {', '.join(sorted(known))}")
        else:
            root = Path(v)
            if not root.is_dir():
                raise InputError("--wheelhouse", f"{v} is not a directory",
                                 hint="pass a directory with one subdirectory per cell, or CELL=DIR")
            for c in cells:
                if (root / c.name).is_dir():
                    out[c.name] = root / c.name
    out.update(explicit)
    return out


def _image_plan(opts: RunOptions) -> Plan:
    from .images import build as imagebuild
    from .images import matrix

    image_cells = load_image_cells(opts.images, opts.cells, opts.cells_flag)
    wheelhouses = wheelhouse_dirs(opts.images.wheelhouses, image_cells)
    host = matrix.detect_host()
    builds: dict[str, Any] = {}
    build_errors: dict[str, HarnessError] = {}
    for ic in image_cells:
        try:
            builds[ic.name] = imagebuild.plan_build(ic, matrix.REPO_ROOT, wheelhouses.get(ic.name))
        except HarnessError as exc:
            build_errors[ic.name] = exc
    devices = {ic.name: ("cpu" if opts.images.gpus == "none" else matrix.effective_device(ic, host)) for ic in image_cells}
    skips = {ic.name: matrix.host_skip_reason(ic, host) for ic in image_cells}
    host_warning = getattr(matrix, "host_warning", None)
    warnings = {ic.name: host_warning(ic, host) if host_warning else None for ic in image_cells}
    ax = opts.axes
    cells = image_run_cells(image_cells, ax.modes or IMAGE_DEFAULT_MODES, ax.threads or (None,), ax.tf32, ax.repeats,
                            devices, skips, warnings, ax.isa or (None,))
    _skip_unsupported_isa(cells)
    blocked = {c.name: build_errors[c.image.name] for c in cells if c.skip_reason is None and c.image.name in build_errors}
    aliases = {ic.name: f"{imagebuild.REPOSITORY}:{ic.name}" for ic in image_cells
               if ic.source == "wheelhouse" and ic.name not in wheelhouses and ic.name in build_errors}
    return Plan("docker", cells, builds=builds, blocked=blocked, options=opts.images, aliases=aliases)


def slurm_cells(pairs: Sequence[tuple[Any, str | None, bool]], modes: Sequence[str], threads: Sequence[int | None],
                tf32: Sequence[bool], repeats: int, isa: Sequence[str | None] = (None,)) -> list[Cell]:
    """Image cells on GPU types: ``(image cell, gpu type, name it)`` pairs x the axes (pure).

    The same image on two GPU types is two cells, ``<cell>-<type>`` (the hardware axis); a
    type the matrix entry names itself (``gpu: a100``) keeps the cell's name. What runs is
    decided on the node: a GPU cell's device is ``auto`` (cuda when the node's torch sees one).
    """
    cells: list[Cell] = []
    seen: set[str] = set()
    for ic, gpu, named in pairs:
        device = "cpu" if ic.device == "cpu" else "auto"
        for c in image_run_cells([ic], modes, threads, tf32, repeats, {ic.name: device}, {}, {}, isa):
            if named and gpu:
                c.name = f"{ic.name}-{gpu}{c.name[len(ic.name):]}"
            if c.name in seen:
                continue
            seen.add(c.name)
            c.gpu = gpu
            if gpu:
                c.labels["gpu"] = gpu
            cells.append(c)
    return cells


def _slurm_plan(opts: RunOptions) -> Plan:
    from . import slurm_site
    from .images import build as imagebuild
    from .images import matrix

    site = matrix.load_site_config(opts.images.site_config)["slurm"] if opts.images.site_config else None
    settings = slurm_site.settings(site, opts.slurm.given(), str(opts.images.site_config or "site config"))
    for t in opts.slurm.gpu_types or ():
        slurm_site.split_gpu(f"cell@{t}")  # a GPU type becomes part of a cell's name: checked as one
    wanted = [slurm_site.split_gpu(entry) for entry in opts.cells or ()]
    image_cells = load_image_cells(opts.images, list(dict.fromkeys(n for n, _ in wanted)) or None, opts.cells_flag)
    by_name = {ic.name: ic for ic in image_cells}
    chosen = [(by_name[n], g) for n, g in wanted] if wanted else [(ic, None) for ic in image_cells]
    pairs: list[tuple[Any, str | None, bool]] = []
    for ic, gpu in chosen:
        if opts.slurm.gpu_types and gpu is None:
            pairs += [(ic, t, True) for t in opts.slurm.gpu_types]
        else:
            pairs.append((ic, gpu or ic.gpu, gpu is not None))
    ax = opts.axes
    cells = slurm_cells(pairs, ax.modes or IMAGE_DEFAULT_MODES, ax.threads or (None,), ax.tf32, ax.repeats,
                        ax.isa or (None,))
    builds: dict[str, Any] = {}
    blocked: dict[str, HarnessError] = {}
    if settings.runtime == "docker":  # the node builds (or finds) the cell's image from this plan
        wheelhouses = wheelhouse_dirs(opts.images.wheelhouses, image_cells)
        for ic in image_cells:
            try:
                builds[ic.name] = imagebuild.plan_build(ic, matrix.REPO_ROOT, wheelhouses.get(ic.name))
            except HarnessError as exc:
                blocked.update({c.name: exc for c in cells if c.image.name == ic.name})
    return Plan("slurm", cells, builds=builds, blocked=blocked, options=opts.images, slurm=settings)


def make_plan(opts: RunOptions) -> Plan:
    """Turn the options into cells for ``opts.backend`` (reads the host's facts, builds nothing)."""
    refuse_inapplicable(opts)
    if opts.backend == "slurm":
        plan = _slurm_plan(opts)
    else:
        plan = _local_plan(opts) if opts.backend == "local" else _image_plan(opts)
    if not plan.cells:
        raise UsageError("no cells to run", hint="check --cells / --devices")
    return plan
