"""`harness images ...`: list, build, compose and wheelhouse for the matrix images.

Wired into the main CLI by ``harness.cli`` through :func:`register`. Handlers return an
exit code and raise :class:`~harness.errors.HarnessError` for bad input; ``harness.cli``
maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..docker_engine import Engine, is_step_line
from ..images import compose as compose_mod
from ..images import build as imagebuild
from ..images import footprint
from ..images import matrix
from ..errors import EXIT_OK, EXIT_RUN_FAILED, BackendError, HarnessError, InputError
from ..images.matrix import ImageCell
from ..options import parse_cells
from ..plan import load_image_cells, wheelhouse_dirs
from .common import add_offline, image_options

REPO_ROOT = matrix.REPO_ROOT
COMPOSE_FILE = REPO_ROOT / "compose.yaml"


# ----------------------------------------------------------------------------- arguments


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matrix", type=Path, default=None, help="matrix file (default images/matrix.yaml)")
    p.add_argument("--compat", type=Path, default=None, help="compat file (default images/compat.yaml)")
    p.add_argument("--cells", default=None, help="comma-separated cell names (default: all)")
    p.add_argument("--site-config", type=Path, default=os.environ.get("HARNESS_SITE_CONFIG") or None,
                   help="per-host YAML: base_images: {'*': IMAGE, CELL: IMAGE} (env HARNESS_SITE_CONFIG)")
    p.add_argument("--base-image", action="append", metavar="IMAGE|CELL=IMAGE",
                   help="substitute a base image for every cell or one cell (repeatable; wins over --site-config)")
    p.add_argument("--wheelhouse", action="append", metavar="DIR|CELL=DIR",
                   help="wheelhouse root with one subdir per cell, or CELL=DIR (repeatable; env HARNESS_WHEELHOUSE)")


def load_cells(args: argparse.Namespace) -> list[ImageCell]:
    """The selected, validated cells with base images substituted (site config, then flags)."""
    return load_image_cells(image_options(args), parse_cells(args.cells))


def wheelhouses(args: argparse.Namespace, cells: list[ImageCell]) -> dict[str, Path]:
    """Per-cell wheelhouse directories from ``--wheelhouse`` (or ``$HARNESS_WHEELHOUSE``)."""
    return wheelhouse_dirs(image_options(args).wheelhouses, cells)


def _console(stderr: bool = False) -> Any:
    from ..report import console

    return console(stderr=stderr)


# ----------------------------------------------------------------------------- handlers


def stated_host(args: argparse.Namespace) -> dict[str, Any] | None:
    """The driver and GPUs stated by ``--driver``/``--gpu`` (each wins over its key), else by the site file's
    ``host:``; None when nothing is stated (then ``nvidia-smi`` measures this machine)."""
    site = matrix.load_site_config(args.site_config)["host"] if args.site_config else None
    driver, gpus = getattr(args, "driver", None), getattr(args, "gpu", None) or []
    if not driver and not gpus:
        return site
    host = dict(site or {"driver": None, "gpus": []})
    stated = [f"{args.site_config} host"] if site else []
    if driver:
        host["driver"] = matrix.stated_driver(driver, "--driver")
        stated.append("--driver")
    if gpus:
        host["gpus"] = []
        for value in gpus:
            name, _, rest = value.partition(",")
            cap, _, count = rest.partition(",")
            if count.strip() and not count.strip().isdigit():
                raise InputError("--gpu", f"{value!r}: count {count.strip()!r} is not a number",
                                 hint="--gpu NAME[,CAPABILITY[,COUNT]], e.g. --gpu 'NVIDIA H100,9.0,8'")
            host["gpus"] += matrix.stated_gpu(name, cap.strip() or None, int(count) if count.strip() else 1, "--gpu")
        stated.append("--gpu")
    host["stated"] = " and ".join(stated)
    return host


def cmd_list(args: argparse.Namespace) -> int:
    """Table of cells: pins, source, base image, built or missing, skip reason or warning on this host
    (or on the host ``--driver``/``--gpu`` or the site file's ``host:`` describe)."""
    from rich.table import Table

    cells = load_cells(args)
    wh = wheelhouses(args, cells)
    host = stated_host(args) or matrix.detect_host()
    engine: Engine | None
    try:
        engine = Engine.connect()
    except BackendError as exc:
        engine, engine_note = None, exc.one_line()
    else:
        engine_note = ""
    table = Table(title="harness images")
    for col in ("cell", "torch", "variant", "python", "source"):
        table.add_column(col, no_wrap=True)
    for col in ("base image", "image", "on the stated host" if host.get("stated") else "on this host"):
        table.add_column(col, overflow="fold")
    warnings: list[tuple[str, str]] = []
    for c in cells:
        state = _image_state(engine, c, wh.get(c.name))
        skip = matrix.host_skip_reason(c, host)
        warning = None if skip else matrix.host_warning(c, host)
        where = f"skip: {skip}" if skip else f"runs ({matrix.effective_device(c, host)})"
        if warning:
            warnings.append((c.name, warning))
            where += " [yellow]with a warning (below)[/yellow]"
        source = "wheelhouse" if c.name in wh else c.source
        base = c.base_image + (f" @{c.base_digest[:19]}… (pinned)" if c.base_digest else "")
        if engine is not None and not engine.image_exists(c.base_ref):
            base += " [yellow](not in engine" + (": pulled by digest when built)" if c.base_digest else ")") + "[/yellow]"
        table.add_row(c.name, c.torch, c.variant, c.python, source, base, state, where)
    out = _console()
    out.print(table)
    for name, warning in warnings:  # as a matrix run notes them before its cells start
        out.print(f"[yellow]! {name}: {warning}[/yellow]", soft_wrap=True)
    if engine is not None:
        _print_footprint(out, engine, *_current_tags(cells, wh))
    out.print(matrix.describe_host(host), soft_wrap=True)
    if engine_note:
        out.print(f"[yellow]{engine_note}[/yellow]")
    return EXIT_OK


def _current_tags(cells: list[ImageCell], wh: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The content tags the current sources produce, and the cells whose tag that is known for."""
    current = set()
    for c in cells:
        try:
            current.add(imagebuild.plan_build(c, REPO_ROOT, wh.get(c.name)).tag)
        except HarnessError:
            continue  # without its wheelhouse the current tag is unknown: keep that cell's images
    known = {c.name for c in cells if any(t.startswith(f"{imagebuild.REPOSITORY}:{c.name}-") for t in current)}
    return current, known


def footprint_rows(engine: Engine, current: set[str], known: set[str]) -> tuple[list[footprint.ImageRow], int]:
    """Every harness image with its size, own size and state, and their total (shared layers once)."""
    usage = engine.disk_usage()
    rows, layers = [], []
    for img in usage.images:
        if not footprint.is_harness_image(img.tags, img.labels):
            continue
        cell = img.labels.get(imagebuild.LABEL_CELL) or next(
            (c for c in map(footprint.content_tag_cell, img.tags) if c), "?")
        rows.append(footprint.ImageRow(img.id, img.tags, cell, img.size, img.unique_size,
                                       footprint.image_state(img.tags, current, known)))
        layers.append(engine.layers(img.id))
    rows.sort(key=lambda r: (r.cell, r.state != footprint.CURRENT, r.tags))
    return rows, footprint.union_size(layers)


def _print_footprint(out: Any, engine: Engine, current: set[str], known: set[str]) -> None:
    from rich.table import Table

    rows, total = footprint_rows(engine, current, known)
    table = Table(title="harness images in the engine")
    for col in ("cell", "tags", "image", "size", "own", "state"):
        table.add_column(col, overflow="fold", justify="right" if col in ("size", "own") else "left")
    colour = {footprint.STALE: "yellow", footprint.DANGLING: "red"}
    for r in rows:
        state = f"[{colour[r.state]}]{r.state}[/{colour[r.state]}]" if r.state in colour else r.state
        table.add_row(r.cell, ", ".join(r.tags) or "<none>", r.id.split(":")[-1][:12], footprint.human_bytes(r.size),
                      footprint.human_bytes(r.unique), state)
    out.print(table)
    removable = [r for r in rows if r.state in (footprint.STALE, footprint.DANGLING)]
    out.print(f"total: {footprint.human_bytes(total)} in {len(rows)} harness image(s), shared layers counted once; "
              f"{len(removable)} stale or dangling (own bytes {footprint.human_bytes(sum(r.unique or 0 for r in removable))}; "
              "`harness images prune` removes them)")


def _image_state(engine: Engine | None, cell: ImageCell, wheelhouse: Path | None) -> str:
    if engine is None:
        return "? (no engine)"
    try:
        plan = imagebuild.plan_build(cell, REPO_ROOT, wheelhouse)
    except HarnessError:
        # Without its wheelhouse the content tag is unknown; say what the alias shows.
        alias = f"{imagebuild.REPOSITORY}:{cell.name}"
        return "alias only (no wheelhouse to check)" if engine.image_exists(alias) else "missing"
    if engine.image_exists(plan.tag):
        return "built"
    return "missing" if not engine.image_exists(plan.alias) else "stale"


def cmd_build(args: argparse.Namespace) -> int:
    """Build every selected cell's image that is missing; go on after a failure."""
    from rich.panel import Panel
    from rich.table import Table

    cells = load_cells(args)
    wh = wheelhouses(args, cells)
    # Every plan first: bad input (no wheelhouse, wrong torch in it) stops before any build.
    plans = [imagebuild.plan_build(c, REPO_ROOT, wh.get(c.name)) for c in cells]
    engine = Engine.connect()
    err = _console(stderr=True)
    status = err.status("")

    def progress(cell: str, event: str, text: str) -> None:
        if event == "start":
            err.print(f"[bold]{cell}[/bold]: {text}")
            status.update(f"{cell}: starting")
            status.start()
        elif event == "log":
            if is_step_line(text):
                err.print(f"  [dim]{text[:160]}[/dim]")
            status.update(f"{cell}: {text.strip()[:100]}")
        else:
            status.stop()
            mark = {"built": "[green]built[/green]", "cached": "[green]up to date[/green]"}.get(event, "[red]FAILED[/red]")
            err.print(f"{cell}: {mark} {text if event != 'failed' else ''}")

    try:
        results = imagebuild.ensure_images(engine, plans, progress, offline=bool(getattr(args, "offline", False)))
    finally:
        status.stop()
    table = Table(title="image build")
    for col in ("cell", "result", "tag", "seconds"):
        table.add_column(col, overflow="fold")
    failed = 0
    for plan in plans:
        r = results[plan.cell.name]
        if isinstance(r, HarnessError):
            failed += 1
            table.add_row(plan.cell.name, "[red]failed[/red]", plan.tag, "")
            tail = getattr(r, "log_tail", None)
            body = r.message + ("\n\n" + "\n".join(tail) if tail else "") + (f"\n{r.hint}" if r.hint and not tail else "")
            err.print(Panel(body, title=f"{plan.cell.name}: build failed", border_style="red"))
        else:
            table.add_row(plan.cell.name, "built" if r.built else "up to date", r.tag, f"{r.seconds:.1f}")
    _console().print(table)
    return EXIT_RUN_FAILED if failed else EXIT_OK


def cmd_compose(args: argparse.Namespace) -> int:
    """Write compose.yaml from the matrix, or with --check fail when the file is stale."""
    cells = matrix.load_matrix(args.matrix, args.compat)
    text = compose_mod.render_compose(cells)
    path: Path = args.output
    out = _console()
    if args.check:
        current = path.read_text() if path.exists() else None
        if current != text:
            out.print(f"{path} is stale (or missing); regenerate it with `harness images compose`")
            return EXIT_RUN_FAILED
        out.print(f"{path} is up to date")
        return EXIT_OK
    path.write_text(text)
    out.print(f"wrote {path} ({len(cells)} services)")
    return EXIT_OK


def stale_tags(image_tags: dict[str, list[str]], current: set[str], cells: set[str]) -> list[str]:
    """Content-addressed tags ``harness:<cell>-<hash>`` of the given cells that no current plan produces (pure).

    ``image_tags`` maps image id -> its tags. An image whose tags include a
    current one is kept whole (its ``harness:<cell>`` alias included).
    """
    stale = []
    for tags in image_tags.values():
        if any(t in current for t in tags):
            continue
        for t in tags:
            repo, _, name = t.partition(":")
            cell, _, digest = name.rpartition("-")
            if repo == imagebuild.REPOSITORY and cell in cells and len(digest) == 12:
                stale.append(t)
    return sorted(stale)


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove containers of dead runs, outdated content-addressed images of the selected cells (each
    code change leaves one), untagged images the harness built, and with --build-cache the engine's
    build cache that no image holds; print what that freed."""
    cells = load_cells(args)
    current, known = _current_tags(cells, wheelhouses(args, cells))
    engine = Engine.connect()
    out = _console()
    from ..backends.docker import LABEL_RUN, remove_dead_containers

    verb = "would remove" if args.dry_run else "removed"
    before = engine.disk_usage()
    # Containers a killed run left behind (SIGKILL, a crash) first: they may hold the images.
    for f in remove_dead_containers(engine, dry_run=args.dry_run):
        out.print(f"{verb} container {f.id[:12]} "
                  f"({f.labels.get('org.harness.cell', '?')}, run {f.labels.get(LABEL_RUN, '?')}: its run is gone)")
    own = {i.id: i.unique_size for i in before.images}
    ids = engine.images(imagebuild.REPOSITORY)
    stale = stale_tags(ids, current, known)
    for tag in stale:
        if not args.dry_run:
            engine.remove_image(tag)
        image = next((i for i, tags in ids.items() if tag in tags), "")
        out.print(f"{verb} {tag} (own bytes {footprint.human_bytes(own.get(image))})")
    dangling, _ = engine.prune_dangling_images(imagebuild.LABEL_CELL, dry_run=args.dry_run)
    for image in dangling:
        out.print(f"{verb} dangling image {image.split(':')[-1][:12]} (own bytes {footprint.human_bytes(own.get(image))})")
    cache = 0
    if args.build_cache and not args.dry_run:
        cache = engine.prune_build_cache()
    after = before if args.dry_run else engine.disk_usage()
    freed = max(0, before.layers_size - after.layers_size) + cache
    out.print(f"{len(stale)} outdated image tag(s), {len(dangling)} dangling image(s); kept {len(current)} current; "
              + ("nothing removed (--dry-run)" if args.dry_run else
                 f"freed {footprint.human_bytes(freed)}" + (f" (build cache {footprint.human_bytes(cache)})" if cache else "")))
    return EXIT_OK


def cmd_wheelhouse(args: argparse.Namespace) -> int:
    """pip-download each selected cell's wheels into DEST/<cell>."""
    cells = matrix.select(matrix.load_matrix(args.matrix, args.compat), list(parse_cells(args.cells) or []) or None)
    for c in cells:
        dest = imagebuild.make_wheelhouse(c, args.dest / c.name, args.python,
                                          c.index_url if args.torch_index else None)
        _console().print(f"{c.name}: {dest}")
    return EXIT_OK


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``images {list,build,compose,wheelhouse}`` to the main CLI's subparsers."""
    images = subparsers.add_parser("images", help="list, build and compose the matrix images")
    sub = images.add_subparsers(dest="images_command", metavar="{list,build,compose,prune,wheelhouse}")
    sub.required = True

    p = sub.add_parser("list", help="cells, pins, base images, built or missing, skips on this host")
    _common(p)
    p.add_argument("--driver", metavar="VERSION",
                   help="plan for this NVIDIA driver instead of running nvidia-smi here (e.g. on a login node "
                        "without GPUs); shown as stated, not measured")
    p.add_argument("--gpu", action="append", metavar="NAME[,CAPABILITY[,COUNT]]",
                   help="plan for these GPUs instead of this machine's, e.g. 'NVIDIA H100 80GB HBM3,9.0,8' "
                        "(repeatable; the site file's host: gpus says the same)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("build", help="build missing images (content-addressed; unchanged cells are skipped)")
    _common(p)
    add_offline(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("compose", help="write compose.yaml from the matrix")
    p.add_argument("--matrix", type=Path, default=None, help="matrix file (default images/matrix.yaml)")
    p.add_argument("--compat", type=Path, default=None, help="compat file (default images/compat.yaml)")
    p.add_argument("--output", type=Path, default=COMPOSE_FILE, help="default: compose.yaml at the repo root")
    p.add_argument("--check", action="store_true", help="exit 1 when the file differs from what would be written")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("prune", help="remove containers of dead runs, harness images that no selected cell's current "
                                     "inputs produce, and untagged images the harness built; print the bytes freed")
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--build-cache", action="store_true",
                   help="also drop the engine's build cache that no image holds (all of it, not only the harness's)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("wheelhouse", help="pip-download the wheels of cells for offline builds")
    p.add_argument("--matrix", type=Path, default=None, help="matrix file (default images/matrix.yaml)")
    p.add_argument("--compat", type=Path, default=None, help="compat file (default images/compat.yaml)")
    p.add_argument("--cells", required=True, help="comma-separated cell names")
    p.add_argument("--dest", type=Path, required=True, help="root directory; each cell gets DEST/<cell>")
    p.add_argument("--python", default=sys.executable, help="python whose pip downloads (default: this one)")
    p.add_argument("--torch-index", action="store_true",
                   help="use the cell's download.pytorch.org index (needs network; picks the CUDA variant)")
    p.set_defaults(func=cmd_wheelhouse)
    return images
