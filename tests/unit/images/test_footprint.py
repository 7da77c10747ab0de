"""Lean images, pure parts: sizes, image states, shared layers counted once, and the BuildKit
build path (log parsing, CLI choice) driven through a stand-in docker CLI run as a real subprocess."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from harness.docker_engine import (Engine, buildkit_cli, buildkit_command, buildkit_failure, cli_version_major,
                                   is_step_line)
from harness.errors import BackendError, BuildFailed
from harness.images import footprint
from harness.images.footprint import human_bytes, image_state, union_size


def test_human_bytes_uses_the_engines_decimal_units():
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(2_302_000) == "2.3 MB"
    assert human_bytes(6_201_000_000) == "6.2 GB"
    assert human_bytes(265_400_000) == "265 MB"
    assert human_bytes(None) == "?" and human_bytes(-1) == "?"


def test_image_states():
    current = {"harness:cpu-torch2.13-aaaaaaaaaaaa"}
    known = {"cpu-torch2.13"}
    assert image_state(["harness:cpu-torch2.13-aaaaaaaaaaaa", "harness:cpu-torch2.13"], current, known) == "current"
    assert image_state(["harness:cpu-torch2.13-bbbbbbbbbbbb"], current, known) == "stale"
    assert image_state([], current, known) == "dangling"
    assert image_state(["harness:cpu-torch2.13"], current, known) == "alias"  # the alias alone: not ours to judge
    # a cell whose current tag is unknown (no wheelhouse given) is never called stale
    assert image_state(["harness:cu130-torch2.14-cccccccccccc"], current, known) == "unknown"
    assert footprint.content_tag_cell("harness:cu130-torch2.14-0123456789ab") == "cu130-torch2.14"
    assert footprint.content_tag_cell("harness:cu130-torch2.14") is None
    assert footprint.is_harness_image([], {"org.harness.cell": "x"})
    assert not footprint.is_harness_image(["local/debian-py:bookworm"], {})


def test_union_size_counts_a_shared_layer_once():
    base, venv = ("k-base", 265), ("k-venv", 5_930)
    old = [base, venv, ("k-src-old", 2)]
    new = [base, venv, ("k-src-new", 3)]
    assert union_size([old, new]) == 265 + 5_930 + 2 + 3
    assert union_size([]) == 0


def test_step_lines_and_buildkit_failure_reason():
    log = [
        "#1 [internal] load build definition from Dockerfile",
        "#5 [2/9] RUN set -e; if command -v python3.11",
        "#5 0.211 harness: base image lacks python3.11 with venv",
        "#5 ERROR: executor failed running [/bin/sh -c set -e; ...]: exit code: 1",
        "error: failed to solve: rpc error: code = Unknown desc = executor failed running: exit code: 1",
    ]
    assert is_step_line(log[1]) and is_step_line("Step 3/9 : RUN x") and not is_step_line(log[2])
    assert is_step_line("#7 [builder 3/6] COPY wheelhouse/ /wheels/")
    assert buildkit_failure(log) == "step 2/9 (RUN) exited with code 1"
    assert buildkit_failure(["#3 [1/2] FROM x", "#3 ERROR: pull access denied"]) == "step 1/2 (FROM): pull access denied"
    assert buildkit_failure(["#3 [1/2] FROM x"]) is None


def test_cli_version_and_command():
    assert cli_version_major("Docker version 20.10.24+dfsg1, build 297e128") == 20
    assert cli_version_major("Docker version 28.2.2, build e6534b4") == 28
    assert cli_version_major("nonsense") is None
    cmd = buildkit_command(("docker", "build"), "/ctx", "harness:c-1", {"B": "2", "A": "1"}, {"l": "v"}, "/t/iid",
                           nocache=True)
    assert cmd[:2] == ["docker", "build"] and cmd[-1] == "/ctx" and "--no-cache" in cmd
    assert cmd[cmd.index("--iidfile") + 1] == "/t/iid" and cmd[cmd.index("-t") + 1] == "harness:c-1"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--build-arg"] == ["A=1", "B=2"]
    assert "--pull" not in cmd


# ----------------------------------------------------------------------------- a stand-in docker CLI

FAKE_CLI = r'''#!{python}
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["buildx"]:
    sys.exit(1)  # no buildx plugin
if args == ["--version"]:
    print("Docker version {version}, build fake"); sys.exit(0)
assert args[0] == "build" and os.environ.get("DOCKER_BUILDKIT") == "1", args
with open(os.environ["FAKE_CLI_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
labels = dict(a.split("=", 1) for a in (args[i + 1] for i, x in enumerate(args) if x == "--label"))
print("#1 [internal] load build definition from Dockerfile")
print("#5 [2/9] RUN set -e; check python")
if labels.get("org.harness.cell") == "broken":
    print("#5 0.2 harness: base image lacks python3.11 with venv")
    print("#5 ERROR: executor failed running [/bin/sh -c set -e; check python]: exit code: 1")
    sys.exit(1)
print("#9 writing image sha256:feed done")
open(args[args.index("--iidfile") + 1], "w").write("sha256:feed")
'''


def _fake_cli(tmp_path: Path, version: str = "20.10.24") -> Path:
    cli = tmp_path / f"docker-{version}"
    cli.write_text(FAKE_CLI.replace("{python}", sys.executable).replace("{version}", version))
    cli.chmod(cli.stat().st_mode | stat.S_IXUSR)
    return cli


class _Api:
    def prune_builds(self, filters=None, keep_storage=None, all=None):
        self.pruned = filters
        return {"SpaceReclaimed": 3_000_000_000}


class _Client:
    def __init__(self):
        self.api = _Api()


def test_buildkit_cli_is_chosen_by_version(tmp_path):
    assert buildkit_cli(str(_fake_cli(tmp_path, "20.10.24"))) == (str(_fake_cli(tmp_path, "20.10.24")), "build")
    assert buildkit_cli(str(_fake_cli(tmp_path, "28.2.2"))) is None  # BuildKit only through buildx there
    assert buildkit_cli(str(tmp_path / "absent")) is None


def test_buildkit_build_returns_the_id_and_drops_the_context_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DOCKER_CLI", str(_fake_cli(tmp_path)))
    monkeypatch.setenv("FAKE_CLI_LOG", str(tmp_path / "calls.jsonl"))
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM x\nRUN --mount=type=bind,source=w,target=/w true\n")
    client = _Client()
    lines: list[str] = []
    image = Engine(client).build(tmp_path / "ctx", "harness:ok-1", {"A": "1"}, {"org.harness.cell": "ok"},
                                 on_log=lines.append, cell="ok")
    assert image == "sha256:feed"
    assert any(is_step_line(line) for line in lines)
    call = json.loads((tmp_path / "calls.jsonl").read_text().splitlines()[0])
    assert "org.harness.cell=ok" in call and "A=1" in call
    assert client.api.pruned == {"type": ["source.local"]}  # only BuildKit's copies of build contexts


def test_buildkit_build_failure_names_the_step_and_keeps_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DOCKER_CLI", str(_fake_cli(tmp_path)))
    monkeypatch.setenv("FAKE_CLI_LOG", str(tmp_path / "calls.jsonl"))
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM x\n")
    with pytest.raises(BuildFailed) as err:
        Engine(_Client()).build(tmp_path / "ctx", "harness:broken-1", {}, {"org.harness.cell": "broken"}, cell="broken")
    assert "step 2/9 (RUN) exited with code 1" in str(err.value)
    assert any("lacks python3.11" in line for line in err.value.log_tail)


def test_a_mount_dockerfile_without_buildkit_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DOCKER_CLI", str(_fake_cli(tmp_path, "28.2.2")))
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM x\nRUN --mount=type=bind,source=w,target=/w true\n")
    with pytest.raises(BackendError, match="needs BuildKit") as err:
        Engine(_Client()).build(tmp_path / "ctx", "harness:c-1", {}, {}, cell="c")
    assert "buildx" in (err.value.hint or "")
