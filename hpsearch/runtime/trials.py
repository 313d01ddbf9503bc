"""Trials on a database: claim one within the budget, train it with heartbeats and
checkpoints, and tell how it ended (or hand it back). The embedded run
and the workers share these functions."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hpsearch.data.tensors import TensorData
from hpsearch.search.pruning import StudyPruning
from hpsearch.search.space import BUDGET_STATES, make_pruner, make_sampler, suggest_params
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
    LeaseLost,
    StudyClaim,
    TrialWrite,
    delete_checkpoints,
    grace_period_s,
    heartbeat_interval_s,
    keep_best_model,
    newest_checkpoint,
    optuna_internals,
    write_trial,
)
from hpsearch.storage.engine import MAX_RETRIES
from hpsearch.storage.optuna_internals import as_asked
from hpsearch.storage.queries import STATE_NAMES
from hpsearch.storage.store import Store
from hpsearch.training.fused import pack_key, train_pack
from hpsearch.training.train import EpochRecord, TrainResult, TrialConfig, checkpoint_history, train

log = logging.getLogger(__name__)
KEEP_BEST_MODELS = 5  # the trained weights of this many best trials per study are kept
WRITE_EVERY_S = 2.0  # a running trial's reports reach the database at least this often
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# (storage, trial id) of the trials whose heartbeats a `_heartbeat` block records now.
_BEATING: set[tuple[int, int]] = set()
_BEATING_LOCK = threading.Lock()


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
    """A new trial with its params chosen, or None when the study is not runnable (paused,
    cancelled, ...) or its budget is spent.

    Counting and creating happen under the study's claim lock, and the params are stored
    before the lock is released, so a parallel sampler sees them (constant liar). The budget
    is counted by the database, so a claim costs the same in a study of 10 or 10,000 trials.
    A grid study's budget is at most its grid's size (`effective_budget`). One whose grid is
    spent while its n_trials is larger is completed here once its trials have ended: its
    budget may have been raised after the last of them ended, and no trial would end again
    to complete it.
    """
    with store.claim(state.id) as claim:
        if claim.record.state not in RUNNABLE_STATES:
            return None
        n_trials = claim.record.n_trials
        budget = effective_budget(state.spec, n_trials)
        claimed = _claim_within_budget(study, state, claim, budget)
        first = claim.record.state == "queued"
    # Outside the lock: on PostgreSQL it is a lock on the study's row, which these update.
    if claimed is None:
        if budget < n_trials:
            mark_completed_if_done(store, state)
        return None
    if first:
        mark_running(store, state.id)
    return claimed


def _claim_within_budget(
    study: optuna.Study, state: StudyState, claim: StudyClaim, budget: int
) -> Claim | None:
    """Under the claim lock: a new trial, or a waiting retry (which holds budget already),
    unless the trials that count against the budget fill it."""
    claim.beat_for_orphans()
    recovery.reap_lost_trials(study, claim, grace_period_s())  # their retries wait in the queue
    counts = claim.trial_counts()
    used = sum(counts.get(STATE_NAMES[s], 0) for s in BUDGET_STATES)
    retry_waiting = counts.get(STATE_NAMES[TrialState.WAITING], 0) > 0
    if not retry_waiting and used >= budget:
        return None
    trial = study.ask()  # a waiting retry first, with its params (and grid point)
    # A first heartbeat at once: a trial orphaned by a crash right after this point still
    # goes stale and is retried, instead of holding budget for ever.
    optuna_internals.study_storage(study).record_heartbeat(optuna_internals.trial_id(trial))
    recovery.record_holder(study, trial)
    return Claim.of(trial, state.spec)


@dataclass(frozen=True)
class TrialContext:
    """What a worker adds to a trial: where its writes go, its study's pruning, and a signal
    to stop early."""

    store: Store
    study_id: int
    pruning: StudyPruning
    # Set (by SIGTERM or Ctrl-C) to checkpoint at the end of the epoch and hand the trial back.
    stop: threading.Event = field(default_factory=threading.Event)


class TrialHandedBack(Exception):
    """The trial was checkpointed and handed back for another worker to resume."""


class TrialWriter:
    """What is written to one running trial: its reported epochs, user attributes and
    checkpoints.

    For a worker, reports and attributes wait in memory and go with the trial's next
    checkpoint, its results, or the first report `WRITE_EVERY_S` after the last write: one
    lease-checked transaction each (`storage.write_trial`), where Optuna commits every value
    on its own. The pruner reads the trial's own values from memory, so it decides on every
    epoch all the same. A crash loses only writes that a retry makes again: it resumes from
    the newest checkpoint and re-reports that checkpoint's epochs. Without a worker's
    context (a plain `study.optimize`), everything goes through Optuna at once.
    """

    def __init__(self, trial: optuna.Trial, context: TrialContext | None) -> None:
        self.trial = trial
        self.context = context
        self._reports: dict[int, float] = {}
        self._attrs: dict[str, Any] = {}
        self._system_attrs: dict[str, Any] = {}
        self._written_at = time.monotonic()

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
        if time.monotonic() - self._written_at >= WRITE_EVERY_S:
            self.write()

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

    def write(self, checkpoint: tuple[int, bytes] | None = None) -> None:
        """Write what waits, with `checkpoint` (epoch, payload), in one transaction; raise
        LeaseLost once the trial was taken away. Immediate on SQLite, whose deferred
        transactions cannot turn from reading to writing under load."""
        context = self.context
        if context is None:
            return
        change = TrialWrite(
            dict(self._reports), dict(self._attrs), dict(self._system_attrs), checkpoint
        )

        def write() -> None:
            with context.store.session(immediate=True) as session:
                write_trial(
                    session,
                    study_id=context.study_id,
                    trial_id=optuna_internals.trial_id(self.trial),
                    trial_number=self.trial.number,
                    write=change,
                )

        context.store.retrying(write)
        self._reports.clear()
        self._attrs.clear()
        self._system_attrs.clear()
        self._written_at = time.monotonic()

    def write_before_failing(self) -> None:
        """Write what waits when training raised: the failed trial keeps the epochs it
        reported before the error, for whoever looks into it. A trial taken away meanwhile
        is left alone."""
        with contextlib.suppress(LeaseLost):
            self.write()


def objective(
    trial: optuna.Trial, spec: StudySpec, data: TensorData, context: TrialContext | None = None
) -> float:
    """Train the trial's network and return its objective; usable with `study.optimize`.

    Raises `optuna.TrialPruned` when the pruner says so; the results are recorded as user
    attributes either way.
    """
    result = train_trial(Claim.of(trial, spec), spec, data, context)
    if result.pruned:
        raise optuna.TrialPruned(f"pruned at epoch {result.epochs_run}")
    return result.value


def train_trial(
    claim: Claim, spec: StudySpec, data: TensorData, context: TrialContext | None = None
) -> TrainResult:
    """Train the trial's network, reporting every epoch, and record the results.

    With a worker's `context`, a retried trial resumes from the newest checkpoint of the
    trial it retries (re-reporting that history so pruners see it), checkpoints are written
    as it trains, and a set `context.stop` checkpoints and raises TrialHandedBack.
    """
    trial = claim.trial
    writer = TrialWriter(trial, context)
    resume_from = _checkpoint_to_resume(trial, context) if context else None
    if context is not None:
        _begin(writer, data, resume_from)

    def report(record: EpochRecord) -> bool:
        writer.report(record.value, record.epoch)
        return writer.should_prune()

    def save(payload: bytes, epoch: int) -> None:
        writer.write(checkpoint=(epoch, payload))

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
        writer.write_before_failing()
        raise
    if result.interrupted:
        raise TrialHandedBack
    _record(writer, result)
    return result


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
    try:
        with _heartbeat(study, trial):
            result = train_trial(claim, spec, data, context)
        return _tell(study, trial, result, context)
    except TrialHandedBack:
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
    reported, pruned, checkpointed, resumed and told as `run_trial` does it alone; a
    member is told the moment it leaves the pack."""
    pack = _PackRun(study, claims, context)
    resume_from = [_checkpoint_to_resume(c.trial, context) for c in claims]
    for writer, payload in zip(pack.writers, resume_from, strict=True):
        _begin(writer, data, payload)
    try:
        with keep_alive(study, pack.trials):
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
            )
    except DATABASE_ERRORS:
        raise
    except Exception as exc:  # fail the members still training; the worker goes on
        pack.fail_the_rest(exc)
    return pack.outcomes


