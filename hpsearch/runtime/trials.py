"""Trials on a database: claim them within the budget, train them with heartbeats and
checkpoints, and tell how they ended (or hand them back). A pack of trials is claimed,
written and told in a few transactions, whatever its size. The embedded run and the
workers share these functions."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.orm import Session

from hpsearch.data.tensors import TensorData
from hpsearch.search.pruning import StudyPruning
from hpsearch.search.space import make_pruner, make_sampler, places_held, suggest_params
from hpsearch.service import recovery
from hpsearch.service.diagnosis import diagnose
from hpsearch.service.studies import (
    HANDED_BACK_ERROR,
    RUNNABLE_STATES,
    StudyState,
    effective_budget,
    mark_completed_if_done,
    mark_running,
)
from hpsearch.spec import StudySpec
from hpsearch.storage import (
    DATABASE_ERRORS,
    Ending,
    LeaseLost,
    StudyClaim,
    TrialWrite,
    Weights,
    delete_checkpoints,
    grace_period_s,
    heartbeat_interval_s,
    keep_best_models,
    newest_checkpoint,
    optuna_internals,
    write_trials,
)
from hpsearch.storage.bulk import PendingTrials, StartedTrial, record_heartbeats, write_params
from hpsearch.storage.engine import MAX_RETRIES
from hpsearch.storage.history import TrialHistory
from hpsearch.storage.optuna_internals import as_asked
from hpsearch.storage.queries import STATE_NAMES
from hpsearch.storage.store import Store
from hpsearch.training.fused import pack_key, train_pack
from hpsearch.training.modelfile import model_file
from hpsearch.training.train import EpochRecord, TrainResult, TrialConfig, checkpoint_history, train

log = logging.getLogger(__name__)
KEEP_BEST_MODELS = 5  # the trained weights of this many best trials per study are kept
WRITE_EVERY_S = 2.0  # a running trial's reports reach the database at least this often
NAN_ERROR = "ValueError: the objective is NaN"  # Optuna's tell fails such a trial
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# (storage, trial id) of the trials whose heartbeats a `keep_alive` block records now.
_BEATING: set[tuple[int, int]] = set()
_BEATING_LOCK = threading.Lock()
_HISTORIES: weakref.WeakKeyDictionary[optuna.Study, TrialHistory] = weakref.WeakKeyDictionary()


def open_study(state: StudyState, store: Store) -> optuna.Study:
    """The study with its spec's sampler and pruner, as a worker uses it."""
    return optuna.load_study(
        study_name=state.name,
        storage=store.optuna(),
        sampler=make_sampler(state.spec),
        pruner=make_pruner(state.spec),
    )


@dataclass(frozen=True)
class Claim:
    """A claimed trial with what it trains: its config is derived from its params once, at
    the claim, and everything downstream (packing, training, checkpoints) reads it here."""

    trial: optuna.Trial
    config: TrialConfig

    @classmethod
    def of(cls, trial: optuna.Trial, spec: StudySpec) -> Claim:
        """The trial's params suggested from the spec (a retry's are the ones it inherited)."""
        return cls(trial, TrialConfig.from_spec(spec, suggest_params(trial, spec)))


def claim_trial(study: optuna.Study, state: StudyState, store: Store) -> Claim | None:
    """One trial of `claim_trials`, or None."""
    claims = claim_trials(study, state, store, 1)
    return claims[0] if claims else None


