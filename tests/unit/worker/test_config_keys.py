"""A key of the reference trainer's sections that it does not read is said loudly, or refused."""

from __future__ import annotations

import yaml

from harness.bundle import load_bundle, unknown_config_keys


def test_a_misspelt_key_names_the_closest_known_one() -> None:
    cfg = {"data": {"path": "x.npz", "downsampel": 2}, "model": {"hiden": 32},
           "training": {"seed": 1, "batch_size": 2, "epochs": 1, "learning_rate": 0.1, "frobnicate": 1}}
    msgs = unknown_config_keys(cfg)
    assert ("config.yaml: model.hiden is not a key the reference trainer reads (did you mean model.hidden?); "
            "it was ignored") in msgs
    assert any(m.startswith("config.yaml: data.downsampel ") and "data.downsample?" in m for m in msgs)
    assert any(m.startswith("config.yaml: training.frobnicate ") and "did you mean" not in m for m in msgs)
    assert len(msgs) == 3


def test_known_keys_and_a_custom_trainers_config_are_quiet() -> None:
    ok = {"data": {"path": "x", "split": {"train": 0.7, "val": 0.15, "test": 0.15}},
          "model": {"hidden": 8}, "training": {"seed": 1}}
    assert unknown_config_keys(ok) == []
    custom = {"trainer": {"entrypoint": "m:f"}, "model": {"depth_multiplier": 3}}
    assert unknown_config_keys(custom) == []


def test_the_run_warns_and_strict_config_refuses(make_bundle, tmp_path, capsys) -> None:
    from harness import preflight
    from harness.cli import main

    root = make_bundle()
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["model"]["hiden"] = 32
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert any("model.hiden" in w and "model.hidden" in w for w in preflight.check(load_bundle(root)).warnings)
    rc = main(["run", str(root), "--strict-config", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.hiden is not a key the reference trainer reads (did you mean model.hidden?)" in err
