"""The service layer: studies and their states, as plain functions over a `Store`.

The CLI's `--db` mode and the REST API both call these, so every rule about a study (what
a name may be reused for, which state changes are legal, what "resume" frees) lives here
once. Trials themselves stay in Optuna's schema; `hps_studies` adds the spec and the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from hpsearch.data import memory
from hpsearch.data.facts import DataFacts, inspect_dataset, split_sizes
from hpsearch.errors import Conflict, DatasetError, HpsearchError, NotFound, SpecError
from hpsearch.search.space import grid_size, places_held
from hpsearch.service.datasets import StoredUploads
from hpsearch.service.recovery import Recovery, recover
from hpsearch.service.views import TrialSummary
from hpsearch.service.warm import fit_configs, warm_start_configs
from hpsearch.spec import MAX_COUNT, MAX_ROW_ID, StudySpec, UploadedDataset, field_errors
from hpsearch.storage import (
    StudyRecord,
    delete_optuna_study,
    optuna_internals,
    records,
)
from hpsearch.storage.bulk import enqueue_trials
from hpsearch.storage.queries import optuna_study_id, recent_endings
from hpsearch.storage.store import Store

RUNNABLE_STATES = ("queued", "running")
# A study whose last this many trials to end all failed with an error is failed itself: its
# spec or data breaks every trial, and workers should serve the other studies.
MAX_FAILURES_IN_A_ROW = 3
RECENT_ENDINGS = 50  # how far back the rule above looks past trials that do not count
# The error of a trial a stopping worker checkpointed and handed back for another to resume.
HANDED_BACK_ERROR = "handed back by a stopping worker"
MAX_REASON_CHARS = 2000
# Which states each change may start from; anything else is a conflict (HTTP 409).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pause": ("queued", "running"),
    "resume": ("queued", "running", "paused", "failed"),
    "cancel": ("queued", "running", "paused", "failed"),
    "extend": ("queued", "running", "paused", "completed"),
}
# Where configurations may be enqueued: where `extend` may raise the budget, less a
# completed study, whose budget has no room left (extend it first).
ENQUEUE_STATES = ("queued", "running", "paused")


class StudyNotFound(NotFound):
    """No study of that name or id (HTTP 404)."""


class StudyConflict(Conflict):
    """A name taken by a different spec, or a state change the study's state forbids (409)."""


@dataclass(frozen=True)
class StudyState:
    """What a worker needs to know about a study before it claims a trial."""

    id: int
    name: str
    state: str
    n_trials: int
    spec: StudySpec
    optuna_study_id: int | None = None


def submit_study(store: Store, spec: StudySpec) -> StudyState:
    """Create the study, or return it when one of that name has the same spec.

    A spec that differs only in its budget sets the new budget (as re-running
    `study.optimize` with more trials would); any other difference is a conflict. A key the
    spec leaves out (`sampler`, say) takes the study's stored value, so a default changed
    since the study was created, by an upgrade, does not make the same file a conflict. The
    spec is admitted first (`admit`); a submission that fails leaves nothing behind.

    A `warm_start` is taken when the study is created, never again: its configurations
    (`warm.warm_start_configs`) are enqueued in the transaction that records the study,
    so a submission made again, or at the same moment, enqueues none twice.
    """
    omitted = _omitted_keys(spec)  # before admitting, which may validate the spec anew
    spec = admit(spec, store)
    existing = _update_existing(store, spec, omitted)
    if existing is not None:
        return existing
    warm: list[dict] = []
    if spec.warm_start is not None:  # an unknown study is refused before anything is made
        with store.session() as session:
            warm = warm_start_configs(session, spec)
    # Outside our transaction: on SQLite a transaction that read and then sees another
    # connection (Optuna's) write cannot write any more.
    optuna_study_id, created = _create_optuna_study(store.optuna(), spec)
    try:
        with store.session() as session:
            record = records.add_study(
                session,
                name=spec.name,
                spec=spec.model_dump(mode="json"),
                n_trials=spec.budget.n_trials,
                optuna_study_id=optuna_study_id,
            )
            enqueue_trials(session, optuna_study_id, warm)
            return _state_of(record)
    except IntegrityError:  # submitted at the same moment by another process
        return _update_existing(store, spec, omitted)
    except BaseException:
        if created:  # no Optuna study without its record, which would block the name
            with store.session() as session:
                delete_optuna_study(session, optuna_study_id)
        raise