class _PackRun:
    """The members of a pack as they train: each one's writer and outcome, and the members
    failed as stale elsewhere (`lost`), which are never written to again."""

    def __init__(self, study: optuna.Study, claims: list[Claim], context: TrialContext) -> None:
        self.study = study
        self.context = context
        self.trials = [c.trial for c in claims]
        self.writers = [TrialWriter(t, context) for t in self.trials]
        self.outcomes: list[TrialState | None] = [None] * len(claims)
        self.lost: set[int] = set()

    def report(self, i: int, record: EpochRecord) -> bool:
        if i not in self.lost:
            try:
                self.writers[i].report(record.value, record.epoch)
                return self.writers[i].should_prune()
            except LeaseLost:
                self._lose(i)
        return False

    def save(self, i: int, payload: bytes, epoch: int) -> None:
        if i not in self.lost:
            try:
                self.writers[i].write(checkpoint=(epoch, payload))
            except LeaseLost:
                self._lose(i)

    def done(self, i: int, result: TrainResult) -> None:
        if i in self.lost:
            return
        if result.interrupted:
            hand_back(self.study, self.trials[i], self.context)
            return
        try:
            _record(self.writers[i], result)
            self.outcomes[i] = _tell(self.study, self.trials[i], result, self.context)
        except (LeaseLost, optuna.exceptions.UpdateFinishedTrialError):
            self._lose(i)

    def fail_the_rest(self, exc: Exception) -> None:
        for i, trial in enumerate(self.trials):
            if self.outcomes[i] is None and i not in self.lost:
                self.writers[i].write_before_failing()
                self.outcomes[i] = _fail(self.study, trial, exc)

    def _lose(self, i: int) -> None:
        self.lost.add(i)
        _log_taken_away(self.study, self.trials[i])


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


