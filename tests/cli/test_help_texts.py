"""Every option of every command says what it does; errors point at a way forward."""

from __future__ import annotations

import argparse

from harness.cli import build_parser


def walk(parser: argparse.ArgumentParser, path: str = "harness"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_has_help() -> None:
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in walk(build_parser())
               if a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert missing == []


def test_an_unreachable_engine_suggests_the_local_backend(monkeypatch) -> None:
    from harness import docker_engine
    from harness.errors import HarnessError

    exc = docker_engine.unreachable("unix:///var/run/docker.sock", "connection refused")
    assert isinstance(exc, HarnessError) and "Docker engine not reachable" in exc.one_line()
    assert "--backend local" in (exc.hint or "")