def claim_trials(study: optuna.Study, state: StudyState, store: Store, n: int) -> list[Claim]:
    """Up to `n` trials with their params chosen; none when the study is not runnable
    (paused, cancelled, ...) or its budget is spent.

    One transaction under the study's claim lock counts the budget once (by the database,
    so a claim costs the same in a study of 10 or 10,000 trials) and starts the trials:
    waiting trials first (retries and enqueued configurations: they hold budget already),
    then new ones, each with a first heartbeat and this process named as its holder. Their
    params are drawn after the lock is released, in one more transaction: the sampler sees
    the started trials as running, so the points of one pack differ, and other workers
    claim meanwhile. A grid's points
    are drawn under the lock, where no two workers can take the same one.

    A grid study's budget is at most its grid's size (`effective_budget`). One whose grid is
    spent while its n_trials is larger is completed here once its trials have ended: its
    budget may have been raised after the last of them ended, and no trial would end again
    to complete it.
    """
    claims: list[Claim] = []
    with store.claim(state.id) as claim:
        if claim.record.state not in RUNNABLE_STATES:
            return []
        n_trials = claim.record.n_trials
        budget = effective_budget(state.spec, n_trials)
        started = _start_within_budget(study, claim, budget, n)
        first = claim.record.state == "queued"
        if started and state.spec.sampler.name == "grid":
            claims = _draw(study, state.spec, started, store, claim.write_params)
    # Outside the lock: on PostgreSQL it is a lock on the study's row, which these update.
    if not started:
        if budget < n_trials:
            mark_completed_if_done(store, state)
        return []
    if first:
        mark_running(store, state.id)
    write = functools.partial(_write_params, store)
    return claims or _draw(study, state.spec, started, store, write)


def _start_within_budget(
    study: optuna.Study, claim: StudyClaim, budget: int, n: int
) -> list[StartedTrial]:
    """Under the claim lock: up to `n` waiting trials (retries, enqueued configurations)
    and new trials, the new ones only while the trials that count against the budget
    (the waiting ones included) leave room."""
    claim.beat_for_orphans()
    recovery.reap_lost_trials(study, claim, grace_period_s())  # their retries wait in the queue
    counts = claim.trial_counts()
    used = places_held(counts)
    retries = min(n, counts.get(STATE_NAMES[TrialState.WAITING], 0))
    new = max(0, min(n - retries, budget - used))
    if retries + new == 0:
        return []
    return claim.start_trials(retries=retries, new=new, system_attrs=recovery.holder_attrs())


def _draw(
    study: optuna.Study,
    spec: StudySpec,
    started: list[StartedTrial],
    store: Store,
    write: Callable[[PendingTrials], None],
) -> list[Claim]:
    """The started trials' params, drawn one trial after another by the study's sampler
    (a retry keeps those it inherited; an enqueued configuration's params are its own,
    and the sampler draws only those it leaves out), then written together by `write`."""
    storage = optuna_internals.study_storage(study)
    history = _history(study, store)
    try:
        pending = PendingTrials(storage, [_as_started(storage, t) for t in started], history)
        drawing = optuna.Study(
            study.study_name, pending, sampler=study.sampler, pruner=study.pruner
        )
        claims = [Claim.of(optuna.Trial(drawing, t.trial_id), spec) for t in started]
        write(pending)
    except Exception:
        # Started but never drawn: failed, so that they hold no budget (no retry: their
        # params would be drawn again, and fail the same way). Trials started in the
        # claim's own transaction (a grid on PostgreSQL) are rolled back with it instead.
        for t in started:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, KeyError):
                storage.set_trial_state_values(t.trial_id, TrialState.FAIL)
        raise
    pending.release()
    return claims


def _history(study: optuna.Study, store: Store) -> TrialHistory:
    """The study's trials as its samplers read them, kept with the study object between
    claims (so that each claim reads only what changed) and dropped with it: a study
    deleted and made again under the same id is a new study object, with a new history."""
    if study not in _HISTORIES:
        _HISTORIES[study] = TrialHistory(store.url, optuna_internals.study_id(study))
    return _HISTORIES[study]


def _as_started(storage: optuna.storages.BaseStorage, started: StartedTrial) -> FrozenTrial:
    """A started trial as Optuna would read it back: a new one is known without a query;
    one that waited in the queue is read for what it holds. A retry holds the params it
    inherited (and `retry_history`, which finds the checkpoint it resumes from); an
    enqueued configuration holds none yet, only its `fixed_params` system attribute,
    which `optuna.Trial` suggests for those params, the sampler drawing the others."""
    if started.queued:
        trial = storage.get_trial(started.trial_id)
        trial.state = TrialState.RUNNING
        trial.datetime_start = started.datetime_start
    else:
        trial = FrozenTrial(
            number=started.number,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=started.datetime_start,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=started.trial_id,
        )
    trial.system_attrs.update(recovery.holder_attrs())
    return trial


