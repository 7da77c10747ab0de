"""The version matrix: which images exist, what they pin, and where they can run.

``images/matrix.yaml`` names the cells; ``images/compat.yaml`` says what PyTorch
actually published (CUDA variants, CPython versions, GPU archs) and what each CUDA
release needs from the driver. Loading checks every cell against compat data, so an
impossible combination is refused with its reason (derived from the data: "first
published with torch X") before anything is built. On a host, a driver below the
minor-version-compatibility floor of the cell's CUDA major skips the cell
(:func:`host_skip_reason`); one between that floor and the toolkit's own minimum runs it
with a warning (:func:`host_warning`), unless only PTX JIT could run it.

Everything here is pure except :func:`load_matrix`/:func:`load_site_config` (read
files) and :func:`detect_host` (runs ``nvidia-smi``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable


from ..errors import InputError

MATRIX_SCHEMA = "harness.matrix/1"
COMPAT_SCHEMA = "harness.compat/1"
TORCH_INDEX = "https://download.pytorch.org/whl"
SOURCES = ("index", "wheelhouse")
DEVICES = ("auto", "cpu")
CELL_KEYS = {"torch", "variant", "python", "base_image", "base_digest", "source", "device", "gpu"}
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_GPU_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,100}$")  # must also be a valid Docker tag

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MATRIX = REPO_ROOT / "images" / "matrix.yaml"
DEFAULT_COMPAT = REPO_ROOT / "images" / "compat.yaml"
# Fallback when compat data (or an archived cell) lacks `compat_floor`: NVIDIA's
# "Minimum Required Driver Version for CUDA Minor Version Compatibility", per major.
COMPAT_FLOORS = {"11": "450.80.02", "12": "525.60.13", "13": "580"}


@dataclass(frozen=True)
class ImageCell:
    """One image of the matrix, fully resolved against compat data."""

    name: str
    torch: str
    variant: str  # "cpu" or "cuXYZ"
    cuda: str | None  # "12.4"; None for cpu
    python: str  # "3.11"
    base_image: str
    source: str  # "index" | "wheelhouse"
    index_url: str | None  # PyTorch index for this variant
    min_driver: str | None  # oldest NVIDIA driver that runs this CUDA
    arch: tuple[str, ...]  # compute capabilities with cubins, e.g. ("8.0", "9.0")
    device: str  # "auto" | "cpu"
    ptx: str | None = None  # arch whose PTX is embedded (JIT on newer GPUs)
    # Oldest driver that runs this CUDA major's wheels through minor-version
    # compatibility (no PTX JIT). None: derived from the CUDA major (archived cells).
    compat_floor: str | None = None
    # The base image's pinned manifest digest (``sha256:...``): the build uses ``repo@digest``,
    # pulled by that digest when missing (unless --offline). None: the base is used by its name.
    base_digest: str | None = None
    # The GPU type a cluster backend routes the cell to (``gpu: a100``); None: any node, no GPU asked for.
    gpu: str | None = None

    @property
    def is_cuda(self) -> bool:
        return self.cuda is not None

    @property
    def base_ref(self) -> str:
        """What the build's ``FROM`` names: ``repository@sha256:...`` when pinned, else ``base_image``."""
        return f"{repository_of(self.base_image)}@{self.base_digest}" if self.base_digest else self.base_image


def repository_of(image: str) -> str:
    """``nvidia/cuda:12.4.1-x`` -> ``nvidia/cuda``; a registry's port (``host:5000/r:t``) is kept."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def split_digest(image: str, where: str, key: str = "base_image") -> tuple[str, str | None]:
    """``IMAGE@sha256:...`` -> ``(IMAGE, "sha256:...")``; a malformed digest is refused (never guessed at)."""
    if "@" not in image:
        return image, None
    name, digest = image.split("@", 1)
    if not name or not DIGEST_RE.match(digest):
        raise InputError(where, f"{key} {image!r} does not end in @sha256:<64 hex digits>",
                         hint="pin a base by the digest `docker pull` or `docker buildx imagetools inspect` prints")
    return name, digest


def same_image_digest(repo_digests: Iterable[str], ref: str) -> bool:
    """Whether an image's RepoDigests (``nvidia/cuda@sha256:...``) hold the pinned ``repo@digest`` (pure)."""
    repo, _, digest = ref.partition("@")

    def norm(name: str) -> str:
        for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
            name = name.removeprefix(prefix)
        return name.removeprefix("library/")

    return any(d.partition("@")[2] == digest and norm(d.partition("@")[0]) == norm(repo) for d in repo_digests)


