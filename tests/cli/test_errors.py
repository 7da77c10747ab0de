"""Errors that name what the user typed: the flag, the key that is there, the closest name, the way out.

Each is one line on stderr (``harness: error: ...``), exit 2, no traceback; through the real CLI
in a subprocess wherever a user would meet it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.bundle import parse_config
from harness.errors import InputError

from tests.conftest import REPO, tiny_config
from tests.fake_engine import FakeEngine, Outcome, connected_engine, ok_worker  # noqa: F401 - the fake `engine` fixture
from tests.cli.test_cli import TRAINERS, harness
from tests.unit.test_docs import page_anchors


def error_line(p) -> str:
    """The run's one error line (asserting there is exactly one, and no traceback)."""
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    assert len(lines) == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr
    return lines[0]


def write_config(root: Path, cfg: dict) -> Path:
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


# --------------------------------------------------------------------------- 1: an unknown cell


@pytest.mark.parametrize(("args", "flag"), [
    (["run", "{b}", "--image", "cpu-torch2.31"], "--image"),
    (["band", "{b}", "--image", "cpu-torch2.31"], "--image"),
    (["matrix", "{b}", "--cells", "cpu-torch2.31"], "--cells"),
    (["snapshot", "{b}", "--cell", "cpu-torch2.31", "-o", "{o}/s.tar"], "--cell"),
    (["matrix", "{b}", "--cells", "cpu-torch2.13", "--base-image", "cpu-torch2.31=local/x:1"], "--base-image"),
])
def test_an_unknown_cell_names_the_flag_typed_and_the_closest_cell(make_bundle, tmp_path: Path, args: list[str],
                                                                   flag: str) -> None:
    b, o = make_bundle(), tmp_path / "o"
    p = harness(*[a.format(b=b, o=o) for a in args], "--out", str(o))
    assert p.returncode == 2
    line = error_line(p)
    assert line.startswith(f"harness: error: {flag}: unknown cell cpu-torch2.31 (did you mean cpu-torch2.13?)"), line
    assert "; known: " in line and "cpu-torch2.13" in line.split("; known: ", 1)[1]
    if flag != "--cells":
        assert "--cells" not in line


# --------------------------------------------------------------------------- 2: a misspelt required key


def test_a_misspelt_required_key_names_the_key_that_is_there(make_bundle, tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["training"]["learnig_rate"] = cfg["training"].pop("learning_rate")
    root = write_config(make_bundle(), cfg)
    p = harness("run", str(root), "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 2
    assert error_line(p) == ("harness: error: config.yaml: training.learning_rate is missing; "
                             "training.learnig_rate is there: did you mean learning_rate? (rename it)")


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda c: c.__setitem__("trainig", c.pop("training")), "training is missing; trainig is there: did you mean training?"),
    (lambda c: c["data"].__setitem__("pth", c["data"].pop("path")), "data.path is missing; data.pth is there"),
    (lambda c: (c["training"].pop("epochs"), c["training"].__setitem__("epoch", 3)),
     "training.epochs is missing; training.epoch is there"),
])
def test_a_close_sibling_of_a_missing_key_is_named(tmp_path: Path, mutate, needle: str) -> None:
    cfg = tiny_config()
    mutate(cfg)
    with pytest.raises(InputError) as info:
        parse_config(cfg, tmp_path)
    assert needle in info.value.one_line()
    assert "own project" not in info.value.one_line()  # the fix is the rename


def test_no_sibling_or_a_known_one_is_not_taken_for_a_misspelling() -> None:
    from harness.bundle import _Reader

    assert _Reader({"trainer": {"entrypoint": "m:f"}}, "config.yaml").misspelt("training") is None  # a key of its own
    assert _Reader({"training": {"seed": 1, "lr": 0.1}}, "config.yaml").misspelt("training.learning_rate") is None
    assert _Reader({"training": {"learnig_rate": 0.1}}, "config.yaml").misspelt("training.learning_rate") == \
        "training.learnig_rate"


# --------------------------------------------------------------------------- 3: --strict-config says it refused