def _write_params(store: Store, pending: PendingTrials) -> None:
    def write() -> None:
        with store.session(immediate=True) as session:
            write_params(session, pending.params, pending.system_attrs)

    store.retrying(write)


@dataclass(frozen=True)
class TrialContext:
    """What a worker adds to a trial: where its writes go, its study's pruning, and a signal
    to stop early."""

    store: Store
    study_id: int
    pruning: StudyPruning
    # Set (by SIGTERM or Ctrl-C) to checkpoint at the end of the epoch and hand the trial back.
    stop: threading.Event = field(default_factory=threading.Event)
    compiled: bool = False  # packs train with their step compiled (`train_pack`)


class TrialHandedBack(Exception):
    """The trial was checkpointed and handed back for another worker to resume."""


class TrialWriter:
    """What waits to be written to one running trial: its reported epochs, user and system
    attributes and newest checkpoint.

    For a worker, these wait in memory until the trial's next write (`write_down`): one
    lease-checked transaction for any number of trials, where Optuna commits every value on
    its own. The pruner reads the trial's own values from memory, so it decides on every
    epoch all the same. A crash loses only writes that a retry makes again: it resumes from
    the newest checkpoint and re-reports that checkpoint's epochs. Without a worker's
    context (a plain `study.optimize`), everything goes through Optuna at once.
    """

    def __init__(self, trial: optuna.Trial, context: TrialContext | None) -> None:
        self.trial = trial
        self.context = context
        self.trial_id = optuna_internals.trial_id(trial)
        self._reports: dict[int, float] = {}
        self._attrs: dict[str, Any] = {}
        self._system_attrs: dict[str, Any] = {}
        self._checkpoint: tuple[int, bytes] | None = None

    @property
    def curve(self) -> dict[int, float]:
        """The trial's reported values by epoch, as Optuna's pruners read them (Optuna's own
        in-memory copy of the trial, which `trial.report` also fills)."""
        return as_asked(self.trial).intermediate_values

    def report(self, value: float, epoch: int) -> None:
        if self.context is None:
            self.trial.report(value, epoch)
            return
        if epoch in self.curve:
            return  # as with Optuna, the first value reported at an epoch stays
        self.curve[epoch] = self._reports[epoch] = float(value)

    def should_prune(self) -> bool:
        if self.context is None:
            return self.trial.should_prune()
        decision = self.context.pruning.decide(as_asked(self.trial))
        # The rungs reached: kept in memory for the next decision, and written with the rest.
        as_asked(self.trial).system_attrs.update(decision.system_attrs)
        self._system_attrs |= decision.system_attrs
        return decision.prune

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        if self.context is None:
            for key, value in attrs.items():
                self.trial.set_user_attr(key, value)
            return
        self._attrs |= attrs

    def save(self, payload: bytes, epoch: int) -> None:
        """Keep the trial's newest checkpoint for its next write (an older one is moot)."""
        self._checkpoint = (epoch, payload)

    @property
    def saved(self) -> bool:
        """Whether a checkpoint waits to be written."""
        return self._checkpoint is not None

    def waiting(self, ending: Ending | None = None) -> TrialWrite:
        """Everything that waits, as one write (with the trial's `ending`, if it ended)."""
        return TrialWrite(
            self.trial_id,
            self.trial.number,
            dict(self._reports),
            dict(self._attrs),
            dict(self._system_attrs),
            self._checkpoint,
            ending,
        )

    def written(self) -> None:
        """What waited is in the database."""
        self._reports.clear()
        self._attrs.clear()
        self._system_attrs.clear()
        self._checkpoint = None


