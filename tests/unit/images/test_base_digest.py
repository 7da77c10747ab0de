"""Base images pinned by digest: pulled by that digest when missing, unless --offline, and checked.

The pull decisions run against tests/fake_engine.py (no registry is reachable from the
machines that run the tests, so a real pull cannot be tested here). The digests below are
made up for the tests; images/ pins none that could not be checked against a registry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from harness import record as records
from harness.errors import BaseImageMismatch, BaseImageMissing, InputError
from harness.images import build as imagebuild
from harness.images import matrix
from harness.record import Status

from tests.fake_engine import FakeEngine, Outcome, connected_engine, ok_worker  # noqa: F401 - the engine fixture

D1 = "sha256:" + hashlib.sha256(b"one").hexdigest()
D2 = "sha256:" + hashlib.sha256(b"two").hexdigest()
TAG = "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"
REF = f"nvidia/cuda@{D1}"
CELL = "cu124-torch2.5"


def compat() -> matrix.Compat:
    return matrix.parse_compat(matrix._read_yaml(matrix.DEFAULT_COMPAT))


def cell(**spec) -> matrix.ImageCell:
    return matrix.resolve_cell(CELL, {"torch": "2.5.1", "variant": "cu124", **spec}, compat(), {})


# ----------------------------------------------------------------------------- the matrix: where a pin comes from


def test_a_base_image_with_a_digest_is_pinned() -> None:
    c = cell(base_image=f"{TAG}@{D1}")
    assert c.base_image == TAG and c.base_digest == D1 and c.base_ref == REF
    assert cell(base_image=TAG, base_digest=D1).base_ref == REF
    assert cell(base_image=TAG).base_digest is None and cell(base_image=TAG).base_ref == TAG
    assert cell().base_image == TAG  # compat's base for CUDA 12.4, unpinned in images/compat.yaml


def test_a_malformed_or_contradictory_digest_is_refused() -> None:
    for spec in ({"base_image": f"{TAG}@sha256:abc"}, {"base_image": TAG, "base_digest": "sha256:XYZ"},
                 {"base_image": f"{TAG}@{D1}", "base_digest": D2}):
        with pytest.raises(InputError, match=f"cells.{CELL}"):
            cell(**spec)


def test_compat_pins_only_its_own_base() -> None:
    data = matrix._read_yaml(matrix.DEFAULT_COMPAT)
    data["cuda"]["12.4"]["base_digest"] = D1
    pinned = matrix.parse_compat(data)
    c = matrix.resolve_cell(CELL, {"torch": "2.5.1", "variant": "cu124"}, pinned, {})
    assert c.base_ref == REF
    own = matrix.resolve_cell(CELL, {"torch": "2.5.1", "variant": "cu124", "base_image": "my/cuda:1"}, pinned, {})
    assert own.base_digest is None and own.base_ref == "my/cuda:1"  # the digest belongs to compat's image
    data["cuda"]["12.4"]["base_digest"] = "latest"
    with pytest.raises(InputError, match="cuda.12.4: base_digest 'latest'"):
        matrix.parse_compat(data)


def test_a_site_base_drops_the_pin_unless_it_names_one() -> None:
    c = cell(base_image=f"{TAG}@{D1}")
    (plain,) = matrix.apply_base_images([c], {"*": "local/cuda:12"})
    assert plain.base_digest is None and plain.base_ref == "local/cuda:12"
    (mirrored,) = matrix.apply_base_images([c], {CELL: f"mirror.example:5000/nvidia/cuda:12.4@{D2}"})
    assert mirrored.base_ref == f"mirror.example:5000/nvidia/cuda@{D2}"


def test_repository_and_digest_matching() -> None:
    assert matrix.repository_of("python:3.11-slim") == "python"
    assert matrix.repository_of("host:5000/team/img:tag") == "host:5000/team/img"
    assert matrix.repository_of("host:5000/team/img") == "host:5000/team/img"
    assert matrix.same_image_digest([f"nvidia/cuda@{D1}"], f"docker.io/nvidia/cuda@{D1}")
    assert matrix.same_image_digest([f"python@{D1}"], f"docker.io/library/python@{D1}")
    assert not matrix.same_image_digest([f"nvidia/cuda@{D2}"], REF)
    assert not matrix.same_image_digest([f"other/cuda@{D1}"], REF)
    assert not matrix.same_image_digest([], REF)


def test_the_pin_is_an_input_of_the_image() -> None:
    pinned, plain = cell(base_image=f"{TAG}@{D1}"), cell(base_image=TAG)
    assert imagebuild.build_args(pinned, "index")["BASE_IMAGE"] == REF
    repo = matrix.REPO_ROOT
    a, b = imagebuild.plan_build(pinned, repo, None), imagebuild.plan_build(plain, repo, None)
    assert a.input_hash != b.input_hash and a.tag != b.tag
    assert a.labels[imagebuild.LABEL_BASE_DIGEST] == D1 and imagebuild.LABEL_BASE_DIGEST not in b.labels


# ----------------------------------------------------------------------------- the pull decision


def plan_for(c: matrix.ImageCell) -> imagebuild.BuildPlan:
    return imagebuild.plan_build(c, matrix.REPO_ROOT, None)


def test_a_missing_pinned_base_is_pulled_by_digest_and_built_on() -> None:
    fake = FakeEngine()
    fake.registry[REF] = [f"nvidia/cuda@{D1}"]
    plan = plan_for(cell(base_image=f"{TAG}@{D1}"))
    built = imagebuild.build(fake, plan)
    assert fake.pulls == [REF] and built.built
    assert fake.builds[0]["buildargs"]["BASE_IMAGE"] == REF
    assert fake.builds[0]["labels"][imagebuild.LABEL_BASE_DIGEST] == D1
    # present now: the next build of another cell on the same base pulls nothing
    imagebuild.ensure_base(fake, cell(base_image=f"{TAG}@{D1}"))
    assert fake.pulls == [REF]


def test_a_present_base_is_never_pulled() -> None:
    fake = FakeEngine()
    fake.add_image("base", REF)
    assert imagebuild.ensure_base(fake, cell(base_image=f"{TAG}@{D1}")) is False
    assert fake.pulls == []


def test_offline_skips_with_the_pull_command_and_pulls_nothing() -> None:
    fake = FakeEngine()
    fake.registry[REF] = [f"nvidia/cuda@{D1}"]
    res = imagebuild.ensure_images(fake, [plan_for(cell(base_image=f"{TAG}@{D1}"))], offline=True)
    err = res[CELL]
    assert isinstance(err, BaseImageMissing) and fake.pulls == [] and fake.builds == []
    assert "--offline" in err.skip_reason and f"`docker pull {REF}`" in err.skip_reason


def test_an_unreachable_registry_skips_like_offline() -> None:
    fake = FakeEngine()  # nothing in the registry: the pull fails
    res = imagebuild.ensure_images(fake, [plan_for(cell(base_image=f"{TAG}@{D1}"))])
    err = res[CELL]
    assert isinstance(err, BaseImageMissing) and fake.pulls == [REF] and fake.builds == []
    assert "the pull failed" in err.skip_reason and "no route to host" in err.skip_reason
    assert f"`docker pull {REF}`" in err.skip_reason


def test_an_unpinned_base_is_never_pulled() -> None:
    fake = FakeEngine()
    fake.registry[TAG] = [f"nvidia/cuda@{D1}"]
    res = imagebuild.ensure_images(fake, [plan_for(cell(base_image=TAG))])
    assert isinstance(res[CELL], BaseImageMissing) and fake.pulls == []
    assert "never pulls an unpinned base" in res[CELL].skip_reason


def test_a_pulled_image_of_another_digest_is_refused_and_removed() -> None:
    fake = FakeEngine()
    fake.registry[REF] = [f"nvidia/cuda@{D2}"]  # a mirror that serves something else
    res = imagebuild.ensure_images(fake, [plan_for(cell(base_image=f"{TAG}@{D1}"))])
    err = res[CELL]
    assert isinstance(err, BaseImageMismatch) and not getattr(err, "skip_reason", None)
    assert D2 in err.message and "not the pinned digest" in err.message
    assert fake.builds == [] and not fake.image_exists(REF)  # nothing built on it, and it is gone


# ----------------------------------------------------------------------------- through `harness matrix`




def matrix_args(bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["matrix", str(bundle), "--cells", CELL, "--base-image", f"{CELL}={TAG}@{D1}", "--gpus", "none",
            "--out", str(out), "--no-progress", *extra]


def test_the_record_carries_the_pulled_digest(engine: FakeEngine, make_bundle, tmp_path: Path, capsys) -> None:
    from harness.cli import main

    engine.registry[REF] = [f"nvidia/cuda@{D1}"]
    engine.outcomes.append(Outcome(0, worker=ok_worker))
    rc = main(matrix_args(make_bundle(), tmp_path / "out"))
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert engine.pulls == [REF] and f"pulling base image {REF}" in " ".join(captured.err.split())
    rec = records.read(tmp_path / "out" / CELL / "record.json")
    assert rec.status is Status.OK and rec.image.base_digest == D1 and rec.image.base_image == TAG


def test_offline_matrix_skips_the_cell(engine: FakeEngine, make_bundle, tmp_path: Path, capsys) -> None:
    from harness.cli import main

    engine.registry[REF] = [f"nvidia/cuda@{D1}"]
    rc = main(matrix_args(make_bundle(), tmp_path / "out", "--offline"))
    captured = capsys.readouterr()
    assert rc == 1  # nothing ran
    assert engine.pulls == [] and engine.runs == []
    rec = records.read(tmp_path / "out" / CELL / "record.json")
    assert rec.status is Status.SKIPPED and f"`docker pull {REF}`" in rec.error.message
    assert f"docker pull {REF}" in " ".join(captured.out.split())


def test_a_digest_mismatch_fails_the_cell(engine: FakeEngine, make_bundle, tmp_path: Path, capsys) -> None:
    from harness.cli import main

    engine.registry[REF] = [f"nvidia/cuda@{D2}"]
    rc = main(matrix_args(make_bundle(), tmp_path / "out"))
    capsys.readouterr()
    assert rc == 1 and engine.runs == []
    rec = records.read(tmp_path / "out" / CELL / "record.json")
    assert rec.status is Status.FAILED and rec.error.kind == "image" and "not the pinned digest" in rec.error.message


def test_offline_is_refused_on_the_local_backend(make_bundle, capsys) -> None:
    from harness.cli import main

    assert main(["matrix", str(make_bundle()), "--backend", "local", "--offline"]) == 2
    assert "--offline only apply to the docker backend" in capsys.readouterr().err
