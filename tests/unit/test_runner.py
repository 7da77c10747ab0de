"""Running a plan for real (local child processes): skips, missing cells and what a run writes."""

from __future__ import annotations

import json
from pathlib import Path


from harness import record
from harness.backends.local import LocalBackend
from harness.cli.common import verdict_exit
from harness.judge import Tolerances, Verdict
from harness.options import ReportOptions
from harness.plan import Cell, Job, Plan
from harness.record import Status
from harness.runner import execute_plan, load_and_check
from harness.options import RunOptions


def test_a_skipped_cell_beside_a_reproduced_one_exits_0_and_says_why(example: Path, tmp_path: Path, capsys,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "220")
    bundle, _ = load_and_check(RunOptions(bundle=str(example)))
    plan = Plan("local", [
        Cell("cpu-strict-t1", threads=1),
        Cell("cu124-torch2.5", device="cuda", skip_reason="driver 470.57.02 is below 525.60.13, the oldest that runs "
                                                           "CUDA 12.x wheels (minor-version compatibility)"),
    ])
    out = tmp_path / "out"
    job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, results_dir=str(out), run_id="r1")
    comparison = execute_plan(plan, LocalBackend(), job, ReportOptions(json_out=str(tmp_path / "r.json")),
                              Tolerances(), progress_enabled=False)
    assert comparison.overall is Verdict.REPRODUCED and verdict_exit(comparison) == 0
    text = capsys.readouterr().out
    assert "- cu124-torch2.5 skipped: driver 470.57.02 is below 525.60.13" in text
    assert "Overall: reproduced" in text and "1 skipped" in text
    skipped = record.read(out / "cu124-torch2.5" / "record.json")
    assert skipped.status is Status.SKIPPED and skipped.run_id == "r1" and "525.60.13" in skipped.error.message
    # run.json lists both planned cells in order; report.json judges them
    assert record.read_manifest(out).cells == ["cpu-strict-t1", "cu124-torch2.5"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["verdict"] for c in report["comparison"]["cells"]] == ["reproduced", "skipped"]


def test_report_json_round_trips_through_compare(example: Path, tmp_path: Path) -> None:
    """A report written by one run is read back as typed records by another (harness compare r.json)."""
    bundle, _ = load_and_check(RunOptions(bundle=str(example)))
    out = tmp_path / "out"
    job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, results_dir=str(out), run_id="r2")
    execute_plan(Plan("local", [Cell("a", threads=1)]), LocalBackend(), job, ReportOptions(), Tolerances(),
                 progress_enabled=False)
    rs = record.load(out / "report.json")
    assert [r.cell for r in rs.records] == ["a"] and rs.records[0].ok
    assert rs.records[0] == record.read(out / "a" / "record.json")


def test_cuda_cells_share_a_gpu_once_the_first_measured_its_memory_and_an_oom_runs_again_alone(tmp_path: Path, monkeypatch) -> None:
    """The runner sizes GPU sharing from the first finished CUDA cell's record and backs off on an OOM.

    An in-process backend stands in for the worker (what a CUDA worker records is tested with the
    worker); it counts the cells on each GPU while they run.
    """
    import threading
    import time

    from harness import record, runner
    from harness.backends.base import Backend, Launch
    from harness.record import ErrorInfo, ResultRecord

    class OneGpu(Backend):
        name = "local"

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.on_gpu: set[str] = set()
            self.seen: list[tuple[str, int, int]] = []  # (cell, gpu_shared, cells on the GPU when it started)
            self.oom = {"g3"}

        def host_slots(self):
            return list(range(8)), ["0"]

        def launch(self, cell, job, spec_path, on_line):
            """The worker, in-process: it holds the GPU a while, then leaves its record where a worker does."""
            with self.lock:
                self.on_gpu.add(cell.name)
                self.seen.append((cell.name, cell.slot.gpu_shared, len(self.on_gpu)))
            time.sleep(0.4)
            with self.lock:
                self.on_gpu.discard(cell.name)
            path = job.cell_paths(cell).record
            if cell.name in self.oom and cell.slot.gpu_shared > 1:
                self.oom.discard(cell.name)
                record.write(path, ResultRecord(cell=cell.name, status=Status.FAILED, error=ErrorInfo(
                    kind="run", message="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")))
                return Launch(exit_status=1)
            record.write(path, ResultRecord(cell=cell.name, status=Status.OK, metrics={"retrained": {"val_loss": 0.1}},
                                            gpu_memory={"total_mib": 10000.0, "peak_reserved_mib": 2000.0,
                                                        "context_mib": 500.0}))
            return Launch(exit_status=0)

    class Progress:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def note(self, text, style=""):
            self.lines.append(text)

        info = note

        def start(self, *a): pass
        def event(self, *a): pass
        def done(self, *a): pass

    writes: list[str] = []  # every record.json written, by the worker stand-in and the launcher
    real_write = record.write
    monkeypatch.setattr(record, "write", lambda path, rec: (writes.append(Path(path).parent.name), real_write(path, rec)))
    backend, progress = OneGpu(), Progress()
    cells = [Cell(f"g{i}", device="cuda", threads=1) for i in range(6)]
    job = Job(bundle_dir="b", data_path="d", results_dir=str(tmp_path), run_id="r1")
    outcome = runner.run_cells(Plan(backend="local", cells=cells), backend, job, progress, jobs=0)
    assert [r.cell for r in outcome.records] == [c.name for c in cells] and all(r.ok for r in outcome.records)
    first = backend.seen[0]
    assert first == ("g0", 1, 1)  # alone: nothing else started until it had measured
    assert {name for name, _, _ in backend.seen[1:4]} == {"g1", "g2", "g3"}  # then three at once, in any order
    assert max(n for _, _, n in backend.seen) == 3  # 2000 MiB x 1.25 + 500 MiB a cell: 3 fit 90 % of 10000
    assert any("up to 3 cell(s) share a GPU" in line for line in progress.lines)
    # g3 ran out of memory beside others: it ran again alone, and nothing shared the GPU after that
    runs = [(name, shared) for name, shared, _ in backend.seen if name == "g3"]
    assert len(runs) == 2 and runs[0][1] > 1 and runs[1][1] == 1
    second = [i for i, (name, _, _) in enumerate(backend.seen) if name == "g3"][1]
    assert all(shared == 1 and n == 1 for _, shared, n in backend.seen[second:])
    g3 = next(r for r in outcome.records if r.cell == "g3")
    assert any("ran again alone on its GPU" in w for w in g3.warnings)
    assert "ran again alone" in (tmp_path / "g3" / "record.json").read_text()
    assert writes.count("g3") == 4 and writes.count("g0") == 2  # each run: the worker's, then the launcher's, once
    assert g3.slot.gpu_shared == 1 and not any("ran again alone" in w for r in outcome.records if r.cell != "g3"
                                               for w in r.warnings)
    assert any("g3 ran out of GPU memory" in line for line in progress.lines)