def admit(spec: StudySpec, store: Store) -> StudySpec:
    """The spec with its task decided (a file's or an upload's target column implies it),
    once its data is found usable and its largest trial fits the device memory a trial may
    take: whatever is accepted can be run. A problem is a SpecError naming the field."""
    try:
        facts = inspect_dataset(spec, StoredUploads(store))
    except DatasetError as exc:
        raise SpecError([(_dataset_field(spec), str(exc))]) from None
    spec = spec if spec.task == facts.task else spec.with_task(facts.task)
    _check_split(spec, facts)
    refused = memory.refusal(spec, memory.estimate(spec, facts), memory.max_trial_bytes())
    if refused is not None:
        raise SpecError([refused])
    return spec


def _check_split(spec: StudySpec, facts: DataFacts) -> None:
    """Every part of the split must have rows, and for classification (split by class) at
    least one row per class: otherwise every trial would fail to load its data."""
    needed = facts.n_outputs if facts.task == "classification" else 1
    train, val, test = split_sizes(facts.n_rows, spec.split)
    parts = {"train": train, "val": val} | ({"test": test} if spec.split.test > 0 else {})
    short = {name: rows for name, rows in parts.items() if rows < needed}
    if short:
        listed = ", ".join(f"{name} {rows}" for name, rows in short.items())
        raise SpecError(
            [
                (
                    "split",
                    f"splitting {facts.n_rows:,} rows leaves {listed} rows; each part needs "
                    f"at least {needed}" + (" (one per class)" if needed > 1 else ""),
                )
            ]
        )


def _dataset_field(spec: StudySpec) -> str:
    return "dataset.id" if isinstance(spec.dataset, UploadedDataset) else "dataset"


def _omitted_keys(spec: StudySpec) -> frozenset[str]:
    """The spec's top-level keys that its document left out, so that hold defaults."""
    return frozenset(StudySpec.model_fields) - spec.model_fields_set


def _update_existing(store: Store, spec: StudySpec, omitted: frozenset[str]) -> StudyState | None:
    with store.session(immediate=True) as session:
        record = records.study_by_name(session, spec.name)
        if record is None:
            return None
        _update_budget(record, spec, omitted)
        return _state_of(record)


def _create_optuna_study(storage: optuna.storages.BaseStorage, spec: StudySpec) -> tuple[int, bool]:
    """The Optuna study's id, and whether this call created it (rather than taking over an
    empty one of that name). Either way its objective is named after the spec's metric, so
    optuna-dashboard and `optuna.visualization` show "val_accuracy", not "Objective 0"."""
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=storage, direction=spec.objective.direction
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        directions = [direction.name.lower() for direction in study.directions]
        if study.get_trials(deepcopy=False) or directions != [spec.objective.direction]:
            raise StudyConflict(
                f"an Optuna study named {spec.name!r} already exists in this database "
                "and was not created by hpsearch; choose another name, or delete it with "
                f"`hpsearch delete {spec.name}`"
            ) from None
        created = False
    study.set_metric_names([spec.objective.metric])
    return optuna_internals.study_id(study), created


def _update_budget(record: StudyRecord, spec: StudySpec, omitted: frozenset[str]) -> None:
    stored = StudySpec.model_validate(record.spec)
    spec = spec.model_copy(update={key: getattr(stored, key) for key in omitted})
    if _without_budget(stored) != _without_budget(spec):
        raise StudyConflict(
            f"a study named {spec.name!r} already exists with a different spec; "
            "choose another name to start a new study"
        )
    if record.n_trials != spec.budget.n_trials:
        record.spec = spec.model_dump(mode="json")
        record.n_trials = spec.budget.n_trials
        if record.state == "completed":
            record.state = "running"


def _without_budget(spec: StudySpec) -> dict[str, Any]:
    data = spec.model_dump(mode="json")
    data.pop("budget")
    return data


def get_study(store: Store, study: str | int) -> StudyState:
    """The study by numeric id or by name."""
    with store.session() as session:
        return _state_of(find_study(session, study))


def runnable_studies(store: Store, names: tuple[str, ...] = ()) -> list[StudyState]:
    """The studies workers may claim trials of (all, or those named), oldest first: one
    query, since every idle worker asks for them every few seconds. A study whose stored
    spec this version cannot read is failed with the reason, not served."""
    with store.session() as session:
        states = []
        for record in records.studies_in_states(session, RUNNABLE_STATES, names):
            try:
                states.append(_state_of(record))
            except ValidationError as exc:
                errors = field_errors(exc.errors())
                problems = "; ".join(f"{path}: {reason}" for path, reason in errors)
                record.state = "failed"
                record.reason = _clip(f"its stored spec is not valid: {problems}")
        return states


