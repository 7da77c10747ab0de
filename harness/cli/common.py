"""What several commands share: their flags, the typed options made of them, and the exit code of a verdict.

Kept apart so that no command module imports another.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..api import parting_exit, verdict_exit  # noqa: F401 - the exit code of a verdict and of diverge: one table each
from ..options import ImageOptions, ReportOptions, SlurmFlags

EXIT_CODES_HELP = """exit codes:
  0    every cell that ran reproduced: bitwise, numerically equal or the same distribution
       (skipped cells are listed, not counted against it); or nothing was recorded to judge
       against, or a difference was not judged (no seed band: --band-seeds 0)
  1    a cell, an image build or a container failed, the run is incomplete
       (interrupted, or planned cells left no record), or a cell is not comparable
       (its data does not match the digest the bundle records; see --allow-data-change)
  2    bad input or usage: one line names the file, key and fix
  3    everything ran, and a cell drifted: outside the seed band's prediction interval
       at the false-alarm rate --alpha (a retrain in the reference environment would not
       plausibly give it), or outside an explicit --tol
  130  interrupted (Ctrl-C): finished records, an interrupted record and report.json stay
  143  terminated (SIGTERM): as for Ctrl-C; running containers and workers are removed"""


# --------------------------------------------------------------------------- options shared by run and matrix


def add_inputs(p: argparse.ArgumentParser) -> None:
    """What every command that trains reads and writes: the bundle, its data and trainer, the results."""
    p.add_argument("bundle", help="the optuna_best directory")
    p.add_argument("--data", help="dataset file (overrides config.yaml data.path)")
    add_data_dir(p)
    p.add_argument("--trainer", help="your own trainer as module:function (overrides config.yaml trainer.entrypoint)")
    p.add_argument("--trainer-path", action="append",
                   help="directory holding the trainer's top-level package or module (repeatable; each goes on sys.path, in order)")
    p.add_argument("--trainer-cmd", metavar="CMD",
                   help='your own trainer as a command, e.g. "{python} -m mypkg.retrain {bundle} --out {out_dir}" '
                        "(overrides config.yaml trainer.command; not with --trainer)")
    p.add_argument("--seed-key", metavar="KEY",
                   help="the dotted key of config.yaml your trainer reads its seed from, e.g. seed or "
                        "train.random_state (overrides config.yaml trainer.seed_key; default training.seed, else seed; "
                        "a seed band writes each member's seed there)")
    p.add_argument("--trainer-cwd", metavar="bundle|project",
                   help="where your trainer runs (overrides config.yaml trainer.cwd): bundle, the optuna_best directory, "
                        "or project, its code directory (the first --trainer-path), against which a relative data.path "
                        "is then resolved too (default: a function runs where harness runs, a command in its cell's "
                        "directory; docs/trainer-cwd.md)")
    p.add_argument("-o", "--out", help="results directory (default: harness-results/<bundle>-<time>)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write all records plus the comparison as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write a Markdown table (for a pull-request comment)")
    add_html(p)
    add_detail(p)
    p.add_argument("--trace", action="store_true", help="write each training step's loss bits and parameter digests to trace.jsonl in the cell's directory (for harness diverge; a custom trainer is traced through torch's optimizer hooks, docs/hooks.md)")
    p.add_argument("--data-path", dest="data_feed", choices=("loader", "fast"), default=None,
                   help="the reference trainer's batches: fast (the default: the train split held on the device, "
                        "batches taken by index in the seeded DataLoader's exact order, used only after a real "
                        "DataLoader's first epochs prove the order equal, else it falls back to loader and says why) "
                        "or loader (the seeded DataLoader itself); both train the same weights; recorded as data_feed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timeout", default=None, metavar="SECONDS",
                   help="kill a cell that runs longer (90, 30m, 2h; default 6h); it is recorded as timeout")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("--strict-config", action="store_true",
                   help="refuse (exit 2) a config.yaml key of data/model/training that the reference trainer does not "
                        "read, e.g. a misspelt model.hiden (default: a warning, and the key is ignored)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="reuse a results directory (--out, or DIR) that holds earlier records: a cell whose earlier "
                        "record finished with unchanged inputs (image or environment, spec, bundle, data, trainer) "
                        "is reused, every other cell is rerun and its record replaced")
    p.add_argument("--force", action="store_true",
                   help="with --resume: rerun every cell, even those whose earlier record could be reused")
    p.add_argument("--jobs", default="auto", metavar="N",
                   help="cells run at once, per device: up to N CPU cells, and up to N cells sharing each GPU "
                        "(default auto: as many as the cores allow, each cell holding as many cores as its thread "
                        "count, all of them for the default count; on a GPU, as many as its memory holds by the "
                        "first finished cell's peak, at most 8; docs/gpu-sharing.md)")
    p.add_argument("--cold", action="store_true",
                   help="start every cell cold: on the local backend a fresh interpreter instead of a fork of a "
                        "warm server that imported torch once per worker environment; on Docker each cell's container "
                        "at its turn instead of ahead of it, importing while the cells before it run "
                        "(docs/warm-worker.md); the results are the same bit for bit, only slower")


HTML_HELP = ("write one self-contained HTML page (opens offline: inline SVG, no script, no URL): the environment "
             "and results tables, every cell's loss curve (with --trace), the deltas against the band, the attribution")


def add_html(p: argparse.ArgumentParser, help: str = HTML_HELP) -> None:
    p.add_argument("--html", metavar="FILE", help=help)


def add_detail(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--detail", action="store_true",
                   help="print every table (environment, results, per-target metrics, band, attribution, weights) "
                        "instead of the first screen: the verdict, one line per cell, which axis moved what")


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="the directory around the data, for trainers that read files beside it: mounted whole "
                        "(read-only, at /harness/data) and hashed into the record; the data must lie inside it")
def add_common(p: argparse.ArgumentParser) -> None:
    add_inputs(p)
    add_tolerance_flags(p)
    p.add_argument("--repeats", default=1,
                   help="run each cell N times; repeats with one distinct result mark the cell deterministic, "
                        "otherwise their spread is shown (and is the cell's numerical noise when no ulp band was measured)")
    add_allow_data_change(p)
    g = p.add_argument_group("bands: the yardsticks of a verdict (docs/verdicts.md)")
    g.add_argument("--band", default="auto", metavar="N",
                   help="first retrain the baseline cell N times (e.g. 8), each with one initial weight moved "
                        "by one ulp: the numerical noise of one trajectory (numerically equal); auto (default): 4, "
                        "only when a cell differs from its reference beyond float32 rounding by less than 1e-4; 0: never")
    g.add_argument("--band-seeds", default="auto", metavar="N",
                   help="retrain the baseline with N other training seeds (seed+1 ...): the distribution a cell is "
                        "judged against (same distribution or drifted); auto (default): 8, only when a cell differs "
                        "from its reference beyond numerical noise; 0: never")
    g.add_argument("--cell-seeds", default=0, metavar="K",
                   help="also retrain every cell with the first K of the band's seeds: its shift is then tested "
                        "seed by seed (paired), with far more power than one retrain (see docs/verdicts.md)")
    g.add_argument("--band-from", metavar="DIR",
                   help="judge against a band measured earlier (harness band ... -o DIR, or a run with --band); "
                        "it must be of this bundle's config and data")


def add_tolerance_flags(p: argparse.ArgumentParser) -> None:
    """--alpha, --tol and --tolerances: how a verdict is reached (run, matrix, compare)."""
    p.add_argument("--alpha", default=None, metavar="A",
                   help="the false-alarm rate of 'drifted' per cell (default 0.01): a cell from the same distribution "
                        "as its reference is called drifted with at most this probability")
    p.add_argument("--tol", action="append", default=[], metavar="METRIC=abs:X[,rel:Y]",
                   help="an explicit tolerance gate for val_loss, r2, mse or mae (repeatable), e.g. --tol r2=abs:1e-4: "
                        "a cell outside it is drifted whatever the bands say")
    p.add_argument("--tolerances", metavar="FILE", help="YAML file of tolerance gates: {r2: {abs: 1e-4}, mse: {rel: 0.01}}")


def add_allow_data_change(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-data-change", action="store_true",
                   help="judge cells whose data does not match the digest the bundle records "
                        "(default: such cells are 'not comparable', exit 1)")


def add_docker(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("docker backend")
    g.add_argument("--matrix", type=Path, default=None, metavar="FILE", help="version matrix (default images/matrix.yaml)")
    g.add_argument("--compat", type=Path, default=None, metavar="FILE", help="compatibility data (default images/compat.yaml)")
    g.add_argument("--base-image", action="append", default=[], metavar="[CELL=]IMAGE",
                   help="build on this base image instead of the matrix's (every cell, or CELL=IMAGE)")
    g.add_argument("--site-config", type=Path, default=os.environ.get("HARNESS_SITE_CONFIG") or None, metavar="FILE",
                   help="YAML with base_images: {'*': IMAGE, CELL: IMAGE} (env HARNESS_SITE_CONFIG)")
    g.add_argument("--wheelhouse", action="append", default=[], metavar="[CELL=]DIR",
                   help="offline wheels: a directory with one sub-directory per cell, or CELL=DIR (env HARNESS_WHEELHOUSE)")
    g.add_argument("--gpus", default="all", help="GPUs to request for CUDA cells: all, none, or device ids like 0,1")
    g.add_argument("--memory", help="memory limit per container, e.g. 8g")
    add_offline(g)


def add_slurm(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slurm backend (each flag overrides the site file's slurm: key)")
    g.add_argument("--partition", help="Slurm partition for every cell's job")
    g.add_argument("--account", help="Slurm account to charge")
    g.add_argument("--qos", help="Slurm quality of service")
    g.add_argument("--time", metavar="LIMIT", help="Slurm time limit per cell: minutes, 30m, 2h or H:MM:SS (default 1h)")
    g.add_argument("--mem", help="memory per cell's job, e.g. 16G")
    g.add_argument("--cpus-per-task", metavar="N", help="CPUs per cell's job")
    g.add_argument("--runtime", choices=("python", "docker"), default=None,
                   help="what runs on the node: python (the node's interpreter, default) or docker (the cell's image)")
    g.add_argument("--python", metavar="PATH", help="the node's python, with harness and submitit installed "
                                                    "(default: the one running harness)")
    g.add_argument("--gpu-types", metavar="T1,T2", help="run every cell on each GPU type (GRES types), "
                                                        "as CELL-T1, CELL-T2; or name one per cell: --cells CELL@T1")


SLURM_KEYS = ("partition", "account", "qos", "time", "mem", "cpus_per_task", "runtime", "python", "gpu_types")


def slurm_values(args: argparse.Namespace) -> dict[str, Any]:
    """The slurm backend's flags as given (None: left out), keyed as :func:`harness.api.build_slurm_flags` reads them."""
    return {k: getattr(args, k, None) for k in SLURM_KEYS}