def test_a_cell_that_cannot_start_is_skipped_or_failed_in_the_words_of_its_refusal(tmp_path: Path) -> None:
    """What a plan blocked and what ``prepare`` refused never start: a refusal with a skip reason is a skip,
    a failed build fails alone with its log's tail; the other cells run."""
    from harness import runner
    from harness.backends.base import Backend, CellRefused, Launch
    from harness.errors import BaseImageMissing, BuildFailed, InputError

    from tests.records import record as ok_record

    no_wheelhouse = CellRefused(InputError("cell w", "builds from a wheelhouse, none was given"),
                                skip_reason="no wheelhouse given and no built image harness:w: `harness images "
                                            "wheelhouse --cells w --dest DIR`, then --wheelhouse w=DIR")
    build = BuildFailed("b", "harness:b-0123", "step 5/9 (RUN) exited with code 1", ["", "apt-get: 404", "lacks gcc"])
    base = BaseImageMissing("m", "nvidia/cuda:12.4.1-runtime-ubuntu22.04")

    class Refusing(Backend):
        name = "docker"

        def __init__(self) -> None:
            self.prepared: list[str] = []
            self.expected: list[str] = []

        def prepare(self, cells, job):
            self.prepared = [c.name for c in cells]
            return {"w": no_wheelhouse}

        def expect(self, cells, job):
            self.expected = [c.name for c in cells]

        def launch(self, cell, job, spec_path, on_line):  # the worker's record, as a worker leaves it
            (spec_path.parent / "record.json").write_text(ok_record(cell.name).to_json())
            return Launch(exit_status=0)

    class Progress:
        def note(self, *a): pass
        def start(self, *a): pass
        def event(self, *a): pass
        def done(self, *a): pass

    backend = Refusing()
    job = Job(bundle_dir="b", data_path="d", results_dir=str(tmp_path), run_id="r1")
    plan = Plan("docker", [Cell(n, threads=1) for n in ("w", "b", "m", "ok")], blocked={"b": build, "m": base})
    outcome = runner.run_cells(plan, backend, job, Progress())
    assert backend.prepared == ["w", "ok"] and backend.expected == ["ok"]
    got = {r.cell: r for r in outcome.records}
    assert {name: record.read(tmp_path / name / "record.json") for name in got} == got
    assert got["ok"].ok
    assert got["w"].status is Status.SKIPPED and got["w"].error.kind == "skipped"
    assert got["w"].error.message == no_wheelhouse.skip_reason
    assert got["m"].status is Status.SKIPPED and got["m"].error.message == base.skip_reason
    assert got["b"].status is Status.FAILED and got["b"].error.kind == "image"
    assert got["b"].error.message == build.one_line() and got["b"].error.log_tail == "apt-get: 404\nlacks gcc"


