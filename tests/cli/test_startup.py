"""What a cell and the CLI pay before (and after) the work: guarded, so a regression fails here.

Each check runs a real interpreter (a subprocess), the way a user or a backend starts one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, TESTS

TRAINERS = TESTS / "trainers"
HEAVY = ("torch", "numpy", "sklearn", "joblib", "scipy", "docker")


def _python(code: str, *, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _heavy_after(statement: str) -> list[str]:
    p = _python(f"import json, sys\n{statement}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))",
                env={"PYTHONHASHSEED": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def test_the_cli_and_its_help_import_no_ml_or_docker_module() -> None:
    assert _heavy_after("import harness.cli") == []
    help_ = "import runpy\nsys.argv = ['harness', '--help']\ntry:\n    runpy.run_module('harness', run_name='__main__')\n" \
            "except SystemExit:\n    pass"
    assert _heavy_after(help_) == []
    assert _heavy_after("import harness.cli.diverge, harness.diverge") == []  # diverge reads traces without torch


def test_the_worker_imports_torch_and_the_rest_only_when_it_runs() -> None:
    assert _heavy_after("import harness.worker.retrain") == []


def test_a_run_without_a_scaler_never_imports_scikit_learn_or_joblib(make_bundle, tmp_path: Path) -> None:
    root = make_bundle(training__scale_targets=False)
    code = ("from harness.worker.retrain import main\n"
            f"code = main(['--bundle', {str(root)!r}, '--out', {str(tmp_path / 'o')!r}, '--threads', '1'])\n"
            "assert code == 0, code")
    got = _heavy_after(code)
    assert "torch" in got and "sklearn" not in got and "joblib" not in got
    rec = json.loads((tmp_path / "o" / "record.json").read_text())
    assert rec["status"] == "ok" and rec["scaler"] == {"archived": False, "used": "none"}


def _sitecustomize(tmp_path: Path) -> Path:
    """A sitecustomize that marks a normal interpreter exit (atexit) in $EXIT_MARK."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "atexit.register(lambda: open(os.environ['EXIT_MARK'], 'w').write('torn down'))\n")
    return site


def _worker(bundle: Path, out: Path, site: Path, mark: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(site), str(REPO))), "EXIT_MARK": str(mark),
           "PYTHONHASHSEED": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    return subprocess.run([sys.executable, "-m", "harness.worker", "--bundle", str(bundle), "--out", str(out),
                           "--threads", "1"], capture_output=True, text=True, timeout=600, env=env)


def test_the_worker_skips_the_teardown_after_a_reference_run(make_bundle, tmp_path: Path) -> None:
    """torch, Dynamo and scikit-learn take a second or more of CPU to unwind: the worker ends without it."""
    site, mark = _sitecustomize(tmp_path), tmp_path / "mark"
    p = _worker(make_bundle(), tmp_path / "o", site, mark)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((tmp_path / "o" / "record.json").read_text())["status"] == "ok"
    assert '"event": "done"' in p.stdout  # the last progress line still reaches the launcher
    assert not mark.exists()  # os._exit: no atexit handler ran


def test_a_custom_trainer_in_the_worker_gets_a_full_exit(make_bundle, tmp_path: Path) -> None:
    """Its atexit handlers and buffered files are its own: they run, and what they write is there."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "exits.py").write_text(
        "import atexit, os\nfrom seed_style import train as _train\n\n\ndef train(cfg, ctx):\n"
        "    log = open(os.path.join(ctx.out_dir, 'user.log'), 'w')\n    log.write('buffered')\n"
        "    atexit.register(lambda: open(os.path.join(ctx.out_dir, 'atexit'), 'w').write('ran'))\n"
        "    return _train(cfg, ctx)\n")
    root = make_bundle("custom")
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["trainer"] = {"entrypoint": "exits:train", "code_dir": [str(code), str(TRAINERS)]}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    site, mark = _sitecustomize(tmp_path), tmp_path / "mark"
    out = tmp_path / "o"
    p = _worker(root, out, site, mark)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (out / "atexit").read_text() == "ran" and (out / "user.log").read_text() == "buffered"
    assert mark.read_text() == "torn down"


def test_every_mode_pays_torchs_one_time_imports_before_the_timed_training() -> None:
    """torch.optim imports torch._dynamo when the first optimizer is built (seconds on a cold host).

    In strict mode torch.use_deterministic_algorithms did that import before the timer; default mode
    paid it inside train_s and looked 8-10x slower than strict on a 16-core host (the H200 records:
    same wall time per cell, the seconds counted on the other side of the timer). Every mode now
    imports it while applying its switches, for the worker and for a command trainer's interpreter.
    """
    probe = ("import json, sys\n{apply}\nimport torch\nbefore = len(sys.modules)\n"
             "torch.optim.Adam(torch.nn.Linear(2, 2).parameters())\n"
             "print(json.dumps([len(sys.modules) - before, 'torch._dynamo' in sys.modules]))")
    applies = {
        "worker": "from harness.worker import determinism\ndeterminism.apply({mode!r}, tf32=False, threads=1)",
        "command": "from harness.worker.childsite import _apply_and_seed\n_apply_and_seed(1, {mode!r}, 1, False)",
    }
    for via, apply in applies.items():  # default mode: strict's call to torch always did it
        p = _python(probe.format(apply=apply.format(mode="default")))
        assert p.returncode == 0, p.stderr
        new_modules, dynamo = json.loads(p.stdout.splitlines()[-1])
        assert dynamo and new_modules < 20, (via, new_modules)
