"""Shared fixtures: the bundled example and small bundles built on the fly."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
import re
from typing import Any, Callable

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"  # the test projects, trainers and records beside the tests (userproj, trainers, data, ...)


def patience(seconds: float) -> float:
    """How long a test waits for an event that takes ``seconds`` on an idle machine: scaled by the load.

    Tests wait on events (a record appearing, a job's state), never on the clock; a timeout
    is only the point where waiting stops making sense, and a loaded machine (load average
    above its cores) is slower by about that ratio. Never less than ``seconds``, at most 10x.

    The load is the larger of the 1-minute load average and :func:`runnable_now`: the average
    lags a sudden burst by a minute (20 s after six busy loops started it still read 2.2 on
    two cores), the count of runnable tasks sees it at once.
    """
    try:
        average = os.getloadavg()[0]
    except OSError:
        average = os.cpu_count() or 1.0
    load = max(average, runnable_now()) / (os.cpu_count() or 1)
    return seconds * min(10.0, max(1.0, 2.0 * load))


def runnable_now(samples: int = 3, gap_s: float = 0.01) -> float:
    """Tasks runnable on this machine right now besides the caller: the least of ``samples`` readings of
    the "running/total" field of /proc/loadavg, ``gap_s`` apart, minus the reading process itself.
    The least, so that a short-lived process (a shell, a ``cat``) is not taken for load; 0 without /proc."""
    seen = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as fh:
                seen.append(int(fh.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return 0.0
        if i + 1 < samples:
            time.sleep(gap_s)
    return float(max(0, min(seen) - 1))


def default_signals() -> None:
    """``preexec_fn`` for a CLI the test will signal: SIGINT/SIGTERM at their defaults.

    A process started in the background by a shell without job control inherits SIGINT
    as *ignored*, and Python then installs no KeyboardInterrupt handler: the test's
    Ctrl-C would be lost. A user at a terminal has the default, so the test restores it.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
EXAMPLE = REPO / "examples" / "optuna_best"
EXAMPLE_CONV = REPO / "examples" / "optuna_best_conv"  # the Conv1d example, whose matrix shows the ISA axis
IN_CI = os.environ.get("CI", "").lower() == "true"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# Where the bundled examples' and tests/userproj's trials were recorded (trial_info.yaml's environment):
# there they retrain bit for bit; on another CPU model (an Intel Xeon, say) float32 kernels round
# differently, and the faithful claim is "numerically equal", not "bitwise".
TRIAL_CPU = "AMD EPYC"
ON_TRIAL_CPU = _cpu_model().startswith(TRIAL_CPU)


def assert_reproduces(rec: Any, stdout: str = "", *, weights: bool = True) -> None:
    """``rec`` reproduced its trial: bit for bit on the trial's CPU model, to numerical noise elsewhere."""
    from harness import judge
    from harness.ladder import Rung
    from harness.record import WeightsDiff

    cell = judge.compare([rec]).cell(rec.cell)
    assert cell.verdict is judge.Verdict.REPRODUCED, cell.reason
    if ON_TRIAL_CPU:
        assert cell.rung is Rung.BITWISE, cell.reason
        if weights:
            assert rec.weights_vs_archived == WeightsDiff(identical=True, first_difference=None, max_abs_diff=0.0)
        if stdout:
            assert "bitwise" in stdout
    else:
        assert cell.rung in (Rung.BITWISE, Rung.EQUAL), cell.reason
        if weights:
            assert rec.weights_vs_archived.identical or rec.weights_vs_archived.max_abs_diff < 1e-5
    if stdout:
        assert "reproduced" in stdout


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A private copy of the bundled example (data beside it, paths as committed)."""
    dst = tmp_path / "examples"
    shutil.copytree(EXAMPLE, dst / "optuna_best")
    shutil.copytree(REPO / "examples" / "data", dst / "data")
    return dst / "optuna_best"


def tiny_config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "data": {"path": "signals.npz", "exclude_channels": [2], "downsample": 2,
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "model": {"hidden": 16, "num_layers": 2, "dropout_rate": 0.1, "use_residual": True},
        "training": {"seed": 7, "batch_size": 8, "epochs": 2, "learning_rate": 0.01},
    }
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return cfg


_DELETE = object()


def write_dataset(path: Path, n: int = 60, channels: int = 3, time: int = 16, targets: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, channels, time)).astype(np.float32)
    w = rng.standard_normal((channels * time, targets))
    y = (X.reshape(n, -1) @ w / 10 + 0.05 * rng.standard_normal((n, targets))).astype(np.float32)
    np.savez(path, X=X, y=y, target_names=np.array([f"t{i}" for i in range(targets)]))
    return path


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a bundle directory with config.yaml and data; no trial_info or weights unless asked."""

    def make(name: str = "bundle", trial_info: dict[str, Any] | None = None, **over: Any) -> Path:
        root = tmp_path / name
        root.mkdir()
        write_dataset(root / "signals.npz")
        (root / "config.yaml").write_text(yaml.safe_dump(tiny_config(**over)))
        if trial_info is not None:
            (root / "trial_info.yaml").write_text(yaml.safe_dump(trial_info))
        return root

    return make


DELETE = _DELETE


# =============================================================================
# Docker fixtures (owned by the images work: tests/engine/test_docker_images.py).
# Self-contained. Locally they skip when the engine, base image or wheelhouses
# are absent; with CI=true each absence FAILS instead, because CI provides them.
# =============================================================================


def _docker_absent(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required because CI=true)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client():
    """A connected Docker SDK client with a timeout long enough for multi-GB builds."""
    import gc
    import warnings

    client, problem = None, None
    # A failed connect leaves the SDK's socket unclosed; its ResourceWarning would turn
    # into an error under filterwarnings=error, so collect it here, silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker

            client = docker.from_env(timeout=3600)
            client.ping()
        except Exception as exc:  # ImportError or any engine/transport error
            problem = str(exc).splitlines()[0][:160]
            if client is not None:
                client.close()
        gc.collect()
    if problem is not None:
        _docker_absent(f"Docker engine not reachable ({problem})")
    _ENGINES["docker"] = client  # for the tidying after each docker test (engine_tidy)
    try:
        yield client
    finally:
        _ENGINES.pop("docker", None)
        client.close()


@pytest.fixture(scope="session")
def engine(docker_client):
    """The harness's Engine on the session's client (closing the client stays with docker_client)."""
    from harness.docker_engine import Engine

    eng = Engine(docker_client)
    yield eng
    eng.stop_all()


@pytest.fixture(scope="session")
def wheelhouse_root() -> Path:
    """Root with one wheelhouse per cell: $HARNESS_TEST_WHEELHOUSE, default <repo>/wheelhouse (made by .ci/run)."""
    root = Path(os.environ.get("HARNESS_TEST_WHEELHOUSE") or REPO / "wheelhouse")
    missing = [c for c in ("cpu-torch2.13", "cu130-torch2.14") if not any((root / c).glob("torch-*.whl"))]
    if missing:
        _docker_absent(f"no wheelhouse for {', '.join(missing)} under {root} "
                       f"(`harness images wheelhouse --cells {','.join(missing)} --dest {root}`)")
    return root


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """An offline base with python3.11 + venv: $HARNESS_TEST_BASE_IMAGE, default local/debian-py:bookworm."""
    import docker.errors

    name = os.environ.get("HARNESS_TEST_BASE_IMAGE") or "local/debian-py:bookworm"
    try:
        docker_client.images.get(name)
    except docker.errors.ImageNotFound:
        _docker_absent(f"base image {name} is not in the engine (debootstrap ... | docker import - {name})")
    return name


# =============================================================================
# Slurm and browser fixtures (tests/engine/test_slurm.py, tests/engine/test_report_html_browser.py).
# Locally they skip where Slurm / Debian's `chromium` is absent; with CI=true an
# absent or unresponsive one FAILS (.ci/run installs and starts both).
# =============================================================================


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The partition of a running Slurm cluster whose nodes have the GRES types alpha and beta."""
    import shutil
    import subprocess

    missing = [t for t in ("sinfo", "sbatch", "sacct", "scancel") if shutil.which(t) is None]
    if missing:
        _docker_absent(f"Slurm is not installed here (no {', '.join(missing)}; .ci/slurm-up.sh starts one)")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %G %T"], capture_output=True, text=True, timeout=patience(30))
    except (OSError, subprocess.SubprocessError) as exc:
        _docker_absent(f"sinfo failed: {exc}")
    lines = out.stdout.split()
    if out.returncode != 0 or not lines:
        _docker_absent(f"the Slurm cluster does not answer ({(out.stderr or out.stdout).strip()[:200]})")
    if "gpu:alpha" not in out.stdout or "gpu:beta" not in out.stdout:
        _docker_absent(f"the Slurm cluster has no GRES types alpha and beta: {out.stdout.strip()[:200]}")
    _ENGINES["slurm"] = lines[0].rstrip("*")  # for the tidying after each slurm test (engine_tidy)
    return lines[0].rstrip("*")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a headless-capable ``chromium`` (Debian's package)."""
    path = shutil.which("chromium")
    if path is None:
        reason = "no `chromium` on PATH (apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"{reason} (required because CI=true)", pytrace=False)
        pytest.skip(reason)
    return path


# =============================================================================
# Engine tests tidy up after themselves, passed or failed: after each test marked
# `slurm` or `docker`, the Slurm jobs and the Docker containers this pytest session
# started and left are cancelled and removed (a failing Slurm test once left four
# jobs that held the only node for 16 minutes). "This session's" is told by where
# they point: a job's batch script or working directory, a container's mounts (a
# bind mount, or a noexec overlay's upper directory) under the session's base
# temporary directory, which no other session uses; or a container labelled with
# this process's pid (an Engine run in-process). Nothing else is touched.
# =============================================================================

_ENGINES: dict[str, Any] = {}  # "docker": the session's client, "slurm": the partition, once they answered
_SESSION_START = time.time()


def _under(path: str, root: Path) -> bool:
    if not path.startswith("/"):
        return False
    return any(p == str(r) or p.startswith(f"{r}/") for p in {path, os.path.realpath(path)}
               for r in {root, root.resolve()})


def slurm_jobs_under(root: Path) -> dict[str, str]:
    """This user's pending, running or completing Slurm jobs whose batch script or working directory lies under
    ``root``: {job id (an array's base id), state}. {} when Slurm does not answer."""
    import getpass
    import subprocess

    try:
        found = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%F|%T|%o|%Z"], capture_output=True,
                               text=True, timeout=patience(60))
    except (OSError, subprocess.SubprocessError):
        return {}
    jobs: dict[str, str] = {}
    for line in found.stdout.splitlines() if found.returncode == 0 else ():
        job_id, state, command, workdir = (line.split("|", 3) + ["", "", ""])[:4]
        script = command.split()[0] if command.split() else ""
        if job_id.strip().isdigit() and (_under(script, root) or _under(workdir.strip(), root)):
            jobs[job_id.strip()] = state.strip()
    return jobs