# ----------------------------------------------------------------------------- compat


@dataclass(frozen=True)
class Compat:
    """compat.yaml, checked: ``cuda[ver]`` and ``torch[ver]`` as plain dicts."""

    cuda: dict[str, dict[str, Any]]
    torch: dict[str, dict[str, Any]]


def parse_compat(data: Any, where: str = "images/compat.yaml") -> Compat:
    """Check the shape of compat data and return it."""
    if not isinstance(data, dict) or data.get("schema") != COMPAT_SCHEMA:
        raise InputError(where, f"schema must be {COMPAT_SCHEMA}", hint="restore the file from git")
    cuda = data.get("cuda") or {}
    torch = data.get("torch") or {}
    if not isinstance(cuda, dict) or not isinstance(torch, dict):
        raise InputError(where, "`cuda` and `torch` must be mappings keyed by version")
    for ver, info in cuda.items():
        if not isinstance(info, dict) or "min_driver" not in info:
            raise InputError(where, f"cuda.{ver}: needs min_driver", hint='add e.g. min_driver: "550.54.14"')
        pinned = info.get("base_digest")
        if pinned is not None and not (isinstance(pinned, str) and DIGEST_RE.match(pinned)):
            raise InputError(where, f"cuda.{ver}: base_digest {pinned!r} is not sha256:<64 hex digits>",
                             hint="pin the digest `docker pull` prints, or leave base_digest out")
        floor = info.get("compat_floor")
        if floor is not None and _version(str(floor)) > _version(str(info["min_driver"])):
            raise InputError(where, f"cuda.{ver}: compat_floor {floor} is above min_driver {info['min_driver']}",
                             hint="compat_floor is the minor-version-compatibility floor, never above the toolkit's own minimum")
    for ver, info in torch.items():
        if not isinstance(info, dict) or not isinstance(info.get("variants"), dict):
            raise InputError(where, f"torch.{ver}: needs a `variants` mapping")
        if not isinstance(info.get("python"), list):
            raise InputError(where, f"torch.{ver}: needs a `python` list")
        for var, vinfo in info["variants"].items():
            vinfo = vinfo or {}
            if not isinstance(vinfo, dict):
                raise InputError(where, f"torch.{ver}.variants.{var}: must be a mapping like {{cuda: \"12.4\", arch: [...]}}")
            if var != "cpu" and str(vinfo.get("cuda")) not in cuda:
                raise InputError(where, f"torch.{ver}.variants.{var}: cuda {vinfo.get('cuda')!r} is not under `cuda:`")
    return Compat(cuda={str(k): v for k, v in cuda.items()}, torch={str(k): v for k, v in torch.items()})


# ----------------------------------------------------------------------------- cells


def _by_version(versions: Iterable[str]) -> list[str]:
    return sorted((str(v) for v in versions), key=_version)


def _releases_with(compat: Compat, has: Any) -> list[str]:
    """Torch releases (oldest first) whose compat entry satisfies ``has(info)``."""
    return [t for t in _by_version(compat.torch) if has(compat.torch[t])]


def _first_last(torch: str, releases: list[str], verb: str) -> str:
    """'first <verb> torch X' / 'last <verb> torch Y' / '<verb> torch X to Y, but not by T'."""
    if _version(torch) < _version(releases[0]):
        return f"first {verb} torch {releases[0]}"
    if _version(torch) > _version(releases[-1]):
        return f"last {verb} torch {releases[-1]}"
    return f"{verb} torch {releases[0]} to {releases[-1]}, but not by torch {torch}"


def _known_range(compat: Compat) -> str:
    known = _by_version(compat.torch)
    return f"{known[0]} to {known[-1]}" if known else "none"