@contextmanager
def keep_alive(study: optuna.Study, trials: list[optuna.Trial]) -> Iterator[None]:
    """Heartbeats for every trial until the block ends: claimed trials waiting for their
    turn must not look abandoned."""
    with contextlib.ExitStack() as beats:
        for trial in trials:
            beats.enter_context(_heartbeat(study, trial))
        yield


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


def _tell(
    study: optuna.Study, trial: optuna.Trial, result: TrainResult, context: TrialContext | None
) -> TrialState:
    """Tell how a training ended; then, in one transaction, keep the weights if the trial is
    among the best and drop its checkpoints."""
    if result.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, result.value)
    _log_end(study, trial, result)
    if context is not None:
        if not result.pruned:
            curve = {r.epoch: r.value for r in result.history}
            context.pruning.completed_here(optuna_internals.trial_id(trial), curve)
        keep = not result.pruned and result.model is not None
        _keep_and_forget(study, trial, result if keep else None, context)
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


def _keep_and_forget(
    study: optuna.Study, trial: optuna.Trial, kept: TrainResult | None, context: TrialContext
) -> None:
    """Store the weights of `kept` (the best KEEP_BEST_MODELS of the study stay) and delete
    the checkpoints of the trial and of those it retried, in one transaction. Optuna is
    asked first: on SQLite its connection would wait for this immediate transaction."""
    trial_ids = [optuna_internals.trial_id(trial), *_retried_trial_ids(trial)]
    with context.store.session(immediate=True) as session:
        if kept is not None and (model := kept.model) is not None:
            keep_best_model(
                session,
                study_id=context.study_id,
                trial_id=optuna_internals.trial_id(trial),
                trial_number=trial.number,
                value=kept.value,
                payload=lambda: _weights(model),
                maximize=study.direction == optuna.study.StudyDirection.MAXIMIZE,
                keep=KEEP_BEST_MODELS,
            )
        delete_checkpoints(session, trial_ids)


def _weights(model: torch.nn.Module) -> bytes:
    """A network's weights on the CPU, as `torch.load(weights_only=True)` reads them."""
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


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
def _heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat every interval until the block ends, so a trial whose
    worker died is recognised as stale and retried; its claim (`claim_trial`) recorded the
    first. Inside an enclosing block for the same trial (a worker's `keep_alive`), the
    enclosing one's beats suffice."""
    storage = optuna_internals.study_storage(study)
    key = (id(storage), optuna_internals.trial_id(trial))
    with _BEATING_LOCK:
        nested = key in _BEATING
        _BEATING.add(key)
    if nested:
        yield
        return
    stopped = threading.Event()

    def beat() -> None:
        while not stopped.wait(heartbeat_interval_s()):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next one
                storage.record_heartbeat(optuna_internals.trial_id(trial))

    try:
        thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stopped.set()
            thread.join()
    finally:
        with _BEATING_LOCK:
            _BEATING.discard(key)


def _record(writer: TrialWriter, result: TrainResult) -> None:
    """Write the results of a finished training with the reports still waiting."""
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
    writer.write()