def test_a_cells_record_is_written_once_and_carries_its_cache_key(example: Path, tmp_path: Path, monkeypatch) -> None:
    """The host writes a cell's record.json once, with everything it adds (the cache key too): never a record
    on disk without its key, for a --resume to rerun a cell that had finished."""
    from harness.cache import CellCache

    bundle, pre = load_and_check(RunOptions(bundle=str(example)))
    out = tmp_path / "out"
    job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, results_dir=str(out), run_id="r3")
    written: list[tuple[Path, str | None]] = []
    write = record.write

    def counted(path, rec) -> None:
        written.append((Path(path), rec.cache_key))
        write(path, rec)

    monkeypatch.setattr(record, "write", counted)
    cache = CellCache(bundle.root, pre.data_sha256, ())
    execute_plan(Plan("local", [Cell("a", threads=1)]), LocalBackend(), job, ReportOptions(), Tolerances(),
                 progress_enabled=False, cache=cache)
    path = out / "a" / "record.json"
    rec = record.read(path)
    assert rec.ok and rec.cache_key in cache.documents  # the key the cell was run under
    assert written == [(path, rec.cache_key)]


def test_the_ulp_members_training_rounded_away_are_drawn_again_each_once_at_most_as_many_as_the_band() -> None:
    """Pure: which members :func:`harness.runner.redraw_plan` draws again, as what, and when it stops."""
    from harness.plan import band_cells
    from harness.runner import redraw_plan

    from tests.records import member, record as rec

    base = Cell("base", threads=1)
    plan = Plan("local", band_cells(base, 3, 0, 42) + [base])
    base_rec = rec("base", sha="w-base")

    def ulp(i: int, sha: str, **labels: str) -> record.ResultRecord:
        m = member("ulp", i, 0.9)
        m.weights_sha256 = sha
        m.labels.update(labels)
        return m

    assert redraw_plan(plan, [base_rec, ulp(1, "a"), ulp(2, "b"), ulp(3, "c")]) is None  # every change reached training
    records = [base_rec, ulp(1, "a"), ulp(2, "w-base"), ulp(3, "c")]  # member 2 trained the unperturbed run's weights
    more, why = redraw_plan(plan, records)
    (new,) = more.cells
    assert new.name == "band-ulp-4" and new.perturb == {"kind": "ulp", "seed": 4} and new.band.member == 4
    assert new.labels["redraw_of"] == "band-ulp-2" and new.labels["band_of"] == "base" and new.threads == 1
    assert "drawing again: band-ulp-4 for band-ulp-2" in why
    plan = Plan("local", plan.cells + more.cells)
    assert redraw_plan(plan, records) is None  # drawn again once: its replacement is planned
    records.append(ulp(4, "w-base", redraw_of="band-ulp-2"))  # rounded away again: drawn once more
    assert [c.name for c in redraw_plan(plan, records)[0].cells] == ["band-ulp-5"]
    # every change rounded away (two members alike, without the unperturbed run): as many again as the band, then none
    plan = Plan("local", band_cells(base, 2, 0, 42))
    records = [ulp(1, "x"), ulp(2, "x")]
    more, _ = redraw_plan(plan, records)
    assert [(c.name, c.labels["redraw_of"]) for c in more.cells] == [("band-ulp-3", "band-ulp-1"),
                                                                     ("band-ulp-4", "band-ulp-2")]
    plan = Plan("local", plan.cells + more.cells)
    assert redraw_plan(plan, records + [ulp(3, "x", redraw_of="band-ulp-1"), ulp(4, "x", redraw_of="band-ulp-2")]) is None
    # a band measured in another run (--band-from: not in this plan) is not this run's to draw again
    assert redraw_plan(Plan("local", [base]), [base_rec, ulp(1, "w-base"), ulp(2, "w-base")]) is None


def test_the_automatic_ulp_band_is_measured_once_even_when_it_measured_nothing() -> None:
    """--band auto: a cell a hair from the trial gets the ulp band; a band that ran and measured nothing (every member
    unperturbed, or rounded away) is not run again under the same names: the seed band, if any, follows."""
    from harness.runner import AutoBands, _auto_band_plan

    from tests.records import member, record as rec

    plan = Plan("local", [Cell("run", threads=1)])
    auto = AutoBands(n_ulp=8, n_seed=8, training_seed=42)
    near = rec("run", r2=0.9 + 1e-6, loss=0.1 + 1e-8, sha="w2")  # beyond float32 rounding, plausibly numerical
    more, why = _auto_band_plan(plan, auto, [near], ReportOptions(), Tolerances())
    assert [c.name for c in more.cells] == [f"band-ulp-{i}" for i in range(1, 9)] and "ulp band" in why
    nothing = [member("ulp", i, 0.9, applied=False) for i in (1, 2)]
    again = _auto_band_plan(plan, auto, [near, *nothing], ReportOptions(), Tolerances())
    assert again is None or not any(c.name.startswith("band-ulp-") for c in again[0].cells)