class WriteClock:
    """When reports are due: a running trial's reach the database at least every
    WRITE_EVERY_S."""

    def __init__(self) -> None:
        self._written_at = time.monotonic()

    @property
    def due(self) -> bool:
        return time.monotonic() - self._written_at >= WRITE_EVERY_S

    def reset(self) -> None:
        self._written_at = time.monotonic()


def write_down(
    study: optuna.Study,
    context: TrialContext,
    writers: list[TrialWriter],
    ended: dict[int, TrainResult] | None = None,
) -> tuple[dict[int, TrialState], set[int]]:
    """Write what waits for these trials and tell those that `ended` (trial id -> result),
    in one lease-checked transaction: reports, attributes, checkpoints, results, states
    and values, the best weights kept and the ended trials' checkpoints dropped.

    Returns the states told (trial id -> state) and the ids of the trials taken away
    (failed as stale while this worker was slow), to which nothing was written.
    """
    ended = ended or {}
    by_id = {w.trial_id: w for w in writers}
    endings = {tid: _ending(by_id[tid], result) for tid, result in ended.items()}
    for tid, result in ended.items():
        _record(by_id[tid], result)
        ending = endings[tid]
        if ending.state == TrialState.FAIL:  # shown as failed with its reason, not as lost
            by_id[tid].set_attrs({"error": NAN_ERROR})
        values = None if ending.value is None else [ending.value]
        study.sampler.after_trial(study, as_asked(by_id[tid].trial), ending.state, values)
    # Looked up through Optuna first: on SQLite its connection would wait for the
    # immediate transaction below.
    retried = {tid: _retried_trial_ids(by_id[tid].trial) for tid in ended}

    def keep_and_forget(session: Session, lost: set[int]) -> None:
        told = [tid for tid in ended if tid not in lost]
        complete = [tid for tid in told if endings[tid].state == TrialState.COMPLETE]
        _keep_best(session, study, context, [(by_id[tid].trial, ended[tid]) for tid in complete])
        delete_checkpoints(session, [i for tid in told for i in (tid, *retried[tid])])

    lost = write_waiting(context, writers, endings, then=keep_and_forget)
    told = {tid: endings[tid].state for tid in ended if tid not in lost}
    for tid in told:
        _after_tell(study, by_id[tid].trial, ended[tid], endings[tid], context)
    return told, lost


def _ending(writer: TrialWriter, result: TrainResult) -> Ending:
    """How Optuna's `tell` would store the result: a pruned trial's value is its last
    report; a NaN fails the trial."""
    if result.pruned:
        curve = writer.curve
        last = curve[max(curve)] if curve else None
        return Ending(TrialState.PRUNED, None if last is None or math.isnan(last) else last)
    if math.isnan(result.value):
        return Ending(TrialState.FAIL, None)
    return Ending(TrialState.COMPLETE, result.value)


def _after_tell(
    study: optuna.Study,
    trial: optuna.Trial,
    result: TrainResult,
    ending: Ending,
    context: TrialContext,
) -> None:
    if ending.state == TrialState.FAIL:
        log.warning(
            "study %s: trial %d failed: %s",
            study.study_name,
            trial.number,
            NAN_ERROR,
            extra={"study": study.study_name, "trial": trial.number, "state": "failed"},
        )
        return
    _log_end(study, trial, result)
    if ending.state == TrialState.COMPLETE:
        curve = {r.epoch: r.value for r in result.history}
        context.pruning.completed_here(optuna_internals.trial_id(trial), curve)


def objective(trial: optuna.Trial, spec: StudySpec, data: TensorData) -> float:
    """Train the trial's network and return its objective; usable with `study.optimize`.

    Raises `optuna.TrialPruned` when the pruner says so; the results are recorded as user
    attributes either way.
    """
    writer = TrialWriter(trial, None)
    result = _train(writer, Claim.of(trial, spec), spec, data)
    _record(writer, result)
    if result.pruned:
        raise optuna.TrialPruned(f"pruned at epoch {result.epochs_run}")
    return result.value


