"""A script as the trainer: ``--trainer-cmd "{python} -m mypkg.retrain {bundle} --out {out_dir}"``.

For projects whose entry point is a command rather than a function. The worker
splits the command with :func:`shlex.split` (no shell), fills the placeholders of
:data:`harness.bundle.PLACEHOLDERS` in each word (the bundle checked them before anything ran:
:func:`harness.bundle.check_command`), and runs it as its own child, in the cell's
results directory, with the worker's environment (``CUBLAS_WORKSPACE_CONFIG`` and
``PYTHONHASHSEED`` are already set there before any interpreter starts) plus the
``HARNESS_*`` variables of :func:`command_env`. Every Python process the command
starts is seeded and switched by the harness at interpreter start (see
:mod:`harness.worker.childsite`), so the seeding stays the harness's, as for a
function.

The command hands its metrics back in ``$HARNESS_METRICS_FILE`` (``OUT/metrics.json``),
or else as the last JSON object printed on one line, or the last YAML mapping
printed after a ``---`` line, of its stdout (:func:`metrics_from_stdout`); the
mapping takes every shape a trainer function may return
(:func:`harness.worker.trainer_api.normalise_result`). Weights written to
``OUT/weights/best.pt`` are compared with the archived ones.

Pure helpers first; the effects (the process, its files) are in :func:`run_command`,
:func:`install_site`, :func:`read_markers` and :func:`read_metrics_file`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..bundle import PLACEHOLDER, placeholders
from ..errors import InputError, RunFailed
from ..safeio import create_new, read_no_follow, tail_no_follow
from . import EVENT_PREFIX

METRICS_FILE = "metrics.json"
STDOUT_LOG = "trainer.stdout.log"
STDERR_LOG = "trainer.stderr.log"
SITE_FILE = "sitecustomize.py"
STDOUT_KEEP = 8 << 20  # bytes of stdout kept in memory to find the metrics in
METRICS_MAX = 256 << 20  # a metrics file larger than this is refused
MARKERS_KEPT = 16
TAIL_CHARS = 4000


# --------------------------------------------------------------------------- the command (pure)


def substitute(argv: list[str], values: Mapping[str, str | None], where: str = "--trainer-cmd") -> list[str]:
    """Each word with its placeholders filled; every word stays one word."""
    placeholders(argv, where)

    def fill(m: re.Match[str]) -> str:
        value = values.get(m.group(1))
        if value is None:
            raise InputError(where, f"{{{m.group(1)}}} has no value in this run", hint=f"drop {{{m.group(1)}}}")
        return str(value)

    return [PLACEHOLDER.sub(fill, word) for word in argv]


def command_env(base: Mapping[str, str], *, seed: int, device: str, bundle: str, config: str, data: str | None,
                out_dir: str, determinism: str, threads: int | None, tf32: bool, code_dirs: list[str],
                site_dir: str, markers: str, worker_pid: int, perturb: Mapping[str, Any] | None = None,
                trace: str | None = None) -> dict[str, str]:
    """The command's environment: the worker's (determinism variables included), plus the run's facts.

    ``PYTHONPATH`` is the seeding hook's folder, then the trainer folders, then the inherited one.
    """
    env = dict(base)
    env.update({
        "HARNESS_SEED": str(seed),
        "HARNESS_DEVICE": device,
        "HARNESS_BUNDLE": bundle,
        "HARNESS_CONFIG": config,
        "HARNESS_OUT_DIR": out_dir,
        "HARNESS_METRICS_FILE": str(Path(out_dir) / METRICS_FILE),
        "HARNESS_DETERMINISM": determinism,
        "HARNESS_THREADS": str(threads) if threads else "",
        "HARNESS_TF32": "1" if tf32 else "0",
        "HARNESS_CHILD_MARKERS": markers,
        "HARNESS_WORKER_PID": str(worker_pid),
        "PYTHONUNBUFFERED": "1",  # progress lines arrive as they are printed
    })
    for key, value in (("HARNESS_PERTURB", json.dumps(dict(perturb)) if perturb else None), ("HARNESS_TRACE", trace)):
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    if data is not None:
        env["HARNESS_DATA"] = data
    else:
        env.pop("HARNESS_DATA", None)
    env["PYTHONPATH"] = os.pathsep.join([site_dir, *code_dirs, *([base["PYTHONPATH"]] if base.get("PYTHONPATH") else [])])
    return env


def child_event(line: str) -> dict[str, Any] | None:
    """A progress line of the command, ``HARNESS-EVENT {"event": "epoch", "epoch": 3, "epochs": 20, ...}``.

    Only epoch events are taken, with numeric values; anything else is an ordinary line.
    """
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        ev = json.loads(line[len(EVENT_PREFIX):])
    except ValueError:
        return None
    if not isinstance(ev, dict) or ev.get("event") != "epoch" or not isinstance(ev.get("epoch"), int):
        return None
    row = {k: float(v) for k, v in ev.items()
           if k not in ("event", "cell") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    row["epoch"] = ev["epoch"]
    return row


# --------------------------------------------------------------------------- metrics on stdout (pure)

_DOC_START = re.compile(r"^---(?:[ \t]+(.*))?$")
_DOC_END = re.compile(r"^(?:---(?:[ \t].*)?|\.\.\.)[ \t]*$")


def metrics_from_stdout(text: str) -> tuple[dict[str, Any], str] | None:
    """The last mapping the command printed: a JSON object on one line, or a YAML mapping after ``---``.

    A YAML document runs from a ``---`` line to the next ``---``, a ``...`` line or the
    end. Whichever of the two kinds starts later wins. Progress lines are skipped.
    Returns the mapping and where it was found, or None.
    """
    import yaml

    lines = ["" if line.startswith(EVENT_PREFIX) else line for line in text.splitlines()]
    best: tuple[int, dict[str, Any], str] | None = None
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("{") and s.endswith("}"):
            try:
                value = json.loads(s)
            except ValueError:
                continue
            if isinstance(value, dict):
                best = (i, value, f"stdout line {i + 1} (JSON)")
    for i, line in enumerate(lines):
        m = _DOC_START.match(line.rstrip())
        if m is None or (best is not None and i < best[0]):
            continue
        body = [m.group(1) or ""]
        for nxt in lines[i + 1:]:
            if _DOC_END.match(nxt.rstrip()):
                break
            body.append(nxt)
        try:
            value = yaml.safe_load("\n".join(body))
        except yaml.YAMLError:
            continue
        if isinstance(value, dict) and (best is None or i >= best[0]):
            best = (i, value, f"stdout line {i + 1} (YAML after ---)")
    return None if best is None else (best[1], best[2])


# --------------------------------------------------------------------------- effects


HOOKS_PACKAGE = "_harness_hooks"  # harness.worker.hooks and its two siblings, beside the sitecustomize
HOOKS_FILES = ("hooks.py", "perturb.py", "trace.py")


def install_site(folder: Path) -> Path:
    """Copy the seeding hook into ``folder`` as ``sitecustomize.py``, and the torch hooks as a package; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    (folder / SITE_FILE).write_bytes((here / "childsite.py").read_bytes())
    package = folder / HOOKS_PACKAGE
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text('"""harness.worker.hooks, copied for a trainer command\'s processes."""\n')
    for name in HOOKS_FILES:
        (package / name).write_bytes((here / name).read_bytes())
    return folder