def find_study(session: Any, study: str | int) -> StudyRecord:
    """The study's row by numeric id or name, or StudyNotFound. Names start with a letter,
    so digits are an id (one past the column's range is no study, not a database error)."""
    if isinstance(study, int) or str(study).isdigit():
        if int(study) > MAX_ROW_ID:
            raise StudyNotFound(f"no study {study!r}")
        record = records.study_by_id(session, int(study))
    else:
        record = records.study_by_name(session, study)
    if record is None:
        raise StudyNotFound(f"no study {study!r}")
    return record


def _state_of(record: StudyRecord) -> StudyState:
    return StudyState(
        id=record.id,
        name=record.name,
        state=record.state,
        n_trials=record.n_trials,
        spec=StudySpec.model_validate(record.spec),
        optuna_study_id=record.optuna_study_id,
    )


def change_state(store: Store, study: str | int, change: str, n_trials: int = 0) -> StudyState:
    """pause, resume, cancel or extend (by `n_trials` more trials) a study."""
    with store.session(immediate=True) as session:
        record = find_study(session, study)
        if record.state not in TRANSITIONS[change]:
            raise StudyConflict(f"cannot {change} study {record.name!r}: it is {record.state}")
        if change == "extend":
            if n_trials < 1:
                raise HpsearchError("extend needs --n-trials of at least 1")
            if record.n_trials + n_trials > MAX_COUNT:
                raise HpsearchError(
                    f"extend would make the budget {record.n_trials + n_trials:,} trials; a "
                    f"study may have at most {MAX_COUNT:,}"
                )
            record.n_trials += n_trials
            spec = StudySpec.model_validate(record.spec)
            budget = spec.budget.model_copy(update={"n_trials": record.n_trials})
            record.spec = spec.model_copy(update={"budget": budget}).model_dump(mode="json")
        if record.state == "failed":
            record.reason = None
        record.state = {
            "pause": "paused",
            "cancel": "cancelled",
            "resume": "running",
            "extend": "running" if record.state == "completed" else record.state,
        }[change]
        return _state_of(record)


def enqueue(store: Store, study: str | int, configs: list[Any]) -> list[TrialSummary]:
    """Enqueue configurations (param name -> value; params left out are drawn by the
    sampler) as waiting trials, which claims start before any new trial, in this order.
    They take places in the budget, which stays as it is: a study with room for fewer is
    a conflict (extend it first). Each value must be one the search space holds
    (`warm.fit_configs`: a SpecError names each param at fault). Counted and enqueued
    under the study's claim lock, so that no claim meanwhile overruns the budget.
    Returns the waiting trials."""
    state = get_study(store, study)
    _check_enqueue(state.name, state.state, state.spec)
    fitted = fit_configs(state.spec, configs)
    with store.claim(state.id) as claim:
        record = claim.record
        _check_enqueue(record.name, record.state, state.spec)
        counts = claim.trial_counts()
        room = effective_budget(state.spec, record.n_trials) - places_held(counts)
        if len(fitted) > room:
            free = (
                f"has room for {room} more trial(s) in its budget of {record.n_trials}"
                if room > 0
                else f"has no room left in its budget of {record.n_trials} trials"
            )
            raise StudyConflict(
                f"study {record.name!r} {free} (finished, running and waiting trials hold "
                f"places in it): enqueue fewer, or raise the budget first with "
                f"`hpsearch extend {record.name} --n-trials K`"
            )
        try:
            enqueued = claim.enqueue_trials(fitted)
        except LookupError:
            raise StudyConflict(
                f"study {record.name!r} has lost its Optuna study (deleted outside hpsearch)"
            ) from None
    return [
        TrialSummary(number=number, state="waiting", value=None, params=config)
        for (_, number), config in zip(enqueued, fitted, strict=True)
    ]


def _check_enqueue(name: str, state: str, spec: StudySpec) -> None:
    if state not in ENQUEUE_STATES:
        hint = {
            "completed": f"; raise its budget first: hpsearch extend {name} --n-trials K",
            "failed": f"; run it again first: hpsearch resume {name}",
        }.get(state, "")
        raise StudyConflict(f"cannot enqueue into study {name!r}: it is {state}{hint}")
    if spec.sampler.name == "grid":
        raise StudyConflict(
            f"cannot enqueue into study {name!r}: its grid sampler trains every point of "
            "its grid once, in its own order"
        )