def cancel_slurm_jobs_under(root: Path) -> list[str]:
    """``scancel`` every job of :func:`slurm_jobs_under`, and wait until they have left the node; their ids."""
    import subprocess

    jobs = sorted(slurm_jobs_under(root))
    if not jobs:
        return []
    subprocess.run(["scancel", *jobs], capture_output=True, timeout=patience(60))
    deadline = time.monotonic() + patience(60)
    while set(jobs) & set(slurm_jobs_under(root)) and time.monotonic() < deadline:
        time.sleep(0.2)  # COMPLETING: the node is still busy ending them
    return jobs


def containers_under(client: Any, root: Path) -> list[Any]:
    """The containers (running or not) this session started: created since it began, and mounting a path under
    ``root`` (bind mounts, and a noexec overlay's upper directory) or labelled with this process's pid."""
    import docker.errors

    ours = []
    for c in client.containers.list(all=True, sparse=True):  # sparse: no inspect of every container
        if int(c.attrs.get("Created") or 0) < _SESSION_START - 60:
            continue
        try:
            attrs = client.api.inspect_container(c.id)
        except docker.errors.NotFound:
            continue
        host = attrs.get("HostConfig") or {}
        paths = [m.get("Source") or "" for m in attrs.get("Mounts") or []]
        paths += [b.split(":", 1)[0] for b in host.get("Binds") or []]
        for m in host.get("Mounts") or []:
            paths.append(m.get("Source") or "")
            options = (((m.get("VolumeOptions") or {}).get("DriverConfig") or {}).get("Options") or {}).get("o") or ""
            paths += [kv.split("=", 1)[1] for kv in options.split(",") if kv.startswith(("upperdir=", "workdir="))]
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        if labels.get("org.harness.pid") == str(os.getpid()) or any(_under(p, root) for p in paths):
            ours.append(c)
    return ours