def validate(name: str, spec: dict[str, Any], compat: Compat) -> str | None:
    """Why this cell cannot exist, or None.

    The reason is derived from the compat data: an unknown torch names the known range;
    a variant or CPython that this torch lacks names the torch release that first (or
    last) published it, found by scanning every release.
    """
    torch = str(spec.get("torch", ""))
    variant = str(spec.get("variant", ""))
    python = str(spec.get("python", ""))
    if not torch:
        return "torch is missing; add e.g. torch: \"2.5.1\""
    if torch not in compat.torch:
        same_minor = [t for t in _by_version(compat.torch) if _version(t)[:2] == _version(torch)[:2]]
        also = f"; torch {'.'.join(map(str, _version(torch)[:2]))} releases known: {', '.join(same_minor)}" if same_minor else ""
        return (f"torch {torch} is unknown to compat.yaml (known: {_known_range(compat)}{also}); "
                f"pick a known release or add it to images/compat.yaml")
    info = compat.torch[torch]
    if variant not in info["variants"]:
        has = ", ".join(info["variants"])
        releases = _releases_with(compat, lambda i: variant in (i.get("variants") or {}))
        if not releases:
            return (f"variant {variant or '(missing)'} was never published by a torch release known to compat.yaml "
                    f"({_known_range(compat)}); torch {torch} has {has}")
        when = _first_last(torch, releases, "published with")
        return f"variant {variant} was {when} (torch {torch} has {has}); pick one of those"
    supported = [str(p) for p in info["python"]]
    if python not in supported:
        has = ", ".join(supported)
        releases = _releases_with(compat, lambda i: python in [str(p) for p in i.get("python") or []])
        if not releases:
            return (f"python {python} is not supported by any torch release known to compat.yaml "
                    f"({_known_range(compat)}); torch {torch} supports {has}")
        when = _first_last(torch, releases, "supported by")
        return f"python {python} was {when} (torch {torch} supports {has}); set python to one of those"
    if spec.get("source") not in SOURCES:
        return f"source must be one of {', '.join(SOURCES)} (got {spec.get('source')!r})"
    if spec.get("device") not in DEVICES:
        return f"device must be one of {', '.join(DEVICES)} (got {spec.get('device')!r})"
    return None


def resolve_cell(name: str, spec: dict[str, Any], compat: Compat, defaults: dict[str, Any],
                 where: str = "images/matrix.yaml") -> ImageCell:
    """Turn one matrix entry into an :class:`ImageCell`, refusing impossible ones."""
    here = f"{where}: cells.{name}"
    if not _NAME_RE.match(name):
        raise InputError(where, f"cell name {name!r} must be lowercase letters, digits, '.', '_' or '-' (it becomes a Docker tag)")
    if not isinstance(spec, dict):
        raise InputError(here, "must be a mapping", hint='e.g. {torch: "2.5.1", variant: cu124}')
    unknown = sorted(set(spec) - CELL_KEYS)
    if unknown:
        raise InputError(here, f"unknown key(s) {', '.join(unknown)}", hint=f"allowed: {', '.join(sorted(CELL_KEYS))}")
    full = {
        "python": str(defaults.get("python", "3.11")),
        "source": defaults.get("source", "index"),
        "device": defaults.get("device", "auto"),
        **{k: (str(v) if k in ("torch", "python") else v) for k, v in spec.items()},
    }
    reason = validate(name, full, compat)
    if reason:
        raise InputError(here, reason)
    variant = str(full["variant"])
    vinfo = compat.torch[full["torch"]]["variants"][variant] or {}
    cuda = str(vinfo["cuda"]) if variant != "cpu" else None
    cinfo = compat.cuda.get(cuda, {}) if cuda else {}
    own_base = full.get("base_image")
    base = own_base or (
        cinfo.get("base_image") if cuda else str(defaults.get("cpu_base_image", "python:{python}-slim-bookworm"))
    )
    if not base:
        raise InputError(here, "no base_image and compat.yaml has none for this CUDA", hint="set base_image")
    if not isinstance(base, str):
        raise InputError(here, f"base_image must be an image name, got {type(base).__name__}", hint="e.g. python:{python}-slim")
    base, digest = split_digest(base, here)
    # A digest pins the image it was taken from: compat's digest goes with compat's base only.
    pinned = full.get("base_digest") if own_base or full.get("base_digest") else (cinfo.get("base_digest") if cuda else None)
    if pinned is not None:
        if digest is not None and digest != pinned:
            raise InputError(here, f"base_image pins {digest} but base_digest says {pinned}", hint="keep one of them")
        if not isinstance(pinned, str) or not DIGEST_RE.match(pinned):
            raise InputError(here, f"base_digest {pinned!r} is not sha256:<64 hex digits>",
                             hint="pin a base by the digest `docker pull` prints, or leave base_digest out")
        digest = pinned
    return ImageCell(
        name=name,
        torch=full["torch"],
        variant=variant,
        cuda=cuda,
        python=full["python"],
        base_image=base.replace("{python}", full["python"]),  # the one placeholder; no str.format on file text
        source=full["source"],
        index_url=f"{TORCH_INDEX}/{variant}",
        min_driver=str(cinfo["min_driver"]) if cuda else None,
        arch=tuple(str(a) for a in vinfo.get("arch", ())),
        device=full["device"],
        ptx=str(vinfo["ptx"]) if vinfo.get("ptx") else None,
        compat_floor=_compat_floor_of(cuda, cinfo),
        base_digest=digest,
        gpu=_gpu_type(full.get("gpu"), here),
    )


