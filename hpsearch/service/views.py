"""What the service answers: one set of pydantic models for the REST responses, the CLI's
tables and its `--json` output, so the API and `--db` mode can never drift apart."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field

from hpsearch.spec import StudySpec

StudyStateName = Literal["queued", "running", "paused", "completed", "cancelled", "failed"]
# Optuna's FAIL is three states here: "failed" (the training raised), "handed_back" (a
# stopping worker checkpointed it for a retry) and "lost" (its worker died; retried).
TrialStateName = Literal[
    "running", "waiting", "complete", "pruned", "failed", "handed_back", "lost"
]


class Progress(BaseModel):
    """Trials by state against the budget (finished = complete + pruned). Optuna records
    handed-back and lost trials as failed too, but only a failed trial's training raised:
    the other two were stopped from outside and queued again, so they say nothing about
    their hyperparameters."""

    budget: int
    complete: int = 0
    pruned: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = Field(0, description="trials whose training failed with an error")
    handed_back: int = Field(
        0, description="trials a stopping worker checkpointed and handed back for a retry"
    )
    lost: int = Field(
        0, description="trials whose worker died: failed as stale, retried up to a limit"
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def finished(self) -> int:
        return self.complete + self.pruned


class StudySummary(BaseModel):
    id: int
    name: str
    state: StudyStateName
    reason: str | None = Field(None, description="why a failed study failed")
    metric: str
    direction: Literal["minimize", "maximize"]
    sampler: str
    pruner: str
    progress: Progress
    best_value: float | None
    created_at: datetime


class TrialSummary(BaseModel):
    number: int
    state: TrialStateName
    value: float | None
    params: dict[str, Any]
    epochs: int | None = None
    seconds: float | None = None
    diagnosis: str | None = None
    metrics: dict[str, float] = Field(
        default_factory=dict, description="validation and test metrics of the best epoch"
    )
    started_at: datetime | None = None
    completed_at: datetime | None = None


class LeaderboardEntry(TrialSummary):
    rank: int


class StudyDetail(StudySummary):
    spec: StudySpec
    best_trial: TrialSummary | None
    advice: list[str] = Field(
        default_factory=list,
        description="what the finished trials' diagnoses suggest changing, with counts",
    )


class ResumedStudy(StudySummary):
    freed_trials: int = Field(
        description="lost trials (their worker certainly dead, or silent for two heartbeats) "
        "failed now; their retries resume from their checkpoints"
    )
    running_trials: list[int] = Field(
        default_factory=list,
        description="numbers of the trials left running: their workers beat recently",
    )
    lost_after_s: float | None = Field(
        default=None,
        description="if the workers of the trials left running are dead, seconds until those "
        "trials count as lost and any worker resumes them",
    )


class CurvePoint(BaseModel):
    """One epoch of a trial's learning curve."""

    epoch: int
    value: float | None = Field(description="the objective reported for this epoch")
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    grad_norms: list[float] | None = Field(
        None, description="each layer's weight gradient norm, first layer first"
    )


class TrialDetail(TrialSummary):
    curve: list[CurvePoint]
    error: str | None = None
    worker: str | None = None
    device: str | None = None
    resumed_from_epoch: int | None = None
    has_model: bool = Field(description="whether the trained weights are kept (top trials)")


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class WorkerView(BaseModel):
    id: int
    host: str
    pid: int
    device: str
    state: Literal["idle", "busy", "stopped"]
    alive: bool = Field(description="its heartbeat is within the grace period")
    started_at: datetime
    heartbeat_at: datetime
    study: str | None
    trial_number: int | None


class DatasetView(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read straight off the table's row

    id: int
    name: str
    format: Literal["csv", "parquet", "npz"]
    target: str | list[str]
    task: str
    n_rows: int
    columns: list[str]
    size_bytes: int
    sha256: str
    created_at: datetime


class TokenView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ParamImportance(BaseModel):
    param: str
    importance: float = Field(
        description="its share of the importance of the searched hyperparameters (the shares "
        "sum to 1)"
    )


class ParamImportances(BaseModel):
    """Which hyperparameters mattered: how much each one's values among the best trials
    differ from its values among all the trials evaluated (Optuna's PED-ANOVA)."""

    study: str
    metric: str
    evaluator: str = Field(description="Optuna's importance evaluator")
    top_quantile: float | None = Field(
        None,
        description="the share of the evaluated trials that count as the best (PED-ANOVA's "
        "target quantile): a tenth, or the best 10 trials where a tenth holds fewer, at most "
        "half",
    )
    trials_complete: int = Field(
        description="complete trials of the study; pruned and failed trials do not count"
    )
    trials_used: int = Field(
        description="the complete trials evaluated: all of them, or an evenly spaced sample "
        "(by trial number) of a study with more than the cap"
    )
    min_trials: int = Field(description="the complete trials an answer needs")
    importances: list[ParamImportance] = Field(
        default_factory=list,
        description="most important first; empty when `reason` says why there is no answer",
    )
    constant: list[str] = Field(
        default_factory=list,
        description="searched keys with a single possible value: they cannot matter, and are "
        "left out of `importances`",
    )
    reason: str | None = Field(
        None, description="why there are no importances: too few trials, nothing varies"
    )
