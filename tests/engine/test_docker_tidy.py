"""conftest's engine_tidy: after every docker test, passed or failed, the containers this session started and
left are removed, and no others."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import inner_pytest

pytestmark = pytest.mark.docker


def test_the_containers_a_failing_test_leaves_are_removed_when_it_ends_and_no_others(docker_client, base_image,
                                                                                     tmp_path: Path) -> None:
    """A test that fails with its containers still there (here in a pytest run of its own): one running with a
    directory of the test bind-mounted, one created with a noexec overlay over it (as a cell's is: the directory
    is named only in the volume's options). Both are gone once the test has ended; a container that mounts
    nothing of that session (someone else's) is left alone."""
    other = docker_client.containers.run(base_image, ["sleep", "600"], detach=True, network_mode="none")
    try:
        res = inner_pytest(tmp_path, "docker_client, base_image", f"""
            import docker
            import pytest

            from harness.docker_engine import overlay_mount

            @pytest.mark.docker
            def test_fails_with_its_containers_left(docker_client, base_image, tmp_path):
                (tmp_path / "cell").mkdir()
                (tmp_path / "work" / "lower").mkdir(parents=True)
                bound = docker_client.containers.run(
                    base_image, ["sleep", "600"], detach=True, network_mode="none",
                    mounts=[docker.types.Mount("/out", str(tmp_path / "cell"), type="bind", read_only=True)])
                overlaid = docker_client.containers.create(
                    base_image, ["sleep", "600"], network_mode="none",
                    mounts=[overlay_mount(str(tmp_path / "cell"), "/out", str(tmp_path / "work"))])
                open({str(tmp_path / "ids")!r}, "w").write(bound.id + " " + overlaid.id)
                assert False, "a test that fails with its containers left"
            """)
        ids = (tmp_path / "ids").read_text().split()
        assert res.returncode == 1 and "1 failed" in res.stdout, res.stdout + res.stderr
        assert "engine_tidy: removed container(s)" in res.stdout, res.stdout
        left = {c.id for c in docker_client.containers.list(all=True)}
        assert len(ids) == 2 and not set(ids) & left and other.id in left
    finally:
        other.remove(force=True, v=True)
