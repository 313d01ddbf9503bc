"""bench/lcbench.py: the LCBench surrogate read as YAHPO Gym encodes it, the worker's pruning
deciding as Optuna's pruners do, and the --quick run's summary holding real numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.search.space import make_pruner, make_sampler, suggest_params
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lcbench() -> ModuleType:
    """bench/ on the import path, as its scripts see it; the lcbench module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "bench"))
        import lcbench

        yield lcbench


@pytest.fixture(scope="module")
def surrogate(lcbench: ModuleType) -> Any:
    return lcbench.Surrogate()


GOOD = {
    "batch_size": 64,
    "learning_rate": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "n_layers": 3,
    "hidden_units": 256,
    "dropout": 0.1,
}


def test_the_surrogate_reads_a_learning_curve_per_task(surrogate: Any) -> None:
    """With YAHPO's input order and natural scales, a sensible configuration learns: its
    val_accuracy (percent) rises from epoch 1 to 52, stays within 0..100, and differs
    from task to task; a diverging learning rate does worse at the end."""
    curves = {task: surrogate.curve(task, GOOD) for task in (3945, 7593, 167168)}
    for curve in curves.values():
        assert curve.shape == (52,)
        assert np.all((curve >= 0) & (curve <= 100))
        assert curve[-1] > curve[0] + 5
    finals = [curve[-1] for curve in curves.values()]
    assert max(finals) - min(finals) > 5
    slow = surrogate.curve(3945, {**GOOD, "learning_rate": 0.1, "batch_size": 512})
    assert slow[-1] < curves[3945][-1]


@pytest.mark.parametrize("method", ["random:median", "tpe:hyperband"])
def test_the_workers_pruning_decides_as_optunas_pruner(
    lcbench: ModuleType, surrogate: Any, method: str
) -> None:
    """A search with `LocalPruning` (the worker's decisions, no database) prunes each trial
    at the epoch where the spec's Optuna pruner, asked through `trial.should_prune`, would."""
    n = 40
    ours = lcbench.search(surrogate, 7593, method, 1, n).epochs[:n]  # it may run on
    spec = lcbench.make_spec(method, 1, n)
    study = optuna.create_study(
        study_name=spec.name,
        direction="maximize",
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
    )
    theirs = []
    for _ in range(n):
        trial = study.ask()
        curve = surrogate.curve(7593, suggest_params(trial, spec)) / 100
        for epoch, value in enumerate(curve.tolist(), start=1):
            trial.report(value, epoch)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, float(curve[-1]))
        theirs.append(epoch)
    assert ours == theirs
    assert sum(ours) < n * 52  # it did prune


def test_the_quick_run_summarizes_every_method(lcbench: ModuleType, tmp_path: Path) -> None:
    """--quick: finite regrets near [0, 1.5], random search no worse with more trials,
    pruners training fewer epochs than none, every method in the JSON."""
    path = tmp_path / "lcbench.json"
    summary = lcbench.main(["--quick", "--jobs", "2", "--json", str(path)])
    assert json.loads(path.read_text()) == summary
    methods = summary["methods"]
    assert list(methods) == list(lcbench.QUICK_METHODS)
    assert summary["checkpoints"] == [10, 30]
    for result in methods.values():
        assert result["runs"] == len(lcbench.QUICK["tasks"]) * lcbench.QUICK["seeds"]
        for regret in result["regret"].values():
            assert math.isfinite(regret) and -0.05 <= regret <= 1.5
    random = methods["random:none"]["regret"]
    assert random["30"] <= random["10"]
    full = methods["random:none"]["epochs"]
    assert full == 30 * 52
    for pruned in ("gp:median", "random:hyperband"):
        assert methods[pruned]["epochs"] < full
    for sampler in ("bayes", "gp"):
        assert methods[f"{sampler}:none"]["regret"]["30"] < random["30"]
    goals = summary["goals"]
    assert len(goals) == 6 and all(g.endswith(("met", "**not met**")) for g in goals)
    assert goals[-3].startswith("bayes:none @ 30 no worse than random on ")
    assert goals[-2].startswith("gp:none @ 30 no worse than random on ")
    assert goals[-1].startswith("gp:median at 40% of the epochs: ")


def summary_at_30(lcbench: ModuleType, method: str, regret: float) -> Any:
    """A method's summary holding just a mean regret at 30 trials, the same on one task."""
    return lcbench.MethodSummary(
        method=method,
        runs=1,
        regret={30: regret},
        regret_se={30: 0.0},
        epochs=1560,
        epoch_share=1.0,
        seconds=0.1,
        regret_at_share=regret,
        regret_at_share_se=0.0,
        regret_by_task={1: {30: regret}},
        regret_curve=[],
        epochs_curve=[],
    )


