"""A worker's pruning decisions and reports: the same decisions as Optuna's pruners, from a
view of the study kept up to date incrementally, and reports written in few transactions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

import hpsearch.runtime.trials
from hpsearch.runtime.trials import TrialContext, TrialWriter, as_asked, write_waiting
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.search.pruning import (
    CompletedCurves,
    Halving,
    RungValues,
    StudyPruning,
    current_rung,
    halving_prunes,
    percentile_prunes,
)
from hpsearch.search.space import make_pruner
from hpsearch.service.studies import submit_study
from hpsearch.spec import PrunerSpec, parse_spec
from hpsearch.storage import Store, optuna_storage, upgrade
from hpsearch.training.train import EpochRecord

PRUNERS = [
    PrunerSpec(name="median", n_warmup_steps=2),
    PrunerSpec(name="median", n_startup_trials=0, n_warmup_steps=0),
    PrunerSpec(name="percentile", percentile=25.0, n_startup_trials=3, n_warmup_steps=4),
    PrunerSpec(name="percentile", percentile=80.0, n_startup_trials=0, n_warmup_steps=1),
]


def random_curve(rng: np.random.Generator, length: int) -> dict[int, float]:
    """A noisy curve over epochs 1..length, now and then NaN or infinite as real ones are."""
    curve = {epoch: float(rng.normal(epoch / 10, 0.3)) for epoch in range(1, length + 1)}
    for epoch in curve:
        if rng.random() < 0.03:
            curve[epoch] = float(rng.choice([math.nan, math.inf, -math.inf]))
    return curve


@pytest.mark.parametrize("pruner", PRUNERS, ids=lambda p: f"{p.name}-{p.percentile}")
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("n_completed", [0, 2, 9, 40])
def test_decisions_match_optunas_pruner(
    pruner: PrunerSpec, direction: str, n_completed: int
) -> None:
    rng = np.random.default_rng(n_completed)
    study = optuna.create_study(direction=direction)
    completed = CompletedCurves()
    for _ in range(n_completed):
        curve = random_curve(rng, int(rng.integers(1, 15)))
        study.add_trial(
            optuna.trial.create_trial(
                value=0.0, intermediate_values=curve, params={}, distributions={}
            )
        )
        completed.add(curve)
    optunas = make_pruner(parse_spec(spec_dict("s", pruner=pruner.model_dump())))
    decisions = []
    for _ in range(300):
        curve = random_curve(rng, int(rng.integers(0, 18)))
        running = optuna.trial.create_trial(
            state=TrialState.RUNNING, intermediate_values=curve, params={}, distributions={}
        )
        ours = percentile_prunes(pruner, direction == "maximize", completed, curve)
        assert ours == optunas.prune(study, running), curve
        decisions.append(ours)
    if n_completed >= pruner.n_startup_trials and n_completed > 0:
        assert 0 < sum(decisions) < len(decisions)  # the comparison really decides both ways


def test_percentiles_are_numpys_nanpercentile() -> None:
    rng = np.random.default_rng(7)
    completed = CompletedCurves()
    values = [float(v) for v in rng.normal(size=101)] + [math.nan, math.nan]
    for value in values:
        completed.add({3: value})
    for q in (0.0, 12.5, 25.0, 50.0, 75.0, 99.0, 100.0):
        assert completed.percentile(3, q) == pytest.approx(np.nanpercentile(values, q), rel=1e-12)
    assert math.isnan(completed.percentile(4, 50.0))


def spec_dict(name: str, **sections: Any) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": {"source": "builtin", "name": "iris"},
        "model": {"hidden": [8]},
        "search_space": {"learning_rate": {"low": 1e-3, "high": 1e-1, "log": True}},
        "training": {"max_epochs": 20, "early_stopping_patience": None},
        "budget": {"n_trials": 10},
        **sections,
    }


def test_a_workers_view_catches_up_with_trials_finished_elsewhere(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/view.db"
    upgrade(url)
    study = optuna.create_study(storage=optuna_storage(url), direction="maximize")
    pruner = {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0}
    store = Store.open(url)
    pruning = StudyPruning(store, study, parse_spec(spec_dict("view", pruner=pruner)))
    seen_running = study.ask()
    seen_running.report(0.5, 1)
    study.tell(study.ask(), 0.9)  # complete before the view's first look
    pruned = study.ask()
    pruned.report(0.2, 1)
    study.tell(pruned, state=TrialState.PRUNED)
    mine = study.ask()

    mine.report(0.1, 1)
    assert pruning.decide(as_asked(mine)).prune is False  # no complete trial reported epoch 1
    assert pruning.completed.count == 1
    study.tell(seen_running, 0.6)  # seen running at the first look, complete now
    later = study.ask()
    later.report(0.7, 1)
    study.tell(later, 0.7)
    pruning.completed_here(later._trial_id, {1: 0.7})  # as if this worker had told it
    next_trial = study.ask()
    next_trial.report(0.55, 1)
    assert pruning.decide(as_asked(next_trial)).prune is True  # below the median 0.6 of 0.5, 0.7
    assert pruning.completed.count == 3  # 0.9, seen_running and later, each once
    assert pruning.completed.percentile(1, 50.0) == pytest.approx(0.6)


HALVINGS = [
    {"name": "sha"},
    {"name": "sha", "min_resource": 2, "reduction_factor": 2},
    {"name": "hyperband"},
    {"name": "hyperband", "min_resource": 2, "reduction_factor": 3},
]


@pytest.mark.parametrize("pruner", HALVINGS, ids=lambda p: "-".join(map(str, p.values())))
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_halving_decisions_match_optunas_pruner(pruner: dict[str, Any], direction: str) -> None:
    """Trials interleaved four at a time, as on several workers: every epoch's decision and
    every rung recorded equal those of Optuna's pruner, which runs on the same trials."""
    spec = parse_spec(spec_dict("halving", pruner=pruner))  # 20 epochs
    study = optuna.create_study(study_name=spec.name, direction=direction, pruner=make_pruner(spec))
    halving = Halving.from_spec(spec)
    assert halving is not None
    rungs, rng = RungValues(), np.random.default_rng(len(pruner))
    running: list[tuple[optuna.Trial, dict[int, float], dict[int, float], dict[str, Any]]] = []
    started = pruned = 0
    while started < 60 or running:
        while started < 60 and len(running) < 4:
            running.append((study.ask(), random_curve(rng, 20), {}, {}))
            started += 1
        trial, curve, reported, rung_attrs = running[int(rng.integers(len(running)))]
        step = len(reported) + 1
        reported[step] = curve[step]
        trial.report(curve[step], step)
        bracket = halving.bracket(study.study_name, trial.number)
        ours, reached = halving_prunes(
            halving, bracket, current_rung(rung_attrs), direction == "maximize", rungs, reported
        )
        for rung, value in reached.items():
            rungs.add(trial._trial_id, bracket, rung, value)
            rung_attrs[f"completed_rung_{rung}"] = value
        assert ours == trial.should_prune(), (trial.number, step)
        assert study._storage.get_trial_system_attrs(trial._trial_id) == rung_attrs
        if ours:
            study.tell(trial, state=TrialState.PRUNED)
            pruned += 1
        elif step == 20:
            study.tell(trial, 0.0)
        if ours or step == 20:
            running = [r for r in running if r[0] is not trial]
    assert 0 < pruned < 60  # the comparison really decides both ways


