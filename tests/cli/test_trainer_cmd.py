"""A script as the trainer: ``--trainer-cmd CMD``.

The pure parts (splitting, placeholders, the environment, finding metrics on
stdout) are unit-tested; everything else runs the real CLI, whose worker runs the
real command as its child: tests/userproj's own entry point (``python -m
userproj.cli``), tests/trainers/cmd_probe.py (reports what it sees; seeds
nothing) and ``sh``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness import record
from harness.backends.local import child_env
from harness.bundle import PLACEHOLDERS, check_command, load_bundle, split_command
from harness.errors import InputError
from harness.plan import Cell
from harness.record import RunSpec, Status, TraceInfo
from harness.worker import trainer_cmd as tc

from tests.conftest import ON_TRIAL_CPU, REPO, TESTS, assert_reproduces, patience
from tests.cli.test_cli import TRAINERS, harness, records

USERPROJ = TESTS / "userproj"
PROBE = "{python} {code_dir}/cmd_probe.py"
SEED = 7  # tiny_config's training.seed


# --------------------------------------------------------------------------- the command (pure)


def test_placeholders_are_filled_per_word_and_never_split() -> None:
    argv = split_command("{python} -m pkg.train --cfg={config} --out '{out_dir}/run a' --seed {seed}")
    values = {"python": "/py", "config": "/b/config.yaml", "out_dir": "/o o", "seed": "7"}
    assert tc.substitute(argv, values) == ["/py", "-m", "pkg.train", "--cfg=/b/config.yaml", "--out", "/o o/run a",
                                           "--seed", "7"]
    # braces that are not a {word} stay as they are (JSON arguments, dict literals)
    assert tc.substitute(split_command("""x '{"a": {"b": 1}}' {}"""), {}) == ["x", '{"a": {"b": 1}}', "{}"]


def test_an_unknown_placeholder_is_named_with_the_accepted_ones() -> None:
    with pytest.raises(InputError) as exc:
        check_command("python train.py --epochs {epochs}", "--trainer-cmd", has_data=True, has_code_dir=True)
    msg = str(exc.value)
    assert "{epochs}" in msg and all("{" + name + "}" in msg for name in PLACEHOLDERS)


@pytest.mark.parametrize("command, has_data, has_code_dir, fragment", [
    ("", True, True, "is empty"),
    ("python 'unbalanced", True, True, "cannot be split"),
    ("python t.py {data}", False, True, "no data.path"),
    ("python {code_dir}/t.py", True, False, "no --trainer-path"),
])
def test_a_command_that_cannot_run_is_refused_before_anything_starts(command, has_data, has_code_dir, fragment) -> None:
    with pytest.raises(InputError, match=fragment):
        check_command(command, "--trainer-cmd", has_data=has_data, has_code_dir=has_code_dir)


def test_the_environment_adds_the_run_and_puts_the_hook_then_the_code_first() -> None:
    base = {"PATH": "/bin", "PYTHONPATH": "/opt/harness", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "HARNESS_DATA": "stale",
            "HARNESS_PERTURB": '{"kind": "ulp", "seed": 9}', "HARNESS_TRACE": "/stale/trace.jsonl"}
    env = tc.command_env(base, seed=3, device="cpu", bundle="/b", config="/b/config.yaml", data=None, out_dir="/o",
                         determinism="warn", threads=None, tf32=True, code_dirs=["/c1", "/c2"], site_dir="/site",
                         markers="/m", worker_pid=42)
    # no band member, no --trace: the command's processes install no hooks, whatever the worker's environment held
    assert "HARNESS_PERTURB" not in env and "HARNESS_TRACE" not in env
    asked = tc.command_env(base, seed=3, device="cpu", bundle="/b", config="/b/config.yaml", data=None, out_dir="/o",
                           determinism="warn", threads=None, tf32=True, code_dirs=[], site_dir="/site", markers="/m",
                           worker_pid=42, perturb={"kind": "ulp", "seed": 2}, trace="/o/trace.jsonl")
    assert json.loads(asked["HARNESS_PERTURB"]) == {"kind": "ulp", "seed": 2} and asked["HARNESS_TRACE"] == "/o/trace.jsonl"
    assert env["PYTHONPATH"] == os.pathsep.join(["/site", "/c1", "/c2", "/opt/harness"])
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # the worker's determinism variables are inherited
    assert (env["HARNESS_SEED"], env["HARNESS_METRICS_FILE"], env["HARNESS_THREADS"], env["HARNESS_TF32"]) == \
        ("3", "/o/metrics.json", "", "1")
    assert "HARNESS_DATA" not in env  # no data.path: not set, rather than set to something stale
    assert base["PYTHONPATH"] == "/opt/harness"  # the worker's own environment is untouched


def test_only_well_formed_epoch_lines_are_progress() -> None:
    assert tc.child_event('HARNESS-EVENT {"event": "epoch", "epoch": 2, "epochs": 5, "val_loss": 0.25}') == \
        {"epoch": 2, "epochs": 5.0, "val_loss": 0.25}
    for line in ('HARNESS-EVENT {"event": "done", "status": "ok"}', "HARNESS-EVENT {not json", "epoch 2 loss 0.2",
                 'HARNESS-EVENT {"event": "epoch", "epoch": "2"}'):
        assert tc.child_event(line) is None


# --------------------------------------------------------------------------- what the processes' hooks did (pure)

ULP = {"kind": "ulp", "seed": 4}
APPLIED = {"kind": "ulp", "seed": 4, "applied": True, "tensor": "0.weight", "index": 3, "updated": True}


def _proc(pid: int, **hooks: object) -> dict:
    """A process's marker, as the command's sitecustomize leaves it (``hooks``: what its torch hooks reported)."""
    return {"pid": pid, "seed": 7, **({"hooks": hooks} if hooks else {})}


def test_no_perturbation_asked_is_none_whatever_the_processes_say() -> None:
    assert tc.hooks_outcome([_proc(10, perturbation=APPLIED)], None) == (None, [])


def test_several_processes_that_perturbed_count_the_first_and_say_so() -> None:
    got, warnings = tc.hooks_outcome([_proc(10), _proc(11, perturbation=APPLIED),
                                      _proc(12, perturbation={**APPLIED, "index": 5})], ULP)
    assert got == {**APPLIED, "process": 11}
    assert warnings == ["2 Python processes of the command each perturbed a model; the band member counts process 11's"]


def test_a_command_no_process_perturbed_says_why() -> None:
    # no process reported a perturbation at all: a command without torch, or one killed before its exit handlers
    got, warnings = tc.hooks_outcome([_proc(10), _proc(11, trace=None)], ULP)
    assert got == {"kind": "ulp", "seed": 4, "applied": False,
                   "skipped": "no Python process of the command that imported torch reported a perturbation (none ran "
                              "a torch.nn module, or it ended without running its exit handlers)"}
    assert warnings == []
    # the first process that says why not
    got, _ = tc.hooks_outcome([_proc(10, perturbation={**ULP, "applied": False, "skipped": "first reason"}),
                               _proc(11, perturbation={**ULP, "applied": False, "skipped": "second reason"})], ULP)
    assert got["applied"] is False and got["skipped"] == "first reason"


def test_hooks_that_failed_in_a_process_are_a_warning() -> None:
    got, warnings = tc.hooks_outcome([_proc(10, error="ImportError: cannot import name 'register_optimizer_step_pre_hook'"),
                                      _proc(11, perturbation=APPLIED)], ULP)
    assert got["process"] == 11
    assert warnings == [("the torch hooks failed in process 10: ImportError: cannot import name "
                         "'register_optimizer_step_pre_hook'")]
    got, warnings = tc.hooks_outcome([_proc(10, error="RuntimeError: x")], ULP)
    assert got["applied"] is False and warnings == ["the torch hooks failed in process 10: RuntimeError: x"]


def test_the_trace_is_the_process_that_stepped_first_and_the_others_are_said() -> None:
    written = {"file": "trace.jsonl", "schema": "harness.trace/1", "steps": 3, "truncated": False}
    refused = {"file": None, "schema": "harness.trace/1", "steps": 0, "truncated": False,
               "why": "another Python process of the command wrote the trace"}
    assert tc.trace_outcome([_proc(9), _proc(10, trace=written), _proc(11, trace=None)]) == (
        {**written, "process": 10}, [])  # 9 had no torch, 11 never stepped
    got, warnings = tc.trace_outcome([_proc(10, trace=written), _proc(11, trace=refused), _proc(12, trace=refused)])
    assert got == {**written, "process": 10}
    assert warnings == [("2 other Python process(es) of the command (pid 11, 12) made optimizer steps too: the trace "
                         "holds process 10's only")]
    assert tc.trace_outcome([_proc(10, trace=None), _proc(11, error="RuntimeError: x")]) == (None, [])


# --------------------------------------------------------------------------- metrics on stdout (pure)


def test_the_last_json_line_wins_over_earlier_documents() -> None:
    text = 'starting\n{"val_loss": 1}\n---\nval_loss: 2\n...\nepoch 3\n{"val_loss": 3}\ndone\n'
    mapping, where = tc.metrics_from_stdout(text)
    assert mapping == {"val_loss": 3} and where == "stdout line 7 (JSON)"


def test_a_yaml_mapping_after_dashes_is_found_and_ends_at_the_next_marker() -> None:
    text = "log line: with a colon\n{\"val_loss\": 1}\n--- \nval:\n  r2: {a: 0.5}\nval_loss: 0.25\n...\nbye\n"
    mapping, where = tc.metrics_from_stdout(text)
    assert mapping == {"val": {"r2": {"a": 0.5}}, "val_loss": 0.25} and where == "stdout line 3 (YAML after ---)"
    # a document running to the end of stdout; an inline one on the dashes line
    assert tc.metrics_from_stdout("x\n---\nr2: 0.9\n")[0] == {"r2": 0.9}
    assert tc.metrics_from_stdout("--- {r2: 0.8}\n")[0] == {"r2": 0.8}


@pytest.mark.parametrize("text", [
    "",
    "epoch 1: loss 0.3\nepoch 2: loss 0.2\n",  # key: value log lines with no '---' are not a document
    "---\n- 1\n- 2\n",  # a list
    "--- epoch 3 ---\n",  # a banner
    "---\nr2: 0.9\ndone\n",  # not YAML once the log line joins it
    '["r2", 0.9]\n{"r2": \n',
    'HARNESS-EVENT {"event": "epoch", "epoch": 1}\n',  # progress is never the metrics
])
def test_no_mapping_is_none(text: str) -> None:
    assert tc.metrics_from_stdout(text) is None


# --------------------------------------------------------------------------- config.yaml and flags


def _bundle(make_bundle, trainer: dict | None = None, name: str = "cmd") -> Path:
    root = make_bundle(name)
    if trainer is not None:
        cfg = yaml.safe_load((root / "config.yaml").read_text())
        cfg["trainer"] = trainer
        (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_config_names_a_command_like_an_entrypoint(make_bundle) -> None:
    root = _bundle(make_bundle, {"command": PROBE + " seed", "code_dir": str(TRAINERS)})
    b = load_bundle(root)
    assert b.trainer.command == PROBE + " seed" and b.trainer.entrypoint is None
    assert b.trainer.code_dirs == (str(TRAINERS.resolve()),)
    # --trainer replaces a configured command, --trainer-cmd a configured function
    assert load_bundle(root, trainer_override="m:f").trainer.command is None
    fn = _bundle(make_bundle, {"entrypoint": "seed_style:train"}, name="fn")
    assert load_bundle(fn, trainer_cmd_override="sh -c true").trainer.entrypoint is None


def test_config_with_both_or_a_bad_command_is_refused(make_bundle) -> None:
    both = _bundle(make_bundle, {"command": "sh -c true", "entrypoint": "m:f"}, name="both")
    with pytest.raises(InputError, match="names both an entrypoint and a command"):
        load_bundle(both)
    bad = _bundle(make_bundle, {"command": "python t.py {epochs}"}, name="bad")
    with pytest.raises(InputError, match=r"config.yaml: trainer.command: unknown placeholder \{epochs\}"):
        load_bundle(bad)


def test_run_spec_carries_the_command_and_refuses_the_previous_version() -> None:
    spec = RunSpec(cell="c", bundle_dir="/b", out_dir="/o", trainer_cmd="sh -c true")
    assert spec.schema == "harness.runspec/4"
    assert RunSpec.from_json(json.loads(spec.to_json())).trainer_cmd == "sh -c true"
    with pytest.raises(InputError, match="has schema harness.runspec/3"):
        RunSpec.from_json(dict(json.loads(spec.to_json()), schema="harness.runspec/3"))


def test_trainer_and_trainer_cmd_together_is_one_line_exit_2(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    p = harness("run", str(root), "--trainer", "m:f", "--trainer-cmd", "sh -c true", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()[:1]
    assert "--trainer and --trainer-cmd cannot be combined" in line
    assert not (tmp_path / "o").exists()


def test_unknown_placeholder_stops_the_run_before_anything_trains(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    p = harness("run", str(root), "--trainer-cmd", "python train.py --epochs {epochs}", "--out", str(tmp_path / "o"),
                "--device", "cpu")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--trainer-cmd: unknown placeholder {epochs}" in p.stderr and "{out_dir}" in p.stderr
    assert not list(tmp_path.glob("o/*/record.json"))


# --------------------------------------------------------------------------- a real project, its own entry point


def _userproj(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    shutil.copytree(USERPROJ, proj, ignore=shutil.ignore_patterns("__pycache__"))
    return proj


@pytest.mark.parametrize("report, found_in", [
    ("json", "(JSON)"), ("yaml", "(YAML after ---)"), ("file", "$HARNESS_METRICS_FILE (metrics.json)"),
])
def test_user_project_entry_point_reproduces(tmp_path: Path, report: str, found_in: str) -> None:
    proj = _userproj(tmp_path)
    out = tmp_path / "out"
    p = harness("run", str(proj / "optuna_best"), "--trainer-cmd",
                f"{{python}} -m userproj.cli {{bundle}} --out {{out_dir}} --data {{data}} --report {report}",
                "--trainer-path", str(proj), "--out", str(out), "--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = records(out)
    assert rec.status is Status.OK
    assert_reproduces(rec, p.stdout)
    assert rec.user_weights.identical_to_recorded is ON_TRIAL_CPU  # the project's own digest, handed back
    assert rec.trainer["metrics_from"].endswith(found_in)
    assert rec.trainer["argv"][:3] == [sys.executable, "-m", "userproj.cli"] and rec.trainer["exit_status"] == 0
    assert rec.trainer["seeded_by_harness"] is True and rec.trainer["cwd"] == str(out / "run")
    assert "retraining" in (out / "run" / tc.STDOUT_LOG).read_text()
    assert rec.data_sha256 and set(rec.retrained["val"]["r2"]) == {"*"}


# --------------------------------------------------------------------------- what the child gets


def _probe(make_bundle, tmp_path: Path, *extra: str, mode: str = "seed", trainer_path: Path = TRAINERS,
           cmd: str = PROBE) -> tuple[subprocess.CompletedProcess[str], record.ResultRecord | None]:
    root = make_bundle()
    out = tmp_path / "o"
    p = harness("run", str(root), "--trainer-cmd", f"{cmd} {mode}", "--trainer-path", str(trainer_path),
                "--out", str(out), "--device", "cpu", *extra)
    recs = records(out) if (out / "run" / "record.json").exists() else []
    return p, (recs[0] if recs else None)


def test_the_harness_seeds_a_python_child_as_set_seed_does(make_bundle, tmp_path: Path) -> None:
    p, rec = _probe(make_bundle, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    seen = rec.extra
    # what set_seed(training.seed) gives, from fresh generators seeded the same way
    assert seen["torch_initial_seed"] == SEED
    assert seen["torch_draw"] == torch.rand(1, generator=torch.Generator().manual_seed(SEED)).item()
    assert seen["random_draw"] == random.Random(SEED).random()
    assert seen["numpy_draw"] == float(np.random.RandomState(SEED).rand())
    # the determinism switches and variables, as in the worker (strict)
    assert seen["deterministic_algorithms"] is True and seen["cudnn_deterministic"] is True
    assert seen["float32_matmul_precision"] == "highest" and seen["hash_randomization"] is False
    env = seen["env"]
    assert env["PYTHONHASHSEED"] == "0" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert env["HARNESS_SEED"] == str(SEED) and env["HARNESS_DEVICE"] == "cpu" and env["HARNESS_DETERMINISM"] == "strict"
    out_dir = str(tmp_path / "o" / "run")
    assert env["HARNESS_OUT_DIR"] == out_dir == seen["cwd"] and env["HARNESS_METRICS_FILE"] == out_dir + "/metrics.json"
    assert env["HARNESS_BUNDLE"] == str((tmp_path / "bundle").resolve())
    assert env["HARNESS_CONFIG"] == env["HARNESS_BUNDLE"] + "/config.yaml"
    assert env["HARNESS_DATA"] == env["HARNESS_BUNDLE"] + "/signals.npz"
    # the hook leaves sys.path as it would be without it: the trainer folder first after the script's own
    assert not any("harness-cmd-" in p for p in seen["sys_path"])
    assert env["PYTHONPATH"].split(os.pathsep)[1] == str(TRAINERS.resolve())
    # and the record says so, with what the hook measured matching the worker's own capture
    assert rec.trainer["seeded_by_harness"] is True and not [w for w in rec.warnings if "seed" in w]
    (proc,) = rec.trainer["python_processes"]
    assert proc["seed"] == SEED and proc["seeded"] == ["random", "numpy", "torch"]
    for key, value in proc["determinism"].items():
        assert rec.determinism[key] == value, key


def test_a_python_processes_argv_is_its_whole_command_line(make_bundle, tmp_path: Path) -> None:
    p, rec = _probe(make_bundle, tmp_path, cmd="{python} -m cmd_probe --config {config}")
    assert p.returncode == 0, p.stdout + p.stderr
    (proc,) = rec.trainer["python_processes"]
    config = str((tmp_path / "bundle").resolve() / "config.yaml")
    assert proc["argv"] == [sys.executable, "-m", "cmd_probe", "--config", config, "seed"]  # the module's name kept


def test_threads_and_mode_reach_the_child(make_bundle, tmp_path: Path) -> None:
    p, rec = _probe(make_bundle, tmp_path, "--determinism", "warn", "--threads", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert rec.extra["num_threads"] == 1 and rec.extra["env"]["HARNESS_THREADS"] == "1"
    (proc,) = rec.trainer["python_processes"]
    assert proc["determinism"]["deterministic_warn_only"] is True and proc["determinism"]["num_threads"] == 1
    for key, value in proc["determinism"].items():
        assert rec.determinism[key] == value, key


def test_a_projects_own_sitecustomize_still_runs(make_bundle, tmp_path: Path) -> None:
    code = tmp_path / "code"
    shutil.copytree(TRAINERS, code, ignore=shutil.ignore_patterns("__pycache__"))
    (code / "sitecustomize.py").write_text("import os\nos.environ['USERPROJ_SITE_RAN'] = '1'\n")
    p, rec = _probe(make_bundle, tmp_path, trainer_path=code)
    assert p.returncode == 0, p.stdout + p.stderr
    assert rec.extra["user_site_ran"] == "1" and rec.extra["sitecustomize"] == str(code / "sitecustomize.py")
    assert rec.extra["torch_initial_seed"] == SEED  # and the harness's hook ran before it


def test_progress_lines_become_the_history(make_bundle, tmp_path: Path) -> None:
    p, rec = _probe(make_bundle, tmp_path, mode="events")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [(h["epoch"], h["val_loss"]) for h in rec.history] == [(1, 1.0), (2, 0.5)]
    assert rec.retrained["val_loss"] == 0.5 and rec.retrained["val"]["r2"] == {"*": 0.9}


def test_a_non_python_command_gets_the_variables_and_the_record_says_it_was_not_seeded(make_bundle, tmp_path) -> None:
    p, rec = _probe(make_bundle, tmp_path, mode="", cmd="""sh -c 'echo "{\\"val_loss\\": $HARNESS_SEED.5}"'""")
    assert p.returncode == 0, p.stdout + p.stderr
    assert rec.retrained["val_loss"] == SEED + 0.5
    assert rec.trainer["seeded_by_harness"] is False and rec.trainer["python_processes"] == []
    assert any("started no Python process the harness could seed" in w for w in rec.warnings)


def test_a_failing_command_is_a_failed_record_with_its_status_and_stderr(make_bundle, tmp_path: Path) -> None:
    p, rec = _probe(make_bundle, tmp_path, mode="fail")
    assert p.returncode == 1
    assert rec.status is Status.FAILED
    assert rec.error.message.startswith("the trainer command exited with status 3: ValueError: the data has 3 columns")
    assert "Traceback (most recent call last)" in rec.error.log_tail  # the child's stderr, not the worker's log
    assert (tmp_path / "o" / "run" / tc.STDERR_LOG).read_text().endswith("expected 4\n")


def test_a_command_that_hands_back_no_metrics_says_where_it_looked(make_bundle, tmp_path: Path) -> None:
    p, rec = _probe(make_bundle, tmp_path, mode="silent")
    assert p.returncode == 1
    msg = rec.error.message
    assert "left no metrics" in msg and "$HARNESS_METRICS_FILE" in msg and "metrics.json" in msg
    assert "stdout (trainer.stdout.log)" in msg and "---" in msg
    assert "results are in the usual place" in rec.error.log_tail


def test_a_program_that_does_not_exist_is_bad_input(make_bundle, tmp_path: Path) -> None:
    p, rec = _probe(make_bundle, tmp_path, mode="", cmd="no-such-trainer-program {seed}")
    assert p.returncode == 2 and "Traceback" not in p.stderr  # bad input, found by the cell's worker
    assert rec.status is Status.FAILED and rec.error.kind == "input"
    assert "'no-such-trainer-program' was not found" in rec.error.message


# --------------------------------------------------------------------------- a command that trains: --trace, refusals

FIT = "{python} {code_dir}/cmd_fit.py --config {config} --data {data} --out {out_dir}"  # tests/trainers/cmd_fit.py


def _fit(make_bundle, tmp_path: Path, args: str, **spec: object) -> record.ResultRecord:
    """The worker (in this process) running cmd_fit.py as the trainer command, for real."""
    from harness.worker import retrain

    root = make_bundle()
    return retrain.run(RunSpec(cell="run", bundle_dir=str(root), out_dir=str(tmp_path / "o"), determinism="default",
                               trainer_cmd=f"{FIT} {args}", trainer_path=[str(TRAINERS)], **spec))


def test_the_trace_of_a_command_holds_the_first_process_that_steps(make_bundle, tmp_path: Path) -> None:
    """Its Python trains 3 steps, then starts a child Python that trains 5: the trace is the parent's 3, and says so."""
    rec = _fit(make_bundle, tmp_path, "--steps 3 --child-steps 5", trace=True)
    procs = rec.trainer["python_processes"]
    (parent,) = [p for p in procs if "--child-steps" in p["argv"]]
    (child,) = [p for p in procs if p["ppid"] == parent["pid"]]
    assert rec.trace.to_dict() == {"file": "trace.jsonl", "schema": "harness.trace/1", "steps": 3, "truncated": False,
                         "process": parent["pid"]}
    lines = [json.loads(line) for line in (tmp_path / "o" / "trace.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "step" in line] == [1, 2, 3]  # none of the child's 5 steps
    assert child["hooks"]["trace"]["why"] == "another Python process of the command wrote the trace"
    assert (f"1 other Python process(es) of the command (pid {child['pid']}) made optimizer steps too: the trace "
            f"holds process {parent['pid']}'s only") in rec.warnings


def test_a_command_with_a_hand_written_update_says_why_it_left_no_trace(make_bundle, tmp_path: Path) -> None:
    from harness.worker.retrain import NO_STEP_SEEN
    from harness.worker.trace import no_trace

    rec = _fit(make_bundle, tmp_path, "--update hand", trace=True)
    assert rec.status is Status.OK and rec.weights_sha256  # it trained, by hand: no torch.optim step
    assert rec.trace == TraceInfo(**no_trace(NO_STEP_SEEN.format(trainer="the trainer command")))
    assert "made no torch.optim optimizer step the hooks could see" in rec.trace.why
    assert not (tmp_path / "o" / "trace.jsonl").exists()


def test_a_commands_result_refused_after_training_still_writes_the_report(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain", trial_info={"number": 1, "value": 0.5, "params": {}})
    out = tmp_path / "o"
    command = """sh -c 'touch trained; echo "{\\"val_loss\\": 0.5, \\"val\\": {\\"r2\\": \\"high\\"}}"'"""
    p = harness("run", str(root), "--trainer-cmd", command, "--out", str(out), "--device", "cpu", "--no-progress")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert (out / "run" / "trained").exists()  # it trained, then its result was refused
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    assert "val.r2 as str, not a number" in line
    report = json.loads((out / "report.json").read_text())
    assert [r["cell"] for r in report["records"]] == ["run"] and report["comparison"]["overall"] == "failed"
    assert "✗ run:" in p.stdout and "Overall: failed" in p.stdout


# --------------------------------------------------------------------------- the child dies with the worker


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_child_dies_with_a_worker_signalled_alone(make_bundle, tmp_path: Path, sig: int) -> None:
    """A signal to the worker's pid only (not its group): the command does not outlive it."""
    root = make_bundle()
    out = tmp_path / "o"
    # it sleeps far longer than the test waits, even on a loaded machine: only its killing ends it in time
    cmd = "{python} -c 'import os, time; open(\"child.pid\", \"w\").write(str(os.getpid())); time.sleep(3600)'"
    env = child_env(Cell(name="run", device="cpu"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    worker = subprocess.Popen([sys.executable, "-m", "harness.worker", "--bundle", str(root), "--out", str(out),
                               "--trainer-cmd", cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    pid_file = out / "child.pid"
    try:
        deadline = time.monotonic() + patience(120)
        while not (pid_file.exists() and pid_file.read_text()):
            assert worker.poll() is None and time.monotonic() < deadline, "the command never started"
            time.sleep(0.2)
        child = int(pid_file.read_text())
        assert _alive(child)
        os.kill(worker.pid, sig)
        assert worker.wait(timeout=patience(30)) == -sig
        deadline = time.monotonic() + patience(15)
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.wait()
        left = int(pid_file.read_text()) if pid_file.exists() and pid_file.read_text() else None
        try:  # a child that outlived its worker (the test failed): ended, if that pid is still this command
            if left is not None and _alive(left) and b"child.pid" in Path(f"/proc/{left}/cmdline").read_bytes():
                os.kill(left, signal.SIGKILL)
        except OSError:
            pass