def _gpu_type(value: Any, here: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _GPU_RE.match(value):
        raise InputError(here, f"gpu {value!r} is not a GPU type name", hint="e.g. gpu: a100 (a GRES type of the cluster)")
    return value


def parse_matrix(data: Any, compat: Compat, where: str = "images/matrix.yaml") -> list[ImageCell]:
    """Check matrix data and resolve every cell (in file order)."""
    if not isinstance(data, dict) or data.get("schema") != MATRIX_SCHEMA:
        raise InputError(where, f"schema must be {MATRIX_SCHEMA}", hint=f"start the file with `schema: {MATRIX_SCHEMA}`")
    cells = data.get("cells")
    if not isinstance(cells, dict) or not cells:
        raise InputError(where, "`cells` must be a non-empty mapping of name -> {torch, variant, ...}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise InputError(where, "`defaults` must be a mapping")
    return [resolve_cell(str(name), spec, compat, defaults, where) for name, spec in cells.items()]


def _compat_floor_of(cuda: str | None, cinfo: dict[str, Any]) -> str | None:
    if not cuda:
        return None
    if cinfo.get("compat_floor"):
        return str(cinfo["compat_floor"])
    return COMPAT_FLOORS.get(cuda.split(".")[0])


def _read_yaml(path: Path) -> Any:
    """Safe-load a matrix, compat or site file: aliases refused, size and depth bounded (as bundle files)."""
    from ..bundle import load_yaml

    if not path.exists():
        raise InputError(str(path), "file not found", hint="pass an existing file (--matrix)")
    return load_yaml(path, str(path))


def load_matrix(matrix_path: str | Path | None = None, compat_path: str | Path | None = None) -> list[ImageCell]:
    """Load and validate the matrix (default: the repo's images/matrix.yaml + compat.yaml)."""
    mpath = Path(matrix_path) if matrix_path else DEFAULT_MATRIX
    cpath = Path(compat_path) if compat_path else DEFAULT_COMPAT
    compat = parse_compat(_read_yaml(cpath), str(cpath))
    return parse_matrix(_read_yaml(mpath), compat, str(mpath))


def unknown_cells(where: str, unknown: list[str], known: list[str]) -> InputError:
    """Cells the matrix does not have, named under the flag (or file) they were given with, each with the
    closest known cell when one is close (a transposed ``cpu-torch2.31``), and every known cell as the hint."""
    import difflib

    said = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        said.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return InputError(where, f"unknown cell{'s' if len(unknown) > 1 else ''} {', '.join(said)}",
                      hint=f"known: {', '.join(known)}")


def select(cells: list[ImageCell], names: list[str] | None, flag: str = "--cells") -> list[ImageCell]:
    """The named cells in the order asked (all cells when ``names`` is empty); ``flag`` is the option
    the names came from (``--cells``, ``--image``, ``--cell``), named in the error."""
    if not names:
        return list(cells)
    by_name = {c.name: c for c in cells}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise unknown_cells(flag, unknown, list(by_name))
    seen: dict[str, ImageCell] = {}
    for n in names:
        seen.setdefault(n, by_name[n])
    return list(seen.values())


def apply_base_images(cells: list[ImageCell], overrides: dict[str, str], where: str = "--base-image") -> list[ImageCell]:
    """Substitute base images: key ``"*"`` applies to every cell, a cell name wins over it (``where``: the flag
    or site file the overrides came from, named in the error)."""
    known = {c.name for c in cells}
    unknown = sorted(k for k in overrides if k != "*" and k not in known)
    if unknown:
        raise unknown_cells(where, unknown, sorted(known))
    out = []
    for c in cells:
        base = overrides.get(c.name) or overrides.get("*")
        if base:  # a site's own base: pinned only when it names a digest itself
            name, digest = split_digest(base, "--base-image", "image")
            out.append(replace(c, base_image=name, base_digest=digest))
        else:
            out.append(c)
    return out


def parse_site_config(data: Any, where: str) -> dict[str, Any]:
    """Check a site config: ``{base_images: {"*": IMAGE, CELL: IMAGE}, slurm: {...}, host: {...}}``
    (``slurm`` is checked by :mod:`harness.slurm_site`, ``host`` by :func:`parse_stated_host`)."""
    if data is None:
        return {"base_images": {}, "slurm": None, "host": None}
    if not isinstance(data, dict):
        raise InputError(where, "must be a mapping", hint='e.g. base_images: {"*": local/debian-py:bookworm}')
    unknown = sorted(map(str, set(data) - {"base_images", "slurm", "host"}))
    if unknown:
        raise InputError(where, f"unknown key(s) {', '.join(unknown)}", hint="allowed: base_images, slurm, host")
    bases = data.get("base_images") or {}
    if not isinstance(bases, dict) or not all(isinstance(v, str) and v for v in bases.values()):
        raise InputError(where, "base_images must map a cell name or \"*\" to an image name")
    host = parse_stated_host(data["host"], f"{where} host") if data.get("host") is not None else None
    return {"base_images": {str(k): v for k, v in bases.items()}, "slurm": data.get("slurm"), "host": host}


_DRIVER_RE = re.compile(r"^[0-9]{2,4}(\.[0-9]{1,4}){0,2}$")
_CAPABILITY_RE = re.compile(r"^[0-9]{1,2}\.[0-9]{1,2}$")
MAX_STATED_GPUS = 1024
STATED_HINT = 'e.g. host: {driver: "570.124.06", gpus: [{name: NVIDIA H100 80GB HBM3, capability: "9.0", count: 8}]}'


def stated_driver(value: Any, where: str) -> str:
    """A driver version as ``nvidia-smi`` prints it (``570.124.06``); one line naming ``where`` otherwise."""
    if not isinstance(value, str) or not _DRIVER_RE.match(value.strip()):
        raise InputError(where, f"driver {value!r} is not a driver version such as \"570.124.06\"",
                         hint="write it as nvidia-smi prints it, in quotes")
    return value.strip()


def stated_gpu(name: Any, capability: Any, count: Any, where: str) -> list[dict[str, Any]]:
    """``count`` GPUs named ``name`` of compute capability ``capability`` (``"9.0"``; None: not stated)."""
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InputError(where, f"a GPU needs a name, got {name!r}", hint=STATED_HINT)
    if isinstance(capability, (int, float)) and not isinstance(capability, bool):
        capability = f"{float(capability):.1f}"  # YAML reads 9.0 as a number
    if capability is not None and (not isinstance(capability, str) or not _CAPABILITY_RE.match(capability)):
        raise InputError(where, f"GPU {name.strip()}: capability {capability!r} is not a compute capability "
                                "such as \"9.0\"", hint="nvidia-smi --query-gpu=compute_cap prints it")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_STATED_GPUS:
        raise InputError(where, f"GPU {name.strip()}: count {count!r} is not a number of GPUs from 1 to "
                                f"{MAX_STATED_GPUS}", hint=STATED_HINT)
    return [{"name": name.strip(), "capability": capability} for _ in range(count)]


def parse_stated_host(data: Any, where: str) -> dict[str, Any]:
    """A site file's ``host:``: the driver and GPUs of the machines the cells are meant for, as a user states them.

    ``nvidia-smi`` is the only source of these facts that is measured; on a login node without
    GPUs ``harness images list`` plans with these instead. The result has :func:`detect_host`'s
    shape, and ``stated``: where they were stated (what was stated is never shown as measured).
    """
    if not isinstance(data, dict):
        raise InputError(where, "must be a mapping", hint=STATED_HINT)
    unknown = sorted(map(str, set(data) - {"driver", "gpus"}))
    if unknown:
        raise InputError(where, f"unknown key(s) {', '.join(unknown)}", hint="allowed: driver, gpus")
    driver = stated_driver(data["driver"], where) if data.get("driver") is not None else None
    entries = data.get("gpus") or []
    if not isinstance(entries, list):
        raise InputError(where, "gpus must be a list of {name, capability, count}", hint=STATED_HINT)
    gpus: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, dict) or set(map(str, entry)) - {"name", "capability", "count"}:
            raise InputError(where, f"each of gpus is {{name, capability, count}}, got {entry!r}", hint=STATED_HINT)
        gpus += stated_gpu(entry.get("name"), entry.get("capability"), entry.get("count", 1), where)
        if len(gpus) > MAX_STATED_GPUS:
            raise InputError(where, f"states more than {MAX_STATED_GPUS} GPUs", hint=STATED_HINT)
    return {"driver": driver, "gpus": gpus, "stated": where}


def describe_host(host: dict[str, Any]) -> str:
    """``driver 570.124.06, GPUs: 8 x NVIDIA H100 (9.0)``, and whether that was stated or measured."""
    counts: dict[str, int] = {}
    for g in host.get("gpus") or []:
        label = f"{g.get('name', 'GPU')} ({g.get('capability') or 'capability not stated'})"
        counts[label] = counts.get(label, 0) + 1
    gpus = ", ".join(label if n == 1 else f"{n} x {label}" for label, n in counts.items()) or "none"
    facts = f"driver {host.get('driver') or '-'}, GPUs: {gpus}"
    if host.get("stated"):
        return f"host (stated in {host['stated']}, not measured): {facts}"
    return f"host (measured): {facts}"


def load_site_config(path: str | Path) -> dict[str, Any]:
    """Read a per-host site config (YAML) such as ``base_images: {"*": local/debian-py:bookworm}``."""
    return parse_site_config(_read_yaml(Path(path)), str(path))


# ----------------------------------------------------------------------------- host


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text)))


