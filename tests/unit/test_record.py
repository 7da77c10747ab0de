"""The typed records: round trips, schema refusals, and the order a results directory is read in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import record
from harness.errors import InputError
from harness.record import Env, ErrorInfo, ImageInfo, ResultRecord, RunManifest, RunSpec, Status

from tests.records import record as make


def test_round_trip_keeps_every_typed_field(tmp_path: Path) -> None:
    rec = make("cu130", started_at="2026-11-30T00:00:01+00:00")
    rec.env = Env(torch="2.14.1+cu130", threads=2, extra={"numpy_blas": "openblas"})
    rec.image = ImageInfo(id="sha256:abc", tag="harness:cu130-123")
    record.write(tmp_path / "record.json", rec)
    back = record.read(tmp_path / "record.json")
    assert back == rec
    assert back.status is Status.OK and isinstance(back.env, Env) and isinstance(back.image, ImageInfo)
    # the environment is stored flat, as measured
    assert json.loads((tmp_path / "record.json").read_text())["env"]["numpy_blas"] == "openblas"


def test_failed_record_keeps_its_evidence(tmp_path: Path) -> None:
    rec = ResultRecord.without_metrics("c", Status.FAILED, "run", "worker exited with status 137",
                                       exit_status=137, log_tail="Killed\n", image="harness:x", backend="docker")
    record.write(tmp_path / "r.json", rec)
    back = record.read(tmp_path / "r.json")
    assert back.error == ErrorInfo("run", "worker exited with status 137", exit_status=137, image="harness:x",
                                   log_tail="Killed\n")


def test_another_schema_version_is_refused_in_one_line(tmp_path: Path) -> None:
    p = tmp_path / "record.json"
    p.write_text(json.dumps({"schema": "harness.result/1", "cell": "a", "status": "ok"}))
    with pytest.raises(InputError) as exc:
        record.read(p)
    assert exc.value.exit_code == 2
    assert "has schema harness.result/1, this harness reads harness.result/3 and harness.result/2" in exc.value.one_line()
    assert "\n" not in exc.value.one_line()
    p.write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(InputError, match="is not a harness result record"):
        record.read(p)


def test_record_status_must_be_one_of_the_enum(tmp_path: Path) -> None:
    data = make("a").to_dict()
    data["status"] = "error"  # the word the first schema used
    with pytest.raises(InputError, match="status 'error' is not one of ok, failed, skipped, interrupted"):
        ResultRecord.from_json(data)
    data = make("a", status=Status.FAILED).to_dict()
    data["error"] = None
    with pytest.raises(InputError, match="a failed record carries no error"):
        ResultRecord.from_json(data)


def test_run_spec_refuses_other_versions_and_unknown_keys() -> None:
    spec = RunSpec(cell="c", bundle_dir="/b", out_dir="/o", threads=2, isa="avx2")
    assert RunSpec.from_json(json.loads(spec.to_json())) == spec
    old = dict(json.loads(spec.to_json()), schema="harness.runspec/1")
    with pytest.raises(InputError, match="has schema harness.runspec/1"):
        RunSpec.from_json(old)
    future = dict(json.loads(spec.to_json()), a_key_from_the_future="x")
    with pytest.raises(InputError, match="unknown key"):
        RunSpec.from_json(future)


def test_directory_is_read_in_the_run_order_not_alphabetically(tmp_path: Path) -> None:
    # The run's baseline is its first cell; reading alphabetically made cpu-default-t1 the baseline.
    names = ["cpu-strict-t1", "cpu-strict-tdef", "cpu-default-t1"]
    for n in names[:2]:
        rec = make(n)
        rec.run_id = "r"  # the run's own records
        record.write(tmp_path / n / "record.json", rec)
    record.write_manifest(tmp_path, RunManifest(run_id="r", cells=names, backend="local", bundle="b", started_at="t"))
    rs = record.load(tmp_path)
    assert [r.cell for r in rs.records] == ["cpu-strict-t1", "cpu-strict-tdef"]
    assert rs.missing == ["cpu-default-t1"]


def test_without_a_manifest_the_start_times_give_the_order(tmp_path: Path) -> None:
    record.write(tmp_path / "b-first" / "record.json", make("b-first", started_at="2026-11-30T00:00:01+00:00"))
    record.write(tmp_path / "a-second" / "record.json", make("a-second", started_at="2026-11-30T00:00:09+00:00"))
    assert [r.cell for r in record.load(tmp_path).records] == ["b-first", "a-second"]


def test_an_empty_directory_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="holds no record.json files"):
        record.load(tmp_path)


def test_a_cell_directory_that_is_a_link_is_left_out_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    record.write(elsewhere / "x" / "record.json", make("x"))
    out = tmp_path / "out"
    record.write(out / "a" / "record.json", make("a"))
    (out / "x").symlink_to(elsewhere / "x")  # a copied results directory may hold anything
    rs = record.load(out)
    assert [r.cell for r in rs.records] == ["a"]
    assert rs.warnings == [f"{out}: left out 1 link(s), not followed: x"]


def test_an_error_kind_is_its_word_in_json_and_in_comparisons(tmp_path: Path) -> None:
    from harness.errors import ErrorKind

    for kind in ErrorKind:
        rec = ResultRecord.without_metrics("c", Status.FAILED, kind, "boom")
        record.write(tmp_path / "r.json", rec)
        assert json.loads((tmp_path / "r.json").read_text())["error"]["kind"] == kind.value
        back = record.read(tmp_path / "r.json")
        assert back.error.kind is kind and back.error.kind == kind.value and kind.known
        assert f"{back.error.kind}" == str(back.error.kind) == kind.value
    # a word given as a str is its kind
    assert ErrorInfo("disk", "full").kind is ErrorKind.DISK


def test_every_error_the_harness_raises_has_a_kind_it_knows() -> None:
    from harness import docker_engine, errors
    from harness.errors import ErrorKind, HarnessError

    assert docker_engine.ImageStreamRefused.kind is ErrorKind.INPUT
    found = [errors.HarnessError]
    for cls in found:
        found.extend(cls.__subclasses__())
    assert len(found) > 8
    assert all(isinstance(c.kind, ErrorKind) and c.kind.known for c in found if issubclass(c, HarnessError)), \
        [(c.__name__, c.kind) for c in found]


def test_an_error_kind_this_version_does_not_write_is_read_and_written_back_unchanged(tmp_path: Path) -> None:
    """A record an older (or newer) harness wrote, with a kind this one does not know, is read, never refused."""
    from harness.errors import ErrorKind

    data = make("a", status=Status.FAILED).to_dict()
    data["error"]["kind"] = "oom-killed"
    (tmp_path / "old.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    rec = record.read(tmp_path / "old.json")
    assert rec.error.kind == "oom-killed" and not rec.error.kind.known
    assert rec.error.kind != ErrorKind.RUN and f"{rec.error.kind}" == "oom-killed"
    assert rec.to_json() == (tmp_path / "old.json").read_text()
    data["error"]["kind"] = 3  # not a word: refused in one line, naming the key
    with pytest.raises(InputError, match="kind must be a str, got int"):
        ResultRecord.from_json(data)