def _train(writer: TrialWriter, claim: Claim, spec: StudySpec, data: TensorData) -> TrainResult:
    """Train the trial's network, reporting every epoch.

    With a worker's context, a retried trial resumes from the newest checkpoint of the
    trial it retries (re-reporting that history so pruners see it), reports and checkpoints
    are written as it trains, and a set `context.stop` checkpoints and raises
    TrialHandedBack.
    """
    context = writer.context
    clock = WriteClock()
    resume_from = _checkpoint_to_resume(claim.trial, context) if context else None
    if context is not None:
        _begin(writer, data, resume_from)

    def write() -> None:
        assert context is not None
        if write_waiting(context, [writer]):
            raise LeaseLost(f"trial {claim.trial.number} is no longer this worker's")
        clock.reset()

    def report(record: EpochRecord) -> bool:
        writer.report(record.value, record.epoch)
        if context is not None and clock.due:
            write()
        return writer.should_prune()

    def save(payload: bytes, epoch: int) -> None:
        writer.save(payload, epoch)
        write()

    try:
        result = train(
            claim.config,
            data,
            on_epoch=report,
            on_checkpoint=save if context else None,
            checkpoint_every_s=spec.training.checkpoint_every_s,
            checkpoint_now=context.stop if context else None,
            stop_after_checkpoint=True,
            resume_from=resume_from,
        )
    except (LeaseLost, *DATABASE_ERRORS):
        raise  # writing the waiting reports would fail too
    except Exception:
        if context is not None:
            write_waiting(context, [writer])  # the failed trial keeps its epochs
        raise
    if result.interrupted:
        raise TrialHandedBack
    return result


def write_waiting(
    context: TrialContext,
    writers: list[TrialWriter],
    endings: dict[int, Ending] | None = None,
    then: Callable[[Session, set[int]], None] | None = None,
) -> set[int]:
    """Write what waits for these running trials, with their `endings` (trial id ->
    ending), in one lease-checked transaction that `then` may add to; returns the ids of
    the trials taken away meanwhile, to which nothing was written."""
    endings = endings or {}
    writes = [w.waiting(endings.get(w.trial_id)) for w in writers]

    def write() -> set[int]:
        with context.store.session(immediate=True) as session:
            lost = set(write_trials(session, context.study_id, writes))
            if then is not None:
                then(session, lost)
            return lost

    lost = context.store.retrying(write)
    for writer in writers:
        if writer.trial_id not in lost:
            writer.written()
    return lost


def _checkpoint_to_resume(trial: optuna.Trial, context: TrialContext) -> bytes | None:
    """The newest checkpoint among the trials this one retries (a chain of retries)."""
    trial_ids = _retried_trial_ids(trial)
    if not trial_ids:
        return None
    with context.store.session() as session:
        checkpoint = newest_checkpoint(session, trial_ids)
        return None if checkpoint is None else checkpoint.payload


def _retried_trial_ids(trial: optuna.Trial) -> list[int]:
    """The ids of the trials this one retries (oldest first), looked up by number one by
    one: a trial that retries none, as most do, costs no lookup at all."""
    storage = optuna_internals.study_storage(trial.study)
    numbers = as_asked(trial).system_attrs.get("retry_history", [])
    return [
        storage.get_trial_id_from_study_id_trial_number(
            optuna_internals.study_id(trial.study), number
        )
        for number in numbers
    ]


def run_trial(
    study: optuna.Study,
    claim: Claim,
    spec: StudySpec,
    data: TensorData,
    context: TrialContext | None = None,
) -> TrialState | None:
    """Run a claimed trial and tell the study how it ended; None when the trial was handed
    back or taken away (failed as stale while this worker was slow), so nothing is told.

    An error fails the trial with the message recorded (failed trials use no budget).
    """
    trial = claim.trial
    writer = TrialWriter(trial, context)
    try:
        with keep_alive(study, [trial], context.store if context else None):
            result = _train(writer, claim, spec, data)
        if context is None:
            return _tell(study, writer, result)
        told, _lost = write_down(study, context, [writer], {writer.trial_id: result})
        if not told:
            _log_taken_away(study, trial)
        return told.get(writer.trial_id)
    except TrialHandedBack:
        assert context is not None
        hand_back(study, trial, context)
        return None
    except (LeaseLost, optuna.exceptions.UpdateFinishedTrialError):
        _log_taken_away(study, trial)
        return None  # another worker resumes it; this one must not write to it
    except DATABASE_ERRORS:
        raise  # telling would fail too; the trial goes stale and resumes from its checkpoint
    except Exception as exc:  # a failed trial must not take the worker down
        return _fail(study, trial, exc)