def remove_containers_under(client: Any, root: Path) -> list[str]:
    """Stop and remove every container of :func:`containers_under` (with its anonymous volumes); their ids."""
    import docker.errors

    removed = []
    for c in containers_under(client, root):
        try:
            c.remove(force=True, v=True)
            removed.append(c.id)
        except docker.errors.NotFound:
            pass
    return removed


def inner_pytest(tmp_path: Path, fixtures: str, test_source: str) -> Any:
    """A pytest run of its own (a child process) of one test module, with this conftest's ``fixtures`` (a
    comma-separated list) and engine_tidy; its temporary directories under ``tmp_path/inner-tmp``."""
    import subprocess
    import sys
    import textwrap

    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pytest.ini").write_text("[pytest]\nmarkers =\n    slurm: a Slurm test\n    docker: a Docker test\n")
    (inner / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                                       f"from tests.conftest import engine_tidy, {fixtures}  # noqa: F401\n")
    (inner / "test_inner.py").write_text(textwrap.dedent(test_source))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "--basetemp",
                           str(tmp_path / "inner-tmp"), str(inner)], cwd=inner, capture_output=True, text=True,
                          timeout=patience(300), env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.fixture(autouse=True)
def engine_tidy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """After a test marked ``slurm`` or ``docker``: cancel the jobs and remove the containers it left (see above)."""
    yield
    import sys

    root = tmp_path_factory.getbasetemp()
    if request.node.get_closest_marker("slurm") is not None and "slurm" in _ENGINES:
        left = cancel_slurm_jobs_under(root)
        if left:
            print(f"engine_tidy: cancelled Slurm job(s) {', '.join(left)} left by {request.node.nodeid}",
                  file=sys.stderr)
    if request.node.get_closest_marker("docker") is not None and "docker" in _ENGINES:
        left = remove_containers_under(_ENGINES["docker"], root)
        if left:
            print(f"engine_tidy: removed container(s) {', '.join(c[:12] for c in left)} left by "
                  f"{request.node.nodeid}", file=sys.stderr)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # an xdist worker inherits COLUMNS=80; the tests read the output a serial run gives (200 columns
    # when not a terminal), and a test that needs a width sets it
    os.environ.pop("COLUMNS", None)


