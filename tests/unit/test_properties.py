"""Every loader, fed arbitrary documents: a result, or one HarnessError with exit code 2 -- never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import record
from harness.bundle import load_bundle, parse_config, parse_trial_info
from harness.errors import EXIT_USAGE, HarnessError
from harness.images import matrix
from harness.judge import load_tolerances
from harness.record import ResultRecord, RunManifest, RunSpec

from tests.conftest import tiny_config, write_dataset

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
json_like = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
texts = st.text(max_size=300)


def bounded(fn: Callable[[], Any]) -> None:
    """``fn()`` returns, or raises a HarnessError whose exit code is 2."""
    try:
        fn()
    except HarnessError as exc:
        assert exc.exit_code == EXIT_USAGE, exc
        assert exc.one_line()


def _yaml_text(doc: Any) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return json.dumps(doc)


def _mutate(base: dict[str, Any], paths: list[tuple[str, ...]], values: list[Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(base))
    for path, value in zip(paths, values):
        node = doc
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return doc


CONFIG_KEYS = [("training", "seed"), ("training", "batch_size"), ("training", "epochs"),
               ("training", "learning_rate"), ("training", "weight_decay"), ("training", "optimizer"),
               ("training", "scale_targets"), ("data", "path"), ("data", "split"), ("data", "split", "train"),
               ("data", "split", "test"), ("data", "sha256"), ("data", "exclude_channels"), ("data", "downsample"),
               ("model",), ("model", "name"), ("model", "hidden"), ("model", "activation"), ("model", "dropout_rate"),
               ("trainer",), ("trainer", "entrypoint"), ("trainer", "code_dir"), ("training",), ("data",)]


# --------------------------------------------------------------------------- config.yaml and trial_info.yaml


@SETTINGS
@given(doc=json_like)
def test_parse_config_any_document(doc: Any) -> None:
    bounded(lambda: parse_config(doc, Path("/nonexistent")))


@SETTINGS
@given(keys=st.lists(st.sampled_from(CONFIG_KEYS), min_size=1, max_size=4), values=st.lists(json_like, min_size=4, max_size=4))
def test_parse_config_near_valid(keys: list[tuple[str, ...]], values: list[Any]) -> None:
    doc = _mutate(tiny_config(), keys, values)
    bounded(lambda: parse_config(doc, Path("/nonexistent")))


@SETTINGS
@given(doc=json_like)
def test_parse_trial_info_any_document(doc: Any) -> None:
    bounded(lambda: parse_trial_info(doc))


@SETTINGS
@given(keys=st.lists(st.sampled_from(["number", "value", "values", "params", "user_attrs", "r2", "mse", "mae",
                                       "best_trial", "data_sha256", "weights_sha256", "environment", "val_r2"]),
                     min_size=1, max_size=4),
       values=st.lists(json_like, min_size=4, max_size=4))
def test_parse_trial_info_near_valid(keys: list[str], values: list[Any]) -> None:
    doc: dict[str, Any] = {"number": 3, "value": 0.1, "params": {"lr": 0.01}, "user_attrs": {"r2": {"a": 0.9}}}
    for k, v in zip(keys, values):
        doc[k] = v
    bounded(lambda: parse_trial_info(doc))


@pytest.fixture(scope="module")
def bundle_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="harness-prop-")) / "bundle"
    root.mkdir()
    write_dataset(root / "signals.npz", n=20)
    return root


@SETTINGS
@given(config=st.one_of(json_like.map(_yaml_text), texts), info=st.one_of(st.none(), json_like.map(_yaml_text), texts))
def test_load_bundle_any_yaml(bundle_dir: Path, config: str, info: str | None) -> None:
    (bundle_dir / "config.yaml").write_text(config, encoding="utf-8", errors="surrogatepass")
    trial = bundle_dir / "trial_info.yaml"
    if info is None:
        trial.unlink(missing_ok=True)
    else:
        trial.write_text(info, encoding="utf-8", errors="surrogatepass")
    bounded(lambda: load_bundle(bundle_dir))


# --------------------------------------------------------------------------- matrix, compat and site files


COMPAT = {"schema": matrix.COMPAT_SCHEMA,
          "cuda": {"12.4": {"min_driver": "550.54.14", "base_image": "nvidia/cuda:12.4"}},
          "torch": {"2.5.1": {"python": ["3.11"], "variants": {"cpu": {}, "cu124": {"cuda": "12.4", "arch": ["9.0"]}}}}}


@SETTINGS
@given(doc=json_like)
def test_parse_compat_any_document(doc: Any) -> None:
    bounded(lambda: matrix.parse_compat(doc, "compat.yaml"))


@SETTINGS
@given(keys=st.lists(st.sampled_from([("cuda",), ("torch",), ("cuda", "12.4"), ("cuda", "12.4", "min_driver"),
                                      ("cuda", "12.4", "compat_floor"), ("torch", "2.5.1"),
                                      ("torch", "2.5.1", "python"), ("torch", "2.5.1", "variants"),
                                      ("torch", "2.5.1", "variants", "cu124"),
                                      ("torch", "2.5.1", "variants", "cu124", "cuda")]), min_size=1, max_size=3),
       values=st.lists(json_like, min_size=3, max_size=3))
def test_parse_compat_near_valid(keys: list[tuple[str, ...]], values: list[Any]) -> None:
    bounded(lambda: matrix.parse_compat(_mutate(COMPAT, keys, values), "compat.yaml"))


@SETTINGS
@given(doc=json_like, keys=st.lists(st.sampled_from([("cells",), ("defaults",), ("cells", "cpu"), ("cells", "cpu", "torch"),
                                                     ("cells", "cpu", "variant"), ("cells", "cpu", "python"),
                                                     ("cells", "cpu", "base_image"), ("cells", "cpu", "source"),
                                                     ("defaults", "python"), ("defaults", "cpu_base_image"),
                                                     ("cells", "gpu", "variant")]), max_size=3),
       values=st.lists(json_like, min_size=3, max_size=3))
def test_parse_matrix_any_document(doc: Any, keys: list[tuple[str, ...]], values: list[Any]) -> None:
    compat = matrix.parse_compat(COMPAT)
    bounded(lambda: matrix.parse_matrix(doc, compat, "matrix.yaml"))
    base = {"schema": matrix.MATRIX_SCHEMA, "cells": {"cpu": {"torch": "2.5.1", "variant": "cpu"},
                                                      "gpu": {"torch": "2.5.1", "variant": "cu124"}}}
    bounded(lambda: matrix.parse_matrix(_mutate(base, keys, values), compat, "matrix.yaml"))


@SETTINGS
@given(doc=json_like)
def test_parse_site_config_any_document(doc: Any) -> None:
    bounded(lambda: matrix.parse_site_config(doc, "site.yaml"))
    bounded(lambda: matrix.parse_site_config({"base_images": doc}, "site.yaml"))


@SETTINGS
@given(text=st.one_of(texts, json_like.map(_yaml_text)))
def test_yaml_files_any_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = tmp_path_factory.mktemp("y")
    p = d / "f.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    bounded(lambda: matrix.load_site_config(p))
    bounded(lambda: matrix.load_matrix(p, p))
    bounded(lambda: load_tolerances(p))


# --------------------------------------------------------------------------- tolerances


@SETTINGS
@given(doc=json_like, fam=st.sampled_from(["r2", "mse", "mae", "val_loss"]), spec=json_like)
def test_load_tolerances_any_document(tmp_path_factory: pytest.TempPathFactory, doc: Any, fam: str, spec: Any) -> None:
    d = tmp_path_factory.mktemp("t")
    for i, data in enumerate((doc, {fam: spec}, {fam: {"abs": spec}})):
        p = d / f"tol{i}.yaml"
        p.write_text(_yaml_text(data), encoding="utf-8", errors="surrogatepass")
        bounded(lambda: load_tolerances(p))


# --------------------------------------------------------------------------- records, specs, manifests


def _record_like() -> dict[str, Any]:
    return json.loads(json.dumps(ResultRecord(cell="a", status=record.Status.OK,
                                              metrics={"retrained": {"val_loss": 0.1}}).to_dict()))


RECORD_KEYS = ["cell", "status", "error", "image", "env", "metrics", "recorded", "labels", "spec", "run_id",
               "started_at", "data_sha256", "expected_data_sha256", "history", "warnings", "wall_s", "nonfinite",
               "extra", "bundle", "schema"]


@SETTINGS
@given(doc=json_like, keys=st.lists(st.sampled_from(RECORD_KEYS), max_size=3), values=st.lists(json_like, min_size=3, max_size=3))
def test_record_from_json_any_document(doc: Any, keys: list[str], values: list[Any]) -> None:
    bounded(lambda: ResultRecord.from_json(doc))
    near = _record_like()
    for k, v in zip(keys, values):
        near[k] = v

    def load_and_judge() -> None:
        rec = ResultRecord.from_json(near)
        from harness.judge import compare
        from harness.report import json_report

        json.loads(rec.to_json())
        record.dumps(json_report([rec], compare([rec])))

    bounded(load_and_judge)


@SETTINGS
@given(doc=json_like, keys=st.lists(st.sampled_from(["cell", "bundle_dir", "out_dir", "threads", "labels", "image",
                                                     "device", "schema", "repeat"]), max_size=3),
       values=st.lists(json_like, min_size=3, max_size=3))
def test_runspec_from_json_any_document(doc: Any, keys: list[str], values: list[Any]) -> None:
    bounded(lambda: RunSpec.from_json(doc))
    near = RunSpec(cell="a", bundle_dir="/b", out_dir="/o").to_dict()
    for k, v in zip(keys, values):
        near[k] = v
    bounded(lambda: RunSpec.from_json(near))


@SETTINGS
@given(doc=json_like, keys=st.lists(st.sampled_from(["run_id", "cells", "backend", "bundle", "started_at", "schema"]),
                                    max_size=3), values=st.lists(json_like, min_size=3, max_size=3))
def test_manifest_from_json_any_document(doc: Any, keys: list[str], values: list[Any]) -> None:
    bounded(lambda: RunManifest.from_json(doc))
    near = json.loads(RunManifest(run_id="r", cells=["a"], backend="local", bundle="b", started_at="t").to_json())
    for k, v in zip(keys, values):
        near[k] = v
    bounded(lambda: RunManifest.from_json(near))


@SETTINGS
@given(doc=json_like, raw=st.binary(max_size=200))
def test_record_load_any_json_file(tmp_path_factory: pytest.TempPathFactory, doc: Any, raw: bytes) -> None:
    d = tmp_path_factory.mktemp("r")
    (d / "a").mkdir()
    (d / "a" / "record.json").write_text(json.dumps(doc))
    bounded(lambda: record.load(d))
    bounded(lambda: record.load(d / "a" / "record.json"))
    (d / "run.json").write_bytes(raw)
    bounded(lambda: record.load(d))
    (d / "report.json").write_text(json.dumps({"schema": record.REPORT_SCHEMA, "records": [doc]}))
    bounded(lambda: record.load(d / "report.json"))