def slurm_flags(args: argparse.Namespace) -> SlurmFlags:
    """The slurm backend's flags as typed options (a flag left out: the site file decides)."""
    from ..api import build_slurm_flags

    return build_slurm_flags(**slurm_values(args))


def add_offline(p: Any) -> None:
    p.add_argument("--offline", action="store_true",
                   help="never pull: a missing base image pinned by digest skips its cell instead of being pulled")




# --------------------------------------------------------------------------- arguments -> typed options


def tolerances(args: argparse.Namespace) -> Any:
    """``--tolerances FILE`` and ``--tol`` as :class:`harness.judge.Tolerances` (harness.api builds them)."""
    from ..api import build_tolerances

    return build_tolerances(getattr(args, "tol", []), getattr(args, "tolerances", None))


def report_options(args: argparse.Namespace) -> ReportOptions:
    """``--json``, ``--markdown``, ``--html``, ``--detail``, ``--alpha`` ... as :class:`ReportOptions` (harness.api
    builds them; a bad ``--html`` target is refused there, before anything trains)."""
    from ..api import build_report_options

    return build_report_options(command=str(getattr(args, "command", "") or ""),
                                json_out=getattr(args, "json_out", None), markdown=getattr(args, "markdown", None),
                                html=getattr(args, "html", None), detail=bool(getattr(args, "detail", False)),
                                allow_data_change=bool(getattr(args, "allow_data_change", False)),
                                alpha=getattr(args, "alpha", None), paths=getattr(args, "paths", None) or ())


IMAGE_KEYS = ("matrix", "compat", "base_image", "site_config", "wheelhouse", "gpus", "memory", "offline")


def image_values(args: argparse.Namespace) -> dict[str, Any]:
    """The docker backend's flags as given, keyed as :func:`harness.api.build_image_options` reads them."""
    return {k: getattr(args, k, None) for k in IMAGE_KEYS}


def image_options(args: argparse.Namespace) -> ImageOptions:
    """The docker backend's options, from the flags every image-using command shares."""
    from ..api import build_image_options

    return build_image_options(**image_values(args))
