"""bench/gpu.sh, the one command a GPU node runs, in its dry run: every stage at tiny sizes
on the CPU. A GPU node is lent rarely and briefly, so the script must work the first time
there: this keeps it from rotting between such runs. The figures only a GPU gives (the FLOP
floor, the goal's verdicts) are checked in process with a stand-in matmul rate."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.conftest import REPO


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The dry run's results folder and its standard output."""
    out = tmp_path_factory.mktemp("gpu-results")
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    done = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert (REPO / "BENCHMARKS.md").read_text() == benchmarks, "a dry run wrote BENCHMARKS.md"
    return out, done.stdout


def results(out: Path) -> dict[str, Any]:
    return json.loads((out / "gpu.json").read_text())


@pytest.mark.integration  # it starts pytest, the benchmark and a worker
@pytest.mark.timeout(600)
def test_every_stage_runs_and_reports(dry_run: tuple[Path, str]) -> None:
    out, stdout = dry_run
    run = results(out)
    assert run["dry_run"] is True
    assert {name: s["status"] for name, s in run["stages"].items()} == {
        "cuda-tests": "ok",
        "throughput": "ok",
        "worker": "ok",
    }
    assert run["not_run"] == []
    assert 0 < run["seconds"] < run["limit_s"]
    for name in ("cuda-tests.log", "throughput.log", "worker.log"):
        assert (out / name).stat().st_size > 0, name

    cuda = run["stages"]["cuda-tests"]
    assert "tests/test_checkpoint.py" in cuda["files"]
    assert cuda["collected"] == len(cuda["tests"]) >= 1
    assert "tests/test_checkpoint.py::test_a_checkpoint_moves_between_cuda_and_cpu" in cuda["tests"]

    digits = run["stages"]["throughput"]["workloads"]["digits"]
    assert set(digits["methods"]) >= {"(a) baseline", "(b) one at a time", "(c) fused"}
    for figures in digits["methods"].values():
        assert figures["seconds"] > 0 and figures["trials_per_hour"] > 0
    assert digits["methods"]["(a) baseline"]["trials_run"] == 2  # --slow-trials
    assert digits["methods"]["(c) fused"]["trials_run"] == digits["trials"] == 4
    assert "(e) fused, compiled" in digits["skipped"]  # a dry run does not compile
    assert run["goal"]["workload"] == "digits" and run["goal"]["fused_vs_baseline"] > 0
    assert run["goal"]["fused_vs_baseline_met"] is None  # not judged on a CPU

    worker = run["stages"]["worker"]
    assert worker["finished"] == worker["budget"] == 8
    assert worker["progress"]["failed"] == 0
    assert worker["claims"] == [4, 4] and worker["pack_used"] == 4
    assert worker["wall_s"] > 0 and worker["trials_per_hour"] > 0
    assert 0 < worker["best_value"] <= 1

    section = (out / "gpu-section.md").read_text()
    for heading in ("## GPU check", "### Goal", "### CUDA tests", "### Throughput"):
        assert heading in section
    assert "#### digits" in section and "8 trials finished" in section

    summary = stdout.strip().splitlines()[-5:]  # printed last: device, 3 stages, the goal
    assert summary[0].startswith("GPU check on CPU")
    assert summary[1].startswith("  cuda-tests: ok")
    assert summary[2].startswith("  throughput: ok, digits: (c) ")
    assert " = " in summary[2] and "x (a)" in summary[2]
    assert summary[3].startswith("  worker: ok, 8 trials")
    assert summary[4].startswith("  goal (dry run on the CPU, not judged)")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_saved_run_rewrites_the_benchmarks_section(
    dry_run: tuple[Path, str], tmp_path: Path, bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The way back from a node where only gpu.json came home."""
    import gpu
    import report

    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n## Throughput\n\nkept\n\n## GPU check\n\nold\n")
    monkeypatch.setattr(report, "RESULTS", benchmarks)
    summary = gpu.from_json(dry_run[0] / "gpu.json")
    text = benchmarks.read_text()
    assert "old" not in text and "## Throughput\n\nkept\n" in text
    assert text.count("## GPU check") == 1 and "8 trials finished" in text
    assert summary.startswith("GPU check on CPU")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/ on the import path, as its scripts see it; its throughput module."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import throughput

    return throughput


def test_the_floor_and_the_goal_as_a_gpu_run_reports_them(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU, throughput.py sets each method against the FLOP floor, and gpu.py judges
    the goal; here a stand-in rate plays the GPU's on a tiny CPU run."""
    import gpu

    rate = 1e9  # FLOP/s
    monkeypatch.setattr(bench, "floor_rate", lambda device: rate)
    args = argparse.Namespace(trials=4, slow_trials=2, epochs=1, seed=0, bf16=False, compiled=False)
    kept: list[dict[str, Any]] = []
    record = bench.run("digits", args, torch.device("cpu"), lambda r: kept.append(dict(r)))
    assert [list(r["methods"]) for r in kept][-1] == list(record["methods"])
    assert len(kept) == 3  # after each method: a run stopped early keeps the finished ones
    assert record["matmul_tflops"] == rate / 1e12 and record["floor_s"] > 0
    fused = record["methods"]["(c) fused"]
    assert fused["floor_ratio"] == pytest.approx(fused["seconds"] / record["floor_s"])
    baseline = record["methods"]["(a) baseline"]
    assert baseline["trials_run"] == 2 and baseline["floor_ratio"] > 0

    text = bench.render(record)
    assert "| x the floor |" in text and "Floor: " in text and "fewer trials" in text

    goal = gpu.goal_check({"digits": record}, judged=True)
    assert goal["fused_vs_baseline"] == pytest.approx(
        fused["trials_per_hour"] / baseline["trials_per_hour"]
    )
    assert goal["best_fused"] == "(c) fused"
    assert goal["best_fused_floor_ratio"] == pytest.approx(fused["floor_ratio"])
    assert goal["floor_met"] is (fused["floor_ratio"] <= 10)
    assert goal["fused_vs_baseline_met"] is (goal["fused_vs_baseline"] >= 20)
    assert "| yes |" in gpu.goal_table(goal) or "| **no** |" in gpu.goal_table(goal)


def test_the_goal_is_judged_on_the_fastest_fused_method(bench: ModuleType) -> None:
    """A worker runs whichever fused step is fastest, so the goal judges that one."""
    import gpu

    def method(trials_per_hour: float, floor_ratio: float) -> dict[str, float]:
        return {"trials_per_hour": trials_per_hour, "floor_ratio": floor_ratio}

    methods = {
        "(a) baseline": method(358, 1830),
        "(c) fused": method(3702, 177),
        "(d) fused, bf16": method(3468, 189),
        "(e) fused, compiled": method(8783, 74.5),
    }
    goal = gpu.goal_check({"mnist-sized": {"methods": methods}}, judged=True)
    assert goal["best_fused"] == "(e) fused, compiled"
    assert goal["fused_vs_baseline"] == pytest.approx(8783 / 358)
    assert goal["fused_vs_baseline_met"] is True and goal["floor_met"] is False
    assert "| (e) fused, compiled / (a) baseline, trials per hour | 24.5x |" in gpu.goal_table(goal)


PYTEST_OUTPUT = """\
collecting ... collected 6 items / 1 error
tests/test_a.py::test_ok PASSED                                          [ 16%]
tests/test_a.py::test_bad FAILED                                         [ 33%]
tests/test_a.py::test_skip SKIPPED (needs a CUDA device)                 [ 50%]
tests/test_a.py::test_teardown PASSED                                    [ 66%]
tests/test_a.py::test_teardown ERROR                                     [ 66%]
tests/test_a.py::test_param[fp32] PASSED                                 [ 83%]
=========================== short test summary info ============================
SKIPPED [1] tests/test_a.py:4: needs a CUDA device
ERROR tests/test_b.py
ERROR tests/test_a.py::test_teardown - RuntimeError: teardown
FAILED tests/test_a.py::test_bad - assert 1 == 2
"""


def test_the_cuda_tests_are_counted_from_pytests_lines(bench: ModuleType) -> None:
    """As they come, so that a run stopped midway keeps the tests it finished; a module
    that fails to import and a teardown's error count as failures."""
    import gpu

    assert gpu.outcomes_of(PYTEST_OUTPUT) == {
        "passed": 2,
        "failed": 3,
        "skipped": 1,
        "failures": [
            "tests/test_a.py::test_bad",
            "tests/test_a.py::test_teardown",
            "tests/test_b.py",
        ],
    }
    assert gpu.outcomes_of(PYTEST_OUTPUT.split("[ 66%]")[0])["passed"] == 2  # cut short