def test_hyperband_brackets_are_optunas() -> None:
    for max_epochs, pruner in [(20, {"name": "hyperband"}), (81, HALVINGS[3]), (3, HALVINGS[3])]:
        spec = parse_spec(
            spec_dict("brackets", pruner=pruner) | {"training": {"max_epochs": max_epochs}}
        )
        optunas = make_pruner(spec)
        study = optuna.create_study(study_name=spec.name, pruner=optunas)
        optunas._try_initialization(study)
        halving = Halving.from_spec(spec)
        assert halving is not None and halving.budgets == tuple(optunas._trial_allocation_budgets)
        for number in range(200):
            trial = optuna.trial.create_trial(state=TrialState.RUNNING, params={}, distributions={})
            trial.number = number
            assert halving.bracket(spec.name, number) == optunas._get_bracket_id(study, trial)
    past_the_end = {"name": "hyperband", "min_resource": 30}  # a first rung past 20 epochs
    assert Halving.from_spec(parse_spec(spec_dict("none", pruner=past_the_end))) is None


def test_a_workers_halving_view_reads_rungs_of_others_and_records_its_own(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/rungs.db"
    upgrade(url)
    spec = parse_spec(spec_dict("rungs", pruner={"name": "sha"}))  # rungs at epochs 1, 3, 9
    storage = optuna_storage(url)
    study = optuna.create_study(
        study_name="rungs", storage=storage, direction="maximize", pruner=make_pruner(spec)
    )
    store = Store.open(url)
    context = TrialContext(store, 0, StudyPruning(store, study, spec))
    elsewhere = study.ask()  # trials of another worker, pruned by Optuna's own pruner
    elsewhere.report(0.5, 1)
    assert elsewhere.should_prune() is False
    done = study.ask()
    done.report(0.6, 1)
    assert done.should_prune() is False
    study.tell(done, 0.6)

    mine = TrialWriter(study.ask(), context)
    mine.report(0.55, 1)
    assert mine.should_prune() is True  # rung 0: only the best 1 of 3 goes on, 0.6
    assert context.pruning.rungs.values(0, 0) == [0.5, 0.55, 0.6]
    assert storage.get_trial_system_attrs(mine.trial._trial_id) == {}  # with the next write
    write_waiting(context, [mine])
    assert storage.get_trial_system_attrs(mine.trial._trial_id) == {"completed_rung_0": 0.55}

    elsewhere.report(0.9, 3)  # a trial seen running reaches rung 1
    assert elsewhere.should_prune() is False
    second = TrialWriter(study.ask(), context)
    second.report(0.7, 1)
    assert second.should_prune() is False  # the best at rung 0
    second.report(0.8, 3)
    assert second.should_prune() is True  # rung 1: 0.9 was recorded there, seen at catch-up
    assert as_asked(second.trial).system_attrs == {"completed_rung_0": 0.7, "completed_rung_1": 0.8}


@pytest.mark.integration
def test_a_worker_prunes_with_hyperband_and_records_the_rungs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hyperband.db"
    spec = parse_spec(
        spec_dict("hb", pruner={"name": "hyperband"}, budget={"n_trials": 12})  # 20 epochs
    )
    store = Store.open(url)
    submit_study(store, spec)
    assert Worker(WorkerOptions(store, studies=("hb",), max_trials=12)).run() == 0
    trials = optuna.load_study(study_name="hb", storage=optuna_storage(url)).trials
    halving = Halving.from_spec(spec)
    assert halving is not None
    states = [t.state for t in trials]
    assert states.count(TrialState.PRUNED) > 0 and states.count(TrialState.COMPLETE) > 0
    for trial in trials:
        bracket = halving.bracket("hb", trial.number)
        rungs = current_rung(trial.system_attrs)
        assert rungs > 0 or trial.last_step < halving.promotion_step(bracket, 0)
        for rung in range(rungs):  # each recorded at the epoch it was reached
            step = halving.promotion_step(bracket, rung)
            assert trial.system_attrs[f"completed_rung_{rung}"] == trial.intermediate_values[step]


def intermediate_rows(url: str) -> list[tuple[int, int, float]]:
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT trial_id, step, intermediate_value FROM trial_intermediate_values "
            "ORDER BY trial_id, step"
        ).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def test_reports_wait_for_the_next_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/writes.db"
    upgrade(url)
    study = optuna.create_study(storage=optuna_storage(url), direction="maximize")
    trial = study.ask()
    spec = parse_spec(spec_dict("writes", pruner={"name": "median"}))
    store = Store.open(url)
    context = TrialContext(store, 0, StudyPruning(store, study, spec))
    writer = TrialWriter(trial, context)
    for epoch in (1, 2, 3):
        writer.report(0.1 * epoch, epoch)
    writer.report(0.9, 3)  # the first value of an epoch stays, as with Optuna
    assert intermediate_rows(url) == []
    assert writer.curve == {1: 0.1, 2: 0.2, 3: pytest.approx(0.3)}  # what the pruner reads
    writer.set_attrs({"worker": "w"})
    assert write_waiting(context, [writer]) == set()
    assert [row[1] for row in intermediate_rows(url)] == [1, 2, 3]
    assert study._storage.get_trial_user_attrs(trial._trial_id) == {"worker": "w"}
    writer.report(0.4, 4)
    assert write_waiting(context, [writer]) == set()  # only what waited since
    assert [row[1] for row in intermediate_rows(url)] == [1, 2, 3, 4]


