"""The package's shape: no import cycles, backends below the CLI, one module that talks to Docker."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable
from tests.conftest import REPO

HARNESS = REPO / "harness"


def _modules() -> dict[str, Path]:
    out = {}
    for f in HARNESS.rglob("*.py"):
        name = ".".join(f.relative_to(HARNESS.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module -> harness modules it imports (anywhere in the file, lazy imports included), and -> top-level packages."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    external: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                    external[m].add(target.split(".")[0])
                for a in node.names:
                    for cand in (f"{target}.{a.name}", target):
                        if cand in mods and cand != m:
                            graph[m].add(cand)
                            break
            elif isinstance(node, ast.Import):
                for a in node.names:
                    external[m].add(a.name.split(".")[0])
                    if a.name in mods:
                        graph[m].add(a.name)
    return graph, external


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, seen, stack = [], set(), []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    return cycles


def test_no_import_cycles() -> None:
    graph, _ = import_graph()
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def _is_cli(m: str) -> bool:
    return m == "harness.cli" or m.startswith("harness.cli.")


def _api_layer_breaches(graph: dict[str, set[str]]) -> list[str]:
    """Where the Python API leaves its layer: above the runner (it drives it), below the CLI alone (the CLI
    builds its options there and runs compare and diverge through it, never the other way round)."""
    api = "harness.api"
    out = [f"{api} imports {t}" for t in sorted(graph.get(api, ())) if _is_cli(t)]
    if "harness.runner" not in graph.get(api, ()):
        out.append(f"{api} does not drive harness.runner")
    out += [f"{m} imports {api}" for m in sorted(graph) if api in graph[m] and not _is_cli(m)]
    return out


def test_the_api_sits_above_the_runner_and_below_the_cli_alone() -> None:
    graph, _ = import_graph()
    assert _api_layer_breaches(graph) == []


def test_the_api_layer_rule_finds_a_breach() -> None:
    graph = {"harness.api": {"harness.runner"}, "harness.cli": {"harness.api"}, "harness.runner": set()}
    assert _api_layer_breaches(graph) == []
    assert _api_layer_breaches({**graph, "harness.runner": {"harness.api"}}) == ["harness.runner imports harness.api"]
    assert _api_layer_breaches({**graph, "harness.api": {"harness.runner", "harness.cli.common"}}) == [
        "harness.api imports harness.cli.common"]
    assert _api_layer_breaches({**graph, "harness.api": set()}) == ["harness.api does not drive harness.runner"]


def _snapshot_layer_breaches(graph: dict[str, set[str]]) -> list[str]:
    """The snapshot library never imports the CLI; the snapshot CLI reaches the engine only through the library."""
    out = [f"{m} imports {t}" for m in sorted(graph) if m == "harness.snapshot" or m.startswith("harness.snapshot.")
           for t in sorted(graph[m]) if _is_cli(t)]
    out += [f"harness.cli.snapshot imports {t}" for t in sorted(graph.get("harness.cli.snapshot", ()))
            if t == "harness.docker_engine" or t.startswith("harness.backends")]
    return out


def test_the_snapshot_library_sits_below_its_cli() -> None:
    graph, _ = import_graph()
    assert "harness.snapshot.workflows" in graph  # the workflows are a library module, not CLI code
    assert _snapshot_layer_breaches(graph) == []


def test_the_snapshot_layer_rule_finds_a_breach() -> None:
    graph = {"harness.snapshot.workflows": {"harness.runner"}, "harness.cli.snapshot": {"harness.snapshot"}}
    assert _snapshot_layer_breaches(graph) == []
    assert _snapshot_layer_breaches({**graph, "harness.snapshot.container": {"harness.cli.common"}}) == [
        "harness.snapshot.container imports harness.cli.common"]
    assert _snapshot_layer_breaches({**graph, "harness.cli.snapshot": {"harness.backends.docker"}}) == [
        "harness.cli.snapshot imports harness.backends.docker"]


def test_backends_never_import_the_cli() -> None:
    graph, _ = import_graph()
    offenders = {m: sorted(t for t in targets if t == "harness.cli" or t.startswith("harness.cli."))
                 for m, targets in graph.items() if m.startswith("harness.backends")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_worker_imports_nothing_from_the_host_side() -> None:
    # The worker runs inside minimal images: it may not need rich, docker or the CLI.
    graph, external = import_graph()
    for m in graph:
        if m.startswith("harness.worker"):
            assert not {"rich", "docker"} & external[m], m
            assert not [t for t in graph[m] if t.startswith(("harness.cli", "harness.backends", "harness.runner",
                                                             "harness.report", "harness.judge"))], m


def test_only_the_docker_module_imports_the_docker_sdk() -> None:
    _, external = import_graph()
    users = sorted(m for m, pkgs in external.items() if "docker" in pkgs)
    assert users == ["harness.docker_engine"]


def test_only_the_slurm_backend_imports_submitit() -> None:
    _, external = import_graph()
    users = sorted(m for m, pkgs in external.items() if "submitit" in pkgs)
    assert users == ["harness.backends.slurm"]


def test_the_statistics_of_a_verdict_live_in_one_module() -> None:
    """Every distribution a verdict reads (t quantiles and tails) comes from harness.stats."""
    _, external = import_graph()
    assert sorted(m for m, pkgs in external.items() if "scipy" in pkgs) == ["harness.stats"]


def test_every_module_the_worker_runs_is_in_the_cache_key() -> None:
    # --resume reuses a cell only while the sources its worker ran are unchanged: a module the worker imports
    # (directly or through another) that the key leaves out would let an edit reuse a stale result
    from harness.cache import WORKER_SOURCES

    graph, _ = import_graph()
    seen: set[str] = set()
    todo = [m for m in graph if m.startswith("harness.worker")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    outside = {m.removeprefix("harness.") + ".py" for m in seen if not m.startswith("harness.worker")}
    outside = {"__init__.py" if m == "harness.py" else m for m in outside}
    assert outside <= set(WORKER_SOURCES), sorted(outside - set(WORKER_SOURCES))


def _reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or through others: module -> the module that imports it on a path."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        m = todo.pop()
        for n in sorted(graph.get(m, ())):
            if n not in via and n != start:
                via[n] = m
                todo.append(n)
    return via


def _path(via: dict[str, str], start: str, end: str) -> list[str]:
    out = [end]
    while out[-1] != start:
        out.append(via[out[-1]])
    return out[::-1]


def _reaches(graph: dict[str, set[str]], sources: Callable[[str], bool], targets: Callable[[str], bool]) -> list[str]:
    """Each import path (``a -> b -> c``) from a module of ``sources`` to a module of ``targets``, one per pair."""
    out = []
    for m in sorted(graph):
        if sources(m):
            via = _reach(graph, m)
            out += [" -> ".join(_path(via, m, t)) for t in sorted(via) if targets(t)]
    return out


JUDGE_LAYER = ("harness.judge", "harness.ladder", "harness.stats", "harness.band", "harness.causes",
               "harness.attribution")  # verdicts: pure functions of records


def _in_judge_layer(m: str) -> bool:
    return m in JUDGE_LAYER


def _is_backend(m: str) -> bool:
    return m == "harness.backends" or m.startswith("harness.backends.")


def _is_worker(m: str) -> bool:
    return m == "harness.worker" or m.startswith("harness.worker.")


def test_the_judge_layer_never_reaches_the_backends() -> None:
    # Verdicts are computed from records alone: what ran them (local, Docker, Slurm) is not theirs to import.
    graph, _ = import_graph()
    assert set(JUDGE_LAYER) <= set(graph), sorted(set(JUDGE_LAYER) - set(graph))
    assert _reaches(graph, _in_judge_layer, _is_backend) == []


def test_the_worker_never_reaches_the_runner() -> None:
    # The worker is what the runner starts; through no module may it import the runner back.
    graph, _ = import_graph()
    assert _reaches(graph, _is_worker, lambda m: m == "harness.runner") == []


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Import paths back into the worker from the modules beside it that the worker imports (the bundle,
    records, errors, safeio ...): they lie below the worker, so such a path is an arrow pointing up."""
    below = {t for m in graph if _is_worker(m) for t in _reach(graph, m) if not _is_worker(t)}
    return _reaches(graph, lambda m: m in below, _is_worker)