def test_the_best_pair_is_judged_only_in_a_run_that_holds_the_default_sampler(
    lcbench: ModuleType,
) -> None:
    """A run of random search and tpe alone says nothing of the best of all methods."""
    run = {m: summary_at_30(lcbench, m, r) for m, r in [("random:none", 0.2), ("tpe:none", 0.1)]}
    assert lcbench.goal_lines(run, [10, 30]) == [
        "- tpe:none @ 30: 0.50x random's regret (goal ≤ 0.5x): met"
    ]
    default = f"{lcbench.DEFAULT_SAMPLER}:none"
    run[default] = summary_at_30(lcbench, default, 0.04)
    assert f"- best @ 30, {default}: 0.20x random's regret (goal ≤ 0.25x): met" in (
        lcbench.goal_lines(run, [10, 30])
    )


def test_regret_is_zero_at_the_reference_and_one_at_its_median(lcbench: ModuleType) -> None:
    reference = lcbench.Reference(best=0.9, median=0.5)
    result = lcbench.Search(0, "random:none", 0, [0.5, math.nan, 0.7, 0.9, 0.6], [52] * 5, 0.0)
    assert lcbench.regret_trace(result, reference).tolist() == pytest.approx(
        [1.0, 1.0, 0.5, 0.0, 0.0]
    )


def test_a_pruned_search_runs_on_until_it_has_trained_its_share_of_the_epochs(
    lcbench: ModuleType, surrogate: Any
) -> None:
    n = 20
    least = lcbench.least_epochs(n)
    assert least == math.ceil(lcbench.EPOCH_SHARE * n * 52)
    pruned = lcbench.search(surrogate, 3945, "random:hyperband", 0, n)
    assert len(pruned.values) > n  # hyperband's first rungs are short
    assert sum(pruned.epochs) >= least > sum(pruned.epochs[:-1])
    full = lcbench.search(surrogate, 3945, "random:none", 0, n)
    assert len(full.values) == n and sum(full.epochs) == n * 52


def test_regret_at_epochs_is_the_regret_once_the_search_had_trained_them(
    lcbench: ModuleType,
) -> None:
    reference = lcbench.Reference(best=0.9, median=0.5)
    result = lcbench.Search(0, "random:median", 0, [0.5, math.nan, 0.7, 0.9], [52, 3, 10, 52], 0.0)
    trace = lcbench.regret_trace(result, reference)
    assert lcbench.regret_at_epochs(result, trace, 52) == pytest.approx(1.0)
    assert lcbench.regret_at_epochs(result, trace, 60) == pytest.approx(0.5)  # at 65 epochs
    assert lcbench.regret_at_epochs(result, trace, 66) == pytest.approx(0.0)
    assert lcbench.regret_at_epochs(result, trace, 1000) == pytest.approx(0.0)  # its last


def test_the_final_check_runs_on_the_22_held_out_tasks(lcbench: ModuleType) -> None:
    config, _ = lcbench.parse_args(["--final", "--seeds", "2", "--budget", "10"])
    assert len(config.tasks) == 22
    assert not set(config.tasks) & set(lcbench.DEV_TASKS)
    assert set(config.tasks) <= {int(task) for task in lcbench.Surrogate().codes if task.isdigit()}
    assert config.methods == lcbench.FINAL_METHODS
    assert "development task" not in lcbench.reduced_line(config)
    text = lcbench.section(config, "TABLE", "GOALS", "TIMING", 1.0, "cmd")
    assert text.startswith(lcbench.FINAL_SECTION + "\n")
    assert "held out" in text and "lcbench-final.png" in text


def test_a_named_run_writes_its_own_section_and_plot(lcbench: ModuleType) -> None:
    config, _ = lcbench.parse_args(["--section", "Every sampler, 30 trials", "--budget", "30"])
    assert config.title == lcbench.SECTION + ": Every sampler, 30 trials"
    assert config.plot_name == "lcbench-every-sampler-30-trials.png"
    text = lcbench.section(config, "TABLE", "GOALS", "TIMING", 1.0, "cmd")
    assert text.startswith(config.title + "\n")
    assert "bench/plots/lcbench-every-sampler-30-trials.png" in text
    main, _ = lcbench.parse_args([])
    assert (main.title, main.plot_name) == (lcbench.SECTION, "lcbench.png")


def test_a_named_section_is_not_the_final_check(
    lcbench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["--final", "--section", "gp"], ["--section", "the held-out tasks"]):
        with pytest.raises(SystemExit):
            lcbench.parse_args(argv)
        assert "--final writes the held-out tasks' section" in capsys.readouterr().err
    for name in ("", " - ", "two\nlines"):
        with pytest.raises(SystemExit):
            lcbench.parse_args(["--section", name])
        assert "--section needs a one-line name" in capsys.readouterr().err