def one_trial_through_a_worker(url: str, max_epochs: int) -> tuple[int, optuna.trial.FrozenTrial]:
    """The commits of a worker that runs one trial of `max_epochs` epochs, and the trial."""
    name = f"epochs-{max_epochs}"
    training = {"max_epochs": max_epochs, "early_stopping_patience": None}
    store = Store.open(url)
    submit_study(store, parse_spec(spec_dict(name, training=training, budget={"n_trials": 1})))
    commits: list[object] = []

    def count(connection: object) -> None:
        commits.append(connection)

    sqlalchemy.event.listen(sqlalchemy.Engine, "commit", count)
    try:
        assert Worker(WorkerOptions(store, studies=(name,), max_trials=1)).run() == 0
    finally:
        sqlalchemy.event.remove(sqlalchemy.Engine, "commit", count)
    (trial,) = optuna.load_study(study_name=name, storage=optuna_storage(url)).trials
    return len(commits), trial


def test_a_workers_trial_reports_every_epoch_without_a_commit_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writes on a timer (WRITE_EVERY_S, heartbeats) add commits by wall time, which a loaded
    # machine stretches; with the timers out of reach, only the epochs could add any.
    monkeypatch.setattr(hpsearch.runtime.trials, "WRITE_EVERY_S", 3600.0)
    monkeypatch.setenv("HPSEARCH_HEARTBEAT_S", "3600")
    url = f"sqlite:///{tmp_path}/commits.db"
    short_commits, short = one_trial_through_a_worker(url, 10)
    long_commits, long = one_trial_through_a_worker(url, 40)
    for trial, epochs in [(short, 10), (long, 40)]:
        assert trial.state == TrialState.COMPLETE
        history = trial.user_attrs["history"]
        assert len(history) == epochs
        assert trial.intermediate_values == {row[0]: pytest.approx(row[3]) for row in history}
    # 30 more epochs, all reported and stored; Optuna's `report` would commit 30 more times.
    assert long_commits - short_commits < 5, (short_commits, long_commits)