def test_strict_config_says_it_refused_the_key_and_how_to_fix_it(make_bundle, tmp_path: Path) -> None:
    root = make_bundle(model__hiden=32)
    p = harness("run", str(root), "--strict-config", "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 2
    line = error_line(p)
    assert "model.hiden is not a key the reference trainer reads (did you mean model.hidden?)" in line
    assert "--strict-config refused it" in line and "rename it" in line and "drop --strict-config" in line
    assert "was ignored" not in line  # the warning's wording, when --strict-config is not given (test_config_keys)


# --------------------------------------------------------------------------- 4: a misspelt trainer function


@pytest.mark.parametrize(("where", "entry", "guess"), [
    ("--trainer", "seed_style:trian", "seed_style:train"),
    ("config.yaml trainer.entrypoint", "seed_style:set_sed", "seed_style:set_seed"),
])
def test_a_misspelt_trainer_function_gets_the_closest_one(make_bundle, tmp_path: Path, where: str, entry: str,
                                                          guess: str) -> None:
    root = make_bundle()
    if where == "--trainer":
        args = ["--trainer", entry, "--trainer-path", str(TRAINERS)]
    else:
        cfg = yaml.safe_load((root / "config.yaml").read_text())
        cfg["trainer"] = {"entrypoint": entry, "code_dir": str(TRAINERS)}
        write_config(root, cfg)
        args = []
    p = harness("run", str(root), *args, "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu")
    assert p.returncode == 2
    name = entry.split(":")[1]
    assert error_line(p) == (f"harness: error: {where}: 'seed_style' has no function '{name}' (did you mean {guess}?); "
                             "name an existing function as module:function")


def test_the_closest_callable_is_a_public_one() -> None:
    import os.path
    import types

    from harness.worker.trainer_api import closest_callables

    mod = types.ModuleType("m")
    mod.train = lambda config: None  # type: ignore[attr-defined]
    mod._trian = lambda: None  # type: ignore[attr-defined]
    mod.train_join = os.path.join  # type: ignore[attr-defined]
    mod.CONST = 3  # type: ignore[attr-defined]
    assert closest_callables(mod, "trian") == ["train"]  # not the private _trian
    assert closest_callables(mod, "train_jon") == ["train_join"]  # what it imported counts too
    assert closest_callables(mod, "CONST") == []  # not a callable
    assert closest_callables(mod, "evaluate") == []


# --------------------------------------------------------------------------- 5: a custom project without --trainer


def test_a_custom_project_without_trainer_is_told_to_name_it(make_bundle, tmp_path: Path) -> None:
    root = write_config(make_bundle(), {"data": {"path": "signals.npz"}, "training": {"seed": 3, "lr": 0.01, "steps": 9}})
    p = harness("run", str(root), "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 2
    line = error_line(p)
    assert line.startswith("harness: error: config.yaml: training.batch_size is missing"), line
    assert ("is this your own project? name its trainer with --trainer module:function or --trainer-cmd CMD "
            "(docs/your-own-project.md#bring-your-own-trainer)") in line
    # the anchor named is a real section of that page
    assert "bring-your-own-trainer" in page_anchors(REPO / "docs" / "your-own-project.md")


# --------------------------------------------------------------------------- 6: a skipped cell's reason, once
# (the cell skipped by a real engine: tests/engine/test_docker_errors.py)


@pytest.mark.parametrize("progress", [[], ["--no-progress"]])
def test_a_skipped_cell_beside_one_that_ran_says_its_reason_once(engine: FakeEngine, make_bundle, tmp_path: Path,
                                                                 capsys, progress: list[str]) -> None:
    """The same with a cell that runs (a fake engine holding its built image): the reason is under the
    results, not also on the image step's line or the cell's progress line."""
    from harness.cli import main

    engine.add_image("cpu-built", "harness:cpu-torch2.13")
    engine.outcomes.append(Outcome(0, worker=ok_worker))
    base = "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"  # cu124-torch2.5's base: not in the fake engine
    rc = main(["matrix", str(make_bundle()), "--cells", "cpu-torch2.13,cu124-torch2.5", "--out", str(tmp_path / "o"),
               "--gpus", "none", *progress])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert rc == 0, text
    assert text.count(f"{base} is not in the engine") == 1, text
    assert text.count(f"docker pull {base}") == 1, text