def mark_running(store: Store, study_id: int) -> None:
    """queued -> running, when its first trial is claimed."""
    _transition(store, study_id, "queued", "running")


def effective_budget(spec: StudySpec, n_trials: int) -> int:
    """The trials a study trains: `n_trials`, and for a grid study at most one per point of
    its grid, as Optuna's and Katib's grid searches end once every point was tried."""
    points = grid_size(spec)
    return n_trials if points is None else min(n_trials, points)


def mark_completed_if_done(store: Store, state: StudyState) -> None:
    """running -> completed once the study's complete and pruned trials fill its budget (a
    grid study's: at most its grid's size): counted and compared by the database in one
    statement, so an `extend` meanwhile keeps the study running."""
    points = grid_size(state.spec)
    with store.session() as session:
        records.complete_study_if_filled(session, state.id, points)


def fail_study(store: Store, study_id: int, reason: str) -> bool:
    """queued or running -> failed, with the reason shown by `status` and the API. False
    when the study is no longer runnable (or no longer there): nothing changes then."""
    with store.session() as session:
        return records.fail_study_in_states(session, study_id, RUNNABLE_STATES, _clip(reason))


def fail_if_failing(store: Store, state: StudyState) -> str | None:
    """Fail the study when its last MAX_FAILURES_IN_A_ROW trials to end all failed with an
    error; returns the reason then. Trials handed back by a stopping worker, or failed as
    stale when their worker died (and retried), say nothing about the spec: they are left
    out of the count."""
    if state.optuna_study_id is None:
        return None
    with store.session() as session:
        endings = recent_endings(session, state.optuna_study_id, RECENT_ENDINGS)
    counted = [
        (trial_state, error)
        for trial_state, error in endings
        if not (trial_state == "failed" and error in (None, HANDED_BACK_ERROR))
    ]
    last = counted[:MAX_FAILURES_IN_A_ROW]
    if len(last) < MAX_FAILURES_IN_A_ROW or any(s != "failed" for s, _ in last):
        return None
    reason = f"{MAX_FAILURES_IN_A_ROW} trials in a row failed; the last: {last[0][1]}"
    return reason if fail_study(store, state.id, reason) else None


def _clip(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def _transition(store: Store, study_id: int, before: str, after: str) -> None:
    with store.session() as session:
        records.move_study(session, study_id, before, after)


def resume_study(
    store: Store, study: str | int, *, free_running: bool = False
) -> tuple[StudyState, Recovery]:
    """Set the study running and free its lost trials now rather than after the grace
    period (`hpsearch.service.recovery.recover`): a trial whose worker is certainly dead or whose
    heartbeat missed two beats. Each is retried with the same params and resumes from its
    checkpoint. `free_running`: the user knows the workers are dead; wait up to two
    heartbeats for each running trial to prove its worker alive, and free the others."""
    state = change_state(store, study, "resume")
    optuna_study = optuna.load_study(study_name=state.name, storage=store.optuna())
    return state, recover(store, optuna_study, state.id, wait_for_silence=free_running)


def delete_study(store: Store, study: str | int) -> str:
    """Remove the study, its trials (Optuna's rows), checkpoints and kept weights, in one
    transaction of bulk deletes: fast for thousands of trials, and all or nothing when the
    process dies. Returns its name.

    A study with running trials must be paused or cancelled first, so no worker is left
    writing to a study that no longer exists. An Optuna study without hpsearch's record (a
    deletion by an older version that stopped half-way, or a study made with Optuna alone)
    is deleted by name, so its name can be used again.
    """
    with store.session(immediate=True) as session:
        try:
            record = find_study(session, study)
        except StudyNotFound:
            optuna_id = None if str(study).isdigit() else optuna_study_id(session, str(study))
            if optuna_id is None:
                raise
            delete_optuna_study(session, optuna_id)
            return str(study)
        if record.state in RUNNABLE_STATES:
            raise StudyConflict(
                f"study {record.name!r} is {record.state}: pause or cancel it before deleting it"
            )
        records.delete_study_record(session, record)  # checkpoints and models go with it
        if record.optuna_study_id is not None:
            delete_optuna_study(session, record.optuna_study_id)
        return record.name
