"""Recovering the trials of workers that died: find them, fail them, queue their retries.

A trial's retry has the same params and resumes from the newest checkpoint of the trials it
retries. What tells that a worker is gone: its process is certainly dead (`holders`), or
its trials' heartbeats are older than the grace period. Workers apply this at every claim,
and `hpsearch resume` at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from hpsearch.service import holders
from hpsearch.storage import (
    StudyClaim,
    grace_period_s,
    heartbeat_interval_s,
    optuna_internals,
)
from hpsearch.storage.engine import MAX_RETRIES
from hpsearch.storage.queries import RunningTrial, running_trials
from hpsearch.storage.store import Store

log = logging.getLogger(__name__)
WATCH_S = 0.5  # how often `recover` looks at the heartbeats it waits for


def holder_attrs() -> dict[str, str | None]:
    """The system attribute that names this process as a trial's holder, so that a process
    on the same machine can tell for sure when it died. One that cannot name itself (no
    /proc) clears the holder: a retry inherits the attributes of the trial it retries, and
    that trial's dead holder must not speak for this live process."""
    me = holders.this_process()
    return {holders.HOLDER_ATTR: None if me is None else me.as_attr()}


def reap_lost_trials(study: optuna.Study, claim: StudyClaim, grace_s: float) -> int:
    """Under the claim lock, fail the running trials whose worker is gone and queue their
    retries (same params, resumed from their checkpoints): at once when the holder is
    certainly dead (`hpsearch.service.holders`), else once no heartbeat came for `grace_s`. Returns
    how many."""
    lost: list[tuple[RunningTrial, str]] = []
    for trial in claim.running_trials(holders.HOLDER_ATTR):
        holder = holders.Holder.from_attr(trial.holder)
        if holder is not None and holder.certainly_dead():
            lost.append((trial, f"its worker {holder} has exited"))
        elif trial.beat_age_s is not None and trial.beat_age_s > grace_s:
            lost.append((trial, f"no heartbeat for {trial.beat_age_s:.0f} s"))
    return len(fail_and_retry(study, lost))


def fail_and_retry(study: optuna.Study, lost: list[tuple[RunningTrial, str]]) -> list[int]:
    """Fail these running trials as lost and queue their retries, as Optuna's
    `fail_stale_trials` does; returns the numbers of those failed here (a trial that ended
    meanwhile is left alone)."""
    storage = optuna_internals.study_storage(study)
    failed: list[RunningTrial] = []
    for trial, reason in lost:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(trial.trial_id, state=TrialState.FAIL):
                failed.append(trial)
                log.warning(
                    "study %s: trial %d is lost (%s); its retry is queued",
                    study.study_name,
                    trial.number,
                    reason,
                    extra={"study": study.study_name, "trial": trial.number, "state": "lost"},
                )
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    for trial in failed:
        retry(study, storage.get_trial(trial.trial_id))
    return [trial.number for trial in failed]


@dataclass(frozen=True)
class Recovery:
    """What `resume` did to a study's running trials, and what is left."""

    freed: int  # lost trials failed now, their retries queued
    running: list[RunningTrial]  # left running: their workers beat recently
    grace_s: float  # a running trial whose worker died counts as lost after this silence

    @property
    def lost_after_s(self) -> float | None:
        """Seconds until every trial left running counts as lost, if their workers are
        dead now: then any worker retries them."""
        ages = [t.beat_age_s or 0.0 for t in self.running]
        return max(0.0, self.grace_s - min(ages)) if ages else None


def recover(
    store: Store, study: optuna.Study, study_id: int, *, wait_for_silence: bool = False
) -> Recovery:
    """Free the running trials whose worker is gone: certainly dead, or silent for two
    heartbeats (a live worker beats every one). With `wait_for_silence` (the user knows
    their workers are dead), wait until each running trial has either beaten (its worker
    is alive: it keeps it) or been silent for two heartbeats (it is freed): at most two
    heartbeats, never the grace period."""
    silence_s = 2 * heartbeat_interval_s()
    started = time.monotonic()
    freed = 0
    while True:
        with store.claim(study_id) as claim:
            freed += reap_lost_trials(study, claim, silence_s)
            running = claim.running_trials(holders.HOLDER_ATTR)
        waited = time.monotonic() - started
        unproven = [t for t in running if t.beat_age_s is None or t.beat_age_s >= waited]
        if not wait_for_silence or not unproven or waited > silence_s + 1:
            return Recovery(freed, running, grace_period_s())
        time.sleep(WATCH_S)


def silent_trials(store: Store, study_id: int) -> list[RunningTrial]:
    """The study's running trials silent for two heartbeats or more: their workers are
    probably gone, and they will count as lost at the end of the grace period. A worker
    waits for those rather than leave the study unfinished."""
    silence_s = 2 * heartbeat_interval_s()
    with store.session() as session:
        running = running_trials(session, study_id, holders.HOLDER_ATTR)
    return [t for t in running if t.beat_age_s is None or t.beat_age_s >= silence_s]