def test_what_the_worker_imports_from_beside_it_never_imports_the_worker() -> None:
    graph, _ = import_graph()
    assert _upward(graph) == []


def test_the_layer_rules_find_a_path_through_other_modules() -> None:
    graph = {"harness.judge": {"harness.record"}, "harness.record": set(), "harness.backends.base": set(),
             "harness.worker.retrain": {"harness.bundle"}, "harness.bundle": set(), "harness.runner": set()}
    assert _reaches(graph, _in_judge_layer, _is_backend) == []
    assert _reaches(graph, _is_worker, lambda m: m == "harness.runner") == []
    sideways = {**graph, "harness.record": {"harness.backends.base"}}
    assert _reaches(sideways, _in_judge_layer, _is_backend) == ["harness.judge -> harness.record -> harness.backends.base"]
    up = {**graph, "harness.bundle": {"harness.runner"}}
    assert _reaches(up, _is_worker, lambda m: m == "harness.runner") == [
        "harness.worker.retrain -> harness.bundle -> harness.runner"]
    assert _upward(graph) == []
    assert _upward({**graph, "harness.bundle": {"harness.worker.trainer_cmd"}, "harness.worker.trainer_cmd": set()}) == [
        "harness.bundle -> harness.worker.trainer_cmd"]


def test_renderers_do_not_compute_the_attribution() -> None:
    # harness.judge computes it into the Comparison; report, report_compact and report_html render it
    # (an explicit width override in report.attribution_of goes through harness.judge too).
    offenders = []
    for name in ("report.py", "report_compact.py", "report_html.py"):
        tree = ast.parse((HARNESS / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("attribution"):
                offenders += [f"{name} imports {a.name}" for a in node.names if a.name == "attribute"]
    assert offenders == []


def _outside_the_copy(graph: dict[str, set[str]], copied: set[str]) -> list[str]:
    """Harness modules that a module of ``copied`` imports from outside ``copied``."""
    return [f"{m} imports {t}" for m in sorted(copied) for t in sorted(graph.get(m, ())) if t not in copied]


def test_the_modules_copied_beside_a_trainer_commands_site_import_only_each_other() -> None:
    # harness.worker.trainer_cmd copies them, without the package around them, into the command's Python processes
    # (the trace writer spells harness.safeio.CellPaths.TRACE itself for it)
    from harness.worker.trainer_cmd import HOOKS_FILES

    graph, _ = import_graph()
    copied = {"harness.worker." + name.removesuffix(".py") for name in HOOKS_FILES}
    assert copied <= set(graph) and _outside_the_copy(graph, copied) == []
    assert _outside_the_copy({**graph, "harness.worker.trace": {"harness.safeio"}}, copied) == [
        "harness.worker.trace imports harness.safeio"]