def hooks_outcome(processes: list[dict[str, Any]], asked: Mapping[str, Any] | None) -> tuple[Any, list[str]]:
    """The command's perturbation, from what its processes' hooks reported (pure); and warnings.

    One process applied it: that one. Several: the first, and a warning. None: why not,
    from the first process that says, else that no process with torch reported one.
    """
    if not asked:
        return None, []
    reports = [(p.get("pid"), (p.get("hooks") or {})) for p in processes]
    applied = [(pid, h["perturbation"]) for pid, h in reports if (h.get("perturbation") or {}).get("applied")]
    warnings = [f"the torch hooks failed in process {pid}: {h['error']}" for pid, h in reports if h.get("error")]
    if applied:
        pid, first = applied[0]
        if len(applied) > 1:
            warnings.append(f"{len(applied)} Python processes of the command each perturbed a model; the band "
                            f"member counts process {pid}'s")
        return {**first, "process": pid}, warnings
    why = next((h["perturbation"].get("skipped") for _, h in reports if (h.get("perturbation") or {}).get("skipped")),
               None)
    return {"kind": asked.get("kind"), "seed": asked.get("seed"), "applied": False,
            "skipped": why or "no Python process of the command that imported torch reported a perturbation "
                              "(none ran a torch.nn module, or it ended without running its exit handlers)"}, warnings