def failing_training(*_: Any, on_epoch: Any, **__: Any) -> None:
    """A training that reports three epochs (within one write interval) and then raises."""
    for epoch in (1, 2, 3):
        on_epoch(EpochRecord(epoch, 1.0, 1.0, 0.1 * epoch, 0.01))
    raise RuntimeError("boom")


def failing_pack(configs: list[Any], _data: Any, report: Any, *_: Any, **__: Any) -> None:
    for epoch in (1, 2, 3):
        for i in range(len(configs)):
            report(i, EpochRecord(epoch, 1.0, 1.0, 0.1 * epoch, 0.01))
    raise RuntimeError("boom")


@pytest.mark.parametrize("pack", [None, 2])
def test_a_failed_trial_keeps_the_epochs_it_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pack: int | None
) -> None:
    url = f"sqlite:///{tmp_path}/failed.db"
    monkeypatch.setattr(hpsearch.runtime.trials, "train", failing_training)
    monkeypatch.setattr(hpsearch.runtime.trials, "train_pack", failing_pack)
    spec = spec_dict("failing", budget={"n_trials": 2})
    store = Store.open(url)
    submit_study(store, parse_spec(spec))
    options = WorkerOptions(store, studies=("failing",), max_trials=2, pack=pack, idle_exit_s=0)
    Worker(options).run()
    trials = optuna.load_study(study_name="failing", storage=optuna_storage(url)).trials
    assert len(trials) == 2
    for trial in trials:
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs["error"] == "RuntimeError: boom"
        assert trial.intermediate_values == {1: 0.1, 2: 0.2, 3: pytest.approx(0.3)}