def run_pack(
    study: optuna.Study,
    claims: list[Claim],
    spec: StudySpec,
    data: TensorData,
    context: TrialContext,
) -> list[TrialState | None]:
    """Run claimed trials of one architecture as a fused pack (`training.fused`), each
    reported, pruned, checkpointed, resumed and told as `run_trial` does it alone. What the
    members report, save and how they end is written down together at the end of an epoch:
    one transaction for the whole pack."""
    pack = _PackRun(study, claims, context)
    resume_from = [_checkpoint_to_resume(c.trial, context) for c in claims]
    for writer, payload in zip(pack.writers, resume_from, strict=True):
        _begin(writer, data, payload)
    try:
        with keep_alive(study, [c.trial for c in claims], context.store):
            train_pack(
                [c.config for c in claims],
                data,
                pack.report,
                pack.done,
                on_checkpoint=pack.save,
                checkpoint_every_s=spec.training.checkpoint_every_s,
                checkpoint_now=context.stop,
                stop_after_checkpoint=True,
                resume_from=resume_from,
                on_epoch_end=pack.write_down,
                compiled=context.compiled,
            )
    except DATABASE_ERRORS:
        raise
    except Exception as exc:  # fail the members still training; the worker goes on
        pack.fail_the_rest(exc)
    return pack.outcomes


class _PackRun:
    """The members of a pack as they train: each one's writer and outcome, those that ended
    this epoch (`ended`) or were interrupted to be handed back, and the members failed as
    stale elsewhere (`lost`), which are never written to again."""

    def __init__(self, study: optuna.Study, claims: list[Claim], context: TrialContext) -> None:
        self.study = study
        self.context = context
        self.writers = [TrialWriter(c.trial, context) for c in claims]
        self.outcomes: list[TrialState | None] = [None] * len(claims)
        self.lost: set[int] = set()
        self.left: set[int] = set()  # told or handed back: nothing more to write
        self.ended: dict[int, TrainResult] = {}
        self.interrupted: list[int] = []
        self.clock = WriteClock()

    def report(self, i: int, record: EpochRecord) -> bool:
        if i in self.lost:
            return False
        self.writers[i].report(record.value, record.epoch)
        return self.writers[i].should_prune()

    def save(self, i: int, payload: bytes, epoch: int) -> None:
        self.writers[i].save(payload, epoch)

    def done(self, i: int, result: TrainResult) -> None:
        if i in self.lost:
            return
        if result.interrupted:
            self.interrupted.append(i)
        else:
            self.ended[i] = result

    def write_down(self) -> None:
        """At the end of an epoch: write the members' waiting reports, attributes and
        checkpoints and tell those that ended, all in one transaction, when any ended or
        saved or reports are due; then hand back the interrupted ones."""
        live = [i for i in range(len(self.writers)) if i not in self.lost | self.left]
        saved = any(self.writers[i].saved for i in live)
        if not (self.ended or saved or self.clock.due):
            return
        ended = {self.writers[i].trial_id: r for i, r in self.ended.items()}
        told, lost = write_down(self.study, self.context, [self.writers[i] for i in live], ended)
        for i in live:
            trial_id = self.writers[i].trial_id
            if trial_id in lost:
                self._lose(i)
            elif trial_id in told:
                self.outcomes[i] = told[trial_id]
                self.left.add(i)
        self.ended.clear()
        self.clock.reset()
        for i in self.interrupted:
            if i not in self.lost:
                hand_back(self.study, self.writers[i].trial, self.context)
                self.left.add(i)
        self.interrupted.clear()

    def fail_the_rest(self, exc: Exception) -> None:
        """Fail the members still training with the error, after writing what they
        reported; a member taken away meanwhile is left alone."""
        going = [i for i in range(len(self.writers)) if i not in self.lost | self.left]
        lost: set[int] = set()
        with contextlib.suppress(*DATABASE_ERRORS):
            lost = write_waiting(self.context, [self.writers[i] for i in going])
        for i in going:
            if self.writers[i].trial_id in lost:
                self._lose(i)
                continue
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self.outcomes[i] = _fail(self.study, self.writers[i].trial, exc)

    def _lose(self, i: int) -> None:
        self.lost.add(i)
        _log_taken_away(self.study, self.writers[i].trial)