# =============================================================================
# Parallel runs (pytest-xdist, `-n auto` in pyproject.toml). The tests of one file share a
# worker, so a module's fixture (a trained band, a built image) is made once; every test that
# drives the Docker engine or the Slurm node shares one worker, since they build on each
# other's images and find containers and jobs by label. Scheduled here because xdist's own
# `--dist loadgroup` relies on rewriting node ids, which pytest 9 no longer allows.
# =============================================================================

ENGINE_FILES = re.compile(r"tests/engine/test_(docker_\w+|slurm)\.py")
LAYERS = ("unit", "cli", "engine")
ENGINES = ("docker", "slurm", "browser")  # what a test in tests/engine needs (its marker)  # tests/<layer>/: each test carries its layer's marker (pytest -m unit)


def scope_of(nodeid: str) -> str:
    """The unit of work a test belongs to: ``engines`` for the Docker and Slurm tests, else its file."""
    file = nodeid.split("::", 1)[0]
    return "engines" if ENGINE_FILES.fullmatch(file) else file


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByFileAndEngine(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ByFileAndEngine(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets its layer's marker from its folder (tests/unit, tests/cli, tests/engine), before
    ``-m`` selects; and a test marked docker or slurm must live in tests/engine/test_docker_*.py or
    test_slurm.py, where it is scheduled with the engines (scope_of): said here, checked at collection."""
    stray = []
    for item in items:
        parts = item.nodeid.split("/")
        if len(parts) > 2 and parts[0] == "tests" and parts[1] in LAYERS:
            item.add_marker(getattr(pytest.mark, parts[1]))
        if (item.get_closest_marker("docker") or item.get_closest_marker("slurm")) and item.nodeid.startswith("tests/") \
                and scope_of(item.nodeid) != "engines":
            stray.append(f"move {item.nodeid} to tests/engine/test_docker_*.py or test_slurm.py (it uses the engine "
                         "or the node, so it must share their worker)")
        if item.nodeid.startswith("tests/engine/") and not any(item.get_closest_marker(m) for m in ENGINES):
            stray.append(f"move {item.nodeid} to tests/unit or tests/cli, or mark it {' or '.join(ENGINES)} "
                         "(tests/engine holds only the tests that need one)")
    if stray:
        raise pytest.UsageError(f"tests/conftest.py: {stray[0]}")