def trace_outcome(processes: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    """The command's trace, from what its processes' hooks reported (pure); and warnings.

    The first process to make an optimizer step writes the trace (the others find the file
    taken): that one, with its pid. Another process that stepped too is said in a warning,
    since the trace does not hold its steps. None when no process traced a step.
    """
    traces = [(p.get("pid"), (p.get("hooks") or {}).get("trace")) for p in processes]
    pid, first = next(((pid, t) for pid, t in traces if (t or {}).get("steps")), (None, None))
    if first is None:
        return None, []
    others = [str(q) for q, t in traces if t is not None and q != pid]  # they stepped; the file was taken
    warnings = [(f"{len(others)} other Python process(es) of the command (pid {', '.join(others)}) made optimizer "
                 f"steps too: the trace holds process {pid}'s only")] if others else []
    return {**first, "process": pid}, warnings


def read_metrics_file(path: Path) -> dict[str, Any] | None:
    """``$HARNESS_METRICS_FILE`` as a mapping (read without following a link); None when the command did not write it."""
    raw = read_no_follow(path, METRICS_MAX)
    if raw is None:
        return None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RunFailed(f"the trainer command wrote {path.name}, which is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RunFailed(f"the trainer command wrote {path.name} holding a {type(value).__name__}, "
                        "not a JSON object of metrics")
    return value


def read_markers(folder: Path) -> list[dict[str, Any]]:
    """What the seeding hook wrote, one mapping per Python process the command started, oldest pid first."""
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json"), key=lambda p: (len(p.stem), p.stem)):
        try:
            raw = read_no_follow(path, 1 << 20)
            value = json.loads(raw.decode("utf-8")) if raw else None
        except (RunFailed, UnicodeDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def remove_stale(path: Path) -> None:
    """Remove what a previous run left at ``path`` (a file or a link, never what a link points to)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
    except FileNotFoundError:
        pass


@dataclass
class Finished:
    """How the command ended."""

    exit_status: int  # negative: killed by that signal
    stdout: str  # the end of its stdout (STDOUT_KEEP bytes at most), where the metrics are looked for
    stderr_tail: str  # the end of its stderr, for the record's log_tail
    argv: list[str] = field(default_factory=list)

    @property
    def how(self) -> str:
        if self.exit_status < 0:
            try:
                name = signal.Signals(-self.exit_status).name
            except ValueError:
                name = f"signal {-self.exit_status}"
            return f"was killed by {name}"
        return f"exited with status {self.exit_status}"


def run_command(argv: list[str], *, cwd: str, env: Mapping[str, str], out_dir: Path,
                on_line: Callable[[str], None] | None = None) -> Finished:
    """Run the command as a child of this process: stdout to ``trainer.stdout.log`` (each line also to
    ``on_line``), stderr to ``trainer.stderr.log``.

    The child stays in the worker's process group, so the backend's stop (timeout,
    Ctrl-C, SIGTERM) reaches it and whatever it started; when the worker leaves this
    function any other way (an exception, a SIGTERM sent to the worker alone) the
    child is stopped first.
    """
    with os.fdopen(create_new(out_dir / STDOUT_LOG), "wb") as out_fh, os.fdopen(create_new(out_dir / STDERR_LOG), "wb") as err_fh:
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err_fh, close_fds=True)
        except FileNotFoundError:
            raise InputError("--trainer-cmd", f"{argv[0]!r} was not found (PATH={env.get('PATH', '')})",
                             hint="name a program that exists where the cell runs, e.g. {python} for the worker's Python") from None
        except OSError as exc:
            raise RunFailed(f"the trainer command {argv[0]!r} cannot be started: {exc}") from None
        restore = _stop_child_on_sigterm(proc)
        kept: list[bytes] = []
        size = 0
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                out_fh.write(raw)
                out_fh.flush()
                kept.append(raw)
                size += len(raw)
                while size > STDOUT_KEEP and len(kept) > 1:
                    size -= len(kept.pop(0))
                if on_line is not None:
                    on_line(raw.decode("utf-8", "replace"))
            status = proc.wait()
        finally:
            _stop(proc)
            restore()
    return Finished(exit_status=status, stdout=b"".join(kept).decode("utf-8", "replace"),
                    stderr_tail=tail_no_follow(out_dir / STDERR_LOG, TAIL_CHARS) or "", argv=list(argv))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _stop_child_on_sigterm(proc: subprocess.Popen[bytes]) -> Callable[[], None]:
    """While the child runs, a SIGTERM to the worker stops the child first, then the worker as before."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return lambda: None

    def on_term(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: the backend's process-group stop still reaches the child
        return lambda: None

    def restore() -> None:
        try:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        except ValueError:
            pass

    return restore
