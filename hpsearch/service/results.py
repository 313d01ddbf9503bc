"""What a study has found so far: listings, leaderboards, one trial with its learning curve,
the kept weights, and the workers. The REST routes and the CLI both read through these.

Each function is a fixed handful of SQL queries (`storage.queries`), so a study of 10,000
trials answers as fast as one of 10; only a study's detail reads every finished trial, for
the advice it counts from them.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Any

from sqlalchemy.orm import Session

from hpsearch.service.diagnosis import TrialFacts, advise
from hpsearch.service.recovery import Recovery
from hpsearch.service.studies import HANDED_BACK_ERROR, StudyNotFound, effective_budget, find_study
from hpsearch.service.views import (
    CurvePoint,
    LeaderboardEntry,
    Page,
    Progress,
    ResumedStudy,
    StudyDetail,
    StudySummary,
    TrialDetail,
    TrialSummary,
    WorkerView,
)
from hpsearch.spec import StudySpec
from hpsearch.storage import StudyRecord, grace_period_s, records
from hpsearch.storage.queries import (
    TrialRow,
    best_values,
    fail_kind,
    finished_trials,
    intermediate_values,
    one_trial,
    ranked_trials,
    trial_counts,
    trial_page,
)
from hpsearch.storage.store import Store

# Columns of the compact per-epoch history a trial stores (hpsearch.runtime.trials._record).
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "value", "learning_rate", "grad_norms")


class TrialNotFound(StudyNotFound):
    """No trial of that number in the study, or no kept weights for it (HTTP 404)."""


def list_studies(store: Store, limit: int = 100, offset: int = 0) -> Page[StudySummary]:
    """The studies, newest first, each with its progress and best value."""
    with store.session() as session:
        total = records.count_studies(session)
        page = records.study_page(session, limit, offset)
        ids = [r.optuna_study_id for r in page if r.optuna_study_id is not None]
        counts, bests = trial_counts(session, ids, HANDED_BACK_ERROR), best_values(session, ids)
        items = [_summary(r, counts.get(r.optuna_study_id, {}), bests) for r in page]
    return Page[StudySummary](items=items, total=total, limit=limit, offset=offset)


def study_detail(store: Store, study: str | int) -> StudyDetail:
    """The study's spec, state, progress, best trial, and advice from its finished trials."""
    with store.session() as session:
        record = find_study(session, study)
        summary = _summary_of(session, record)
        spec = StudySpec.model_validate(record.spec)
        best = ranked_trials(session, _optuna_id(record), _maximize(spec), top=1)
        best_trial = _trial_summary(best[0]) if best else None
        finished = finished_trials(session, _optuna_id(record))
    # A handed-back or lost trial is retried: its retry is the evidence, counted once.
    evidence = [row for row in finished if _state_of(row) not in ("handed_back", "lost")]
    advice = advise([_facts(row) for row in evidence], spec)
    return StudyDetail(**summary.model_dump(), spec=spec, best_trial=best_trial, advice=advice)


def _facts(row: TrialRow) -> TrialFacts:
    return TrialFacts(row.params, row.value, _diagnosis_of(row), row.attrs.get("best_epoch"))


def _diagnosis_of(row: TrialRow) -> str | None:
    """The recorded diagnosis; a failed trial (an error, or a worker that died) crashed. A
    handed-back trial did not: its retry trains on from its checkpoint."""
    return row.attrs.get("diagnosis") or (
        "crashed" if _state_of(row) in ("failed", "lost") else None
    )


def _state_of(row: TrialRow) -> str:
    """The trial's state, with Optuna's FAIL told apart: failed, handed back, or lost."""
    if row.state != "failed":
        return row.state
    return fail_kind(row.attrs.get("error"), HANDED_BACK_ERROR)


def study_summary(store: Store, study: str | int) -> StudySummary:
    with store.session() as session:
        return _summary_of(session, find_study(session, study))


def resumed_study(store: Store, study: str | int, recovery: Recovery) -> ResumedStudy:
    """The study after `resume`, with what it freed and what it left running."""
    return ResumedStudy(
        **study_summary(store, study).model_dump(),
        freed_trials=recovery.freed,
        running_trials=[trial.number for trial in recovery.running],
        lost_after_s=recovery.lost_after_s,
    )


def leaderboard(store: Store, study: str | int, top: int = 10) -> list[LeaderboardEntry]:
    """The `top` complete trials, best first."""
    with store.session() as session:
        record = find_study(session, study)
        maximize = _maximize(StudySpec.model_validate(record.spec))
        rows = ranked_trials(session, _optuna_id(record), maximize, top)
    return [
        LeaderboardEntry(rank=rank, **_trial_summary(row).model_dump())
        for rank, row in enumerate(rows, start=1)
    ]