def packs(claims: list[Claim], largest: int | None = None) -> list[list[Claim]]:
    """The claimed trials grouped into what can train as one fused pack (same network and
    update rule, `training.fused.pack_key`), in claim order, at most `largest` to a pack
    (what fits the device); batch-norm trials alone."""
    groups: dict[Any, list[Claim]] = {}
    for claim in claims:
        config = claim.config
        key = ("alone", claim.trial.number) if config.batch_norm else pack_key(config)
        groups.setdefault(key, []).append(claim)
    size = largest or len(claims)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _begin(writer: TrialWriter, data: TensorData, resume_from: bytes | None) -> None:
    """Before a worker trains a trial: sign it, and re-report the history of the checkpoint
    it resumes from (if any) so that pruners see the epochs trained before."""
    writer.set_attrs(_signature(data))
    for record in checkpoint_history(resume_from) if resume_from else []:
        writer.report(record.value, record.epoch)


def _signature(data: TensorData) -> dict[str, Any]:
    """The user attributes that tell which worker process, on which device and with how
    many CPU threads, runs a trial: what to look at first when trials run slowly."""
    return {
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "device": str(data.device),
        "threads": torch.get_num_threads(),
    }


def _tell(study: optuna.Study, writer: TrialWriter, result: TrainResult) -> TrialState:
    """Record and tell how a training ended through Optuna alone (no worker's context)."""
    _record(writer, result)
    if result.pruned:
        study.tell(writer.trial, state=TrialState.PRUNED)
    else:
        study.tell(writer.trial, result.value)
    _log_end(study, writer.trial, result)
    return TrialState.PRUNED if result.pruned else TrialState.COMPLETE


def _fail(study: optuna.Study, trial: optuna.Trial, exc: Exception) -> TrialState:
    error = f"{type(exc).__name__}: {exc}"
    trial.set_user_attr("error", error)
    study.tell(trial, state=TrialState.FAIL)
    log.warning(
        "study %s: trial %d failed: %s",
        study.study_name,
        trial.number,
        error,
        extra={"study": study.study_name, "trial": trial.number, "state": "failed"},
    )
    return TrialState.FAIL


def _log_end(study: optuna.Study, trial: optuna.Trial, result: TrainResult) -> None:
    state = "pruned" if result.pruned else "complete"
    log.info(
        "study %s: trial %d %s after %d epochs (%.1f s), value %.6g",
        study.study_name,
        trial.number,
        state,
        result.epochs_run,
        result.seconds,
        result.value,
        extra={
            "study": study.study_name,
            "trial": trial.number,
            "state": state,
            "value": result.value,
            "epochs": result.epochs_run,
        },
    )


def _log_taken_away(study: optuna.Study, trial: optuna.Trial) -> None:
    log.warning(
        "study %s: trial %d was failed as stale (its heartbeats were late) and is retried "
        "elsewhere; this worker stops training it",
        study.study_name,
        trial.number,
        extra={"study": study.study_name, "trial": trial.number, "state": "lost"},
    )


def fail_trials(
    study: optuna.Study, claims: list[Claim], exc: Exception
) -> list[TrialState | None]:
    """Fail claimed trials that could not start (their data could not be loaded, say) with
    the error; a trial taken away meanwhile is left alone."""
    outcomes: list[TrialState | None] = []
    for claim in claims:
        try:
            outcomes.append(_fail(study, claim.trial, exc))
        except optuna.exceptions.UpdateFinishedTrialError:
            outcomes.append(None)
    return outcomes