def _cubin_runs_on(cell: ImageCell, capability: str) -> bool:
    # CUDA binary compatibility: an sm_XY cubin runs on X.Z with Z >= Y (same major).
    cap = _version(capability)
    if len(cap) < 2:
        return False
    return any(_version(a)[:1] == cap[:1] and _version(a) <= cap for a in cell.arch)


def _ptx_runs_on(cell: ImageCell, capability: str) -> bool:
    # Embedded PTX is JIT-compiled by the driver for any GPU at least as new.
    cap = _version(capability)
    return len(cap) >= 2 and bool(cell.ptx) and _version(cell.ptx) <= cap


def _runs_on(cell: ImageCell, capability: str) -> bool:
    return _cubin_runs_on(cell, capability) or _ptx_runs_on(cell, capability)


def _floor(cell: ImageCell) -> str | None:
    """The minor-version-compatibility floor for the cell's CUDA major (data, else derived)."""
    if cell.compat_floor:
        return cell.compat_floor
    derived = COMPAT_FLOORS.get(str(cell.cuda).split(".")[0])
    return derived or cell.min_driver  # unknown major: only the toolkit's own minimum is safe


def _major(cell: ImageCell) -> str:
    return f"{str(cell.cuda).split('.')[0]}.x"


def host_skip_reason(cell: ImageCell, host: dict[str, Any]) -> str | None:
    """Why this host cannot run the cell's CUDA build on its GPU, or None.

    A CUDA cell on a host without GPUs is not skipped: CUDA wheels run on the CPU.
    The driver is judged with two numbers: below the minor-version-compatibility floor
    of the CUDA major nothing runs (skip); between the floor and the toolkit's own
    minimum the cell runs (see :func:`host_warning`) unless it could only run by PTX
    JIT, which needs the toolkit's own minimum.
    """
    gpus = host.get("gpus") or []
    if not cell.is_cuda or not gpus:
        return None
    driver = host.get("driver")
    floor = _floor(cell)
    if driver and floor and _version(driver) < _version(floor):
        own = f"; CUDA {cell.cuda}'s own minimum is {cell.min_driver}" if cell.min_driver and cell.min_driver != floor else ""
        return (f"driver {driver} is below {floor}, the oldest that runs CUDA {_major(cell)} wheels "
                f"(minor-version compatibility){own}")
    caps = [str(g.get("capability")) for g in gpus if g.get("capability")]
    if caps and not any(_runs_on(cell, c) for c in caps):
        names = ", ".join(f"{g.get('name', 'GPU')} ({g.get('capability')})" for g in gpus)
        archs = ", ".join(cell.arch) + (f" + PTX {cell.ptx}" if cell.ptx else "")
        return f"no GPU here matches the wheel's archs [{archs}]: {names}"
    below_own = bool(driver and cell.min_driver and _version(driver) < _version(cell.min_driver))
    if below_own and caps and not any(_cubin_runs_on(cell, c) for c in caps):
        names = ", ".join(f"{g.get('name', 'GPU')} ({g.get('capability')})" for g in gpus
                          if g.get("capability") and _ptx_runs_on(cell, str(g.get("capability"))))
        return (f"{names} runs this wheel only by PTX JIT (no cubin matches; PTX {cell.ptx}), which needs "
                f"{cell.min_driver} (CUDA {cell.cuda}'s own minimum); driver {driver} is older and "
                f"minor-version compatibility does not cover PTX JIT")
    return None


