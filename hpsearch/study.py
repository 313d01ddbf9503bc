"""Studies and trials on a database: create or resume a study, claim a trial within the
budget, run it, and rank the results. The CLI and the workers share these functions."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from hpsearch.data import TensorData
from hpsearch.search import make_pruner, make_sampler, suggest_params
from hpsearch.service import RUNNABLE_STATES, StudyState, mark_running
from hpsearch.spec import StudySpec
from hpsearch.train import EpochRecord, TrainResult, TrialConfig, train
from storage import claim_study, optuna_storage

BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def open_study(state: StudyState, url: str, stream: int = 0) -> optuna.Study:
    """The study with its spec's sampler and pruner, as a worker uses it."""
    return optuna.load_study(
        study_name=state.name,
        storage=optuna_storage(url),
        sampler=make_sampler(state.spec, stream),
        pruner=make_pruner(state.spec),
    )


def budget_used(study: optuna.Study) -> int:
    """Trials that count against n_trials: finished ones and those running now."""
    return len(study.get_trials(deepcopy=False, states=BUDGET_STATES))


def claim_trial(study: optuna.Study, state: StudyState, url: str) -> optuna.Trial | None:
    """A new trial with its params chosen, or None when the study is not runnable (paused,
    cancelled, ...) or its budget is spent.

    Counting and creating happen under the study's claim lock, and the params are stored
    before the lock is released, so a parallel sampler sees them (constant liar).
    """
    with claim_study(url, state.id) as record:
        if record.state not in RUNNABLE_STATES or budget_used(study) >= record.n_trials:
            return None
        trial = study.ask()
        suggest_params(trial, state.spec)
        first = record.state == "queued"
    if first:
        mark_running(url, state.id)
    return trial


def objective(trial: optuna.Trial, spec: StudySpec, data: TensorData) -> float:
    """Train the trial's network and return its objective; usable with `study.optimize`.

    Reports every epoch and raises `optuna.TrialPruned` when the pruner says so; the
    results are recorded as user attributes either way.
    """
    config = TrialConfig.from_spec(spec, suggest_params(trial, spec))

    def report(record: EpochRecord) -> bool:
        trial.report(record.value, record.epoch)
        return trial.should_prune()

    result = train(config, data, on_epoch=report)
    _record(trial, result, data)
    if result.pruned:
        raise optuna.TrialPruned(f"pruned at epoch {result.epochs_run}")
    return result.value


def run_trial(
    study: optuna.Study, trial: optuna.Trial, spec: StudySpec, data: TensorData
) -> TrialState:
    """Run a claimed trial and tell the study how it ended.

    An interrupt fails the trial (failed trials use no budget, so a later run replaces it)
    and is raised again; any other error fails the trial with the message recorded.
    """
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("device", str(data.device))
    try:
        value = objective(trial, spec, data)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # a failed trial must not take the worker down
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    study.tell(trial, value)
    return TrialState.COMPLETE


def _record(trial: optuna.Trial, result: TrainResult, data: TensorData) -> None:
    for name, value in (result.val_metrics | result.test_metrics).items():
        trial.set_user_attr(name, value)
    trial.set_user_attr("epochs", result.epochs_run)
    trial.set_user_attr("best_epoch", result.best_epoch)
    trial.set_user_attr("seconds", round(result.seconds, 3))
    trial.set_user_attr("diagnosis", _diagnosis(result))
    # Compact: one row [epoch, train_loss, val_loss, value, lr] per epoch.
    trial.set_user_attr("history", [list(row.values()) for row in result.history_rows()])


def _diagnosis(result: TrainResult) -> str:
    if result.diverged:
        return "diverged"
    if result.pruned:
        return "pruned"
    if result.stopped_early:
        return "early_stopped"
    return "ok"


@dataclass(frozen=True)
class LeaderboardRow:
    rank: int
    number: int
    value: float
    params: dict[str, Any]
    state: str
    epochs: int | None
    seconds: float | None
    diagnosis: str | None
    metrics: dict[str, float]


def leaderboard(study: optuna.Study, top: int = 10) -> list[LeaderboardRow]:
    """The best completed trials, best first."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    return [
        LeaderboardRow(
            rank=rank,
            number=t.number,
            value=t.value,
            params=dict(t.params),
            state=t.state.name.lower(),
            epochs=t.user_attrs.get("epochs"),
            seconds=t.user_attrs.get("seconds"),
            diagnosis=t.user_attrs.get("diagnosis"),
            metrics={k: v for k, v in t.user_attrs.items() if k.startswith(("val_", "test_"))},
        )
        for rank, t in enumerate(trials[:top], start=1)
    ]