def _keep_best(
    session: Session,
    study: optuna.Study,
    context: TrialContext,
    finished: list[tuple[optuna.Trial, TrainResult]],
) -> None:
    """Offer the model files of complete trials to the study's best KEEP_BEST_MODELS, in
    the caller's transaction; a file is written only for a trial that is kept."""
    offered = [
        Weights(
            optuna_internals.trial_id(trial),
            trial.number,
            result.value,
            functools.partial(
                model_file, result, study=study.study_name, trial=trial.number, params=trial.params
            ),
        )
        for trial, result in finished
        if result.model is not None
    ]
    keep_best_models(
        session,
        context.study_id,
        offered,
        maximize=study.direction == optuna.study.StudyDirection.MAXIMIZE,
        keep=KEEP_BEST_MODELS,
    )


def hand_back(study: optuna.Study, trial: optuna.Trial, context: TrialContext) -> None:
    """Fail the trial and queue its retry in one step under the claim lock, so the budget
    never looks free in between; the retry resumes from the trial's checkpoint."""
    with context.store.claim(context.study_id):
        trial.set_user_attr("error", HANDED_BACK_ERROR)
        frozen = study.tell(trial, state=TrialState.FAIL)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, frozen)
    log.info(
        "study %s: trial %d checkpointed and handed back; its retry resumes it",
        study.study_name,
        trial.number,
        extra={"study": study.study_name, "trial": trial.number, "state": "handed_back"},
    )


@contextmanager
def keep_alive(
    study: optuna.Study, trials: list[optuna.Trial], store: Store | None = None
) -> Iterator[None]:
    """Record the trials' heartbeats every interval until the block ends, so a trial whose
    worker died is recognised as stale and retried; their claim recorded the first. One
    transaction beats for all of them through `store` (through Optuna's storage, trial by
    trial, without one). Trials that an enclosing block keeps alive (a worker's, around
    all it claimed) are left to it."""
    storage = optuna_internals.study_storage(study)
    keys = {(id(storage), optuna_internals.trial_id(t)) for t in trials}
    with _BEATING_LOCK:
        mine = keys - _BEATING
        _BEATING.update(mine)
    trial_ids = sorted(trial_id for _, trial_id in mine)
    stopped = threading.Event()

    def beat() -> None:
        if store is None:
            for trial_id in trial_ids:
                storage.record_heartbeat(trial_id)
            return
        with store.session(immediate=True) as session:
            record_heartbeats(session, trial_ids)

    def keep_beating() -> None:
        while not stopped.wait(heartbeat_interval_s()):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next one
                beat()

    thread = threading.Thread(target=keep_beating, name="heartbeats", daemon=True)
    try:
        if trial_ids:
            thread.start()
        yield
    finally:
        stopped.set()
        if thread.is_alive():
            thread.join()
        with _BEATING_LOCK:
            _BEATING.difference_update(mine)


def _record(writer: TrialWriter, result: TrainResult) -> None:
    """The results of a finished training, as user attributes that wait with the rest."""
    attrs: dict[str, Any] = {}
    if as_asked(writer.trial).user_attrs.get(
        "error"
    ):  # inherited from the failed trial this one retries
        attrs["error"] = None
    attrs |= result.val_metrics | result.test_metrics
    attrs["epochs"] = result.epochs_run
    attrs["best_epoch"] = result.best_epoch
    attrs["seconds"] = round(result.seconds, 3)
    attrs["diagnosis"] = diagnose(result)
    if result.resumed_from_epoch is not None:
        attrs["resumed_from_epoch"] = result.resumed_from_epoch
    # Compact: one row [epoch, train_loss, val_loss, value, lr, [grad norms]] per epoch.
    attrs["history"] = [list(row.values()) for row in result.history_rows()]
    writer.set_attrs(attrs)