def host_warning(cell: ImageCell, host: dict[str, Any]) -> str | None:
    """A caveat for a cell that runs here, or None.

    Between the minor-version-compatibility floor and the toolkit's own minimum driver
    the cell runs, but kernels that need PTX JIT may fail. Cells that
    :func:`host_skip_reason` skips get no warning.
    """
    gpus = host.get("gpus") or []
    driver = host.get("driver")
    if not cell.is_cuda or not gpus or not driver or not cell.min_driver:
        return None
    if host_skip_reason(cell, host) is not None:
        return None
    if _version(driver) < _version(cell.min_driver):
        return (f"driver {driver} is older than {cell.min_driver} (CUDA {cell.cuda}'s own minimum): "
                f"runs through minor-version compatibility; kernels that need PTX JIT may fail")
    return None


def effective_device(cell: ImageCell, host: dict[str, Any]) -> str:
    """``cuda`` when the cell may use a GPU of this host, else ``cpu``."""
    if cell.device == "cpu" or not cell.is_cuda or not host.get("gpus"):
        return "cpu"
    return "cuda"


def parse_nvidia_smi(text: str) -> dict[str, Any]:
    """Host facts from ``nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader``."""
    gpus, driver = [], None
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0]:
            continue
        gpus.append({"name": parts[0], "capability": parts[1] if re.match(r"^\d+\.\d+$", parts[1]) else None})
        driver = driver or parts[2]
    return {"driver": driver, "gpus": gpus}


def detect_host() -> dict[str, Any]:
    """This machine's NVIDIA driver and GPUs (no GPUs when ``nvidia-smi`` is absent or fails)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"driver": None, "gpus": []}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"driver": None, "gpus": []}
    return parse_nvidia_smi(out)


def names(cells: Iterable[ImageCell]) -> list[str]:
    """Cell names, in order."""
    return [c.name for c in cells]