def list_trials(
    store: Store, study: str | int, state: str | None = None, limit: int = 50, offset: int = 0
) -> Page[TrialSummary]:
    """Trials by number, optionally of one state."""
    with store.session() as session:
        record = find_study(session, study)
        rows, total = trial_page(
            session, _optuna_id(record), state, limit, offset, HANDED_BACK_ERROR
        )
    items = [_trial_summary(row) for row in rows]
    return Page[TrialSummary](items=items, total=total, limit=limit, offset=offset)


def trial_detail(store: Store, study: str | int, number: int) -> TrialDetail:
    """One trial with its learning curve: the objective reported at every epoch, with the
    losses and learning rate the trainer recorded when it finished."""
    with store.session() as session:
        record = find_study(session, study)
        row = one_trial(session, _optuna_id(record), number)
        if row is None:
            raise TrialNotFound(f"study {record.name!r} has no trial {number}")
        reported = intermediate_values(session, row.trial_id)
        has_model = records.has_model(session, row.trial_id)
    attrs = row.attrs
    return TrialDetail(
        **_trial_summary(row).model_dump(),
        curve=_curve(reported, attrs.get("history") or []),
        error=attrs.get("error"),
        worker=attrs.get("worker"),
        device=attrs.get("device"),
        resumed_from_epoch=attrs.get("resumed_from_epoch"),
        has_model=has_model,
    )


def model_weights(store: Store, study: str | int, number: int) -> bytes:
    """The trained weights (a `torch.save`d state dict) of one of the study's best trials."""
    with store.session() as session:
        record = find_study(session, study)
        payload = records.model_payload(session, record.id, number)
        if payload is None:
            raise TrialNotFound(
                f"no weights kept for trial {number} of {record.name!r}: only finished trials "
                "among the study's best keep theirs"
            )
        return payload


def list_workers(store: Store) -> list[WorkerView]:
    """Workers that have not stopped, newest first; `alive` says whether each still beats."""
    with store.session() as session:
        now = records.database_now(session)  # the database's clock, as for trials
        now = now if now.tzinfo else now.replace(tzinfo=UTC)  # SQLite's is naive UTC
        rows = records.workers_not_stopped(session)
    grace = timedelta(seconds=grace_period_s())
    return [
        WorkerView(
            id=w.id,
            host=w.host,
            pid=w.pid,
            device=w.device,
            state=w.state,
            alive=now - w.heartbeat_at <= grace,
            started_at=w.started_at,
            heartbeat_at=w.heartbeat_at,
            study=name,
            trial_number=w.current_trial_number,
        )
        for w, name in rows
    ]


def _summary_of(session: Session, record: StudyRecord) -> StudySummary:
    ids = [_optuna_id(record)]
    counts = trial_counts(session, ids, HANDED_BACK_ERROR).get(ids[0], {})
    return _summary(record, counts, best_values(session, ids))


def _summary(
    record: StudyRecord, counts: dict[str, int], bests: dict[int, tuple[float, float]]
) -> StudySummary:
    spec = StudySpec.model_validate(record.spec)
    low_high = bests.get(record.optuna_study_id or -1)
    best = None if low_high is None else low_high[1 if _maximize(spec) else 0]
    return StudySummary(
        id=record.id,
        name=record.name,
        state=record.state,
        reason=record.reason,
        metric=spec.objective.metric,
        direction=spec.objective.direction,
        sampler=spec.sampler.name,
        pruner=spec.pruner.name,
        progress=Progress(budget=effective_budget(spec, record.n_trials), **counts),
        best_value=best,
        created_at=record.created_at,
    )


def _trial_summary(row: TrialRow) -> TrialSummary:
    attrs = row.attrs
    return TrialSummary(
        number=row.number,
        state=_state_of(row),
        value=row.value,
        params=row.params,
        epochs=attrs.get("epochs"),
        seconds=row.seconds,
        diagnosis=_diagnosis_of(row),
        metrics={k: v for k, v in attrs.items() if k.startswith(("val_", "test_"))},
        started_at=row.started_at,
        completed_at=row.completed_at,
    )


def _curve(reported: list[tuple[int, float | None]], history: list[list[Any]]) -> list[CurvePoint]:
    recorded = {int(row[0]): dict(zip(HISTORY_COLUMNS, row, strict=False)) for row in history}
    points = []
    for epoch, value in reported:
        extra = recorded.get(epoch, {})
        points.append(
            CurvePoint(
                epoch=epoch,
                value=value,
                train_loss=extra.get("train_loss"),
                val_loss=extra.get("val_loss"),
                learning_rate=extra.get("learning_rate"),
                grad_norms=extra.get("grad_norms"),
            )
        )
    return points


def _optuna_id(record: StudyRecord) -> int:
    return record.optuna_study_id if record.optuna_study_id is not None else -1


def _maximize(spec: StudySpec) -> bool:
    return spec.objective.direction == "maximize"
