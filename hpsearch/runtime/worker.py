"""A worker: claims trials of runnable studies from the database and trains them.

Any number of workers, on any number of nodes, share a database. A worker registers itself
(host, pid, device, heartbeat, current trial), serves the runnable studies in turn so that
none starves, keeps each study's data loaded across trials, and on SIGTERM or SIGINT
checkpoints its running trial, hands it back for another worker to resume, and exits 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import optuna
import torch
from sqlalchemy.exc import NoResultFound

from hpsearch.data import memory
from hpsearch.data.facts import DataFacts, inspect_dataset
from hpsearch.data.tensors import TensorData, load_dataset
from hpsearch.errors import HpsearchError
from hpsearch.logs import LogSettings
from hpsearch.runtime.trials import (
    Claim,
    TrialContext,
    as_asked,
    claim_trials,
    fail_trials,
    keep_alive,
    open_study,
    packs,
    run_pack,
    run_trial,
)
from hpsearch.search.pruning import StudyPruning
from hpsearch.service.datasets import StoredUploads
from hpsearch.service.recovery import silent_trials
from hpsearch.service.studies import (
    StudyState,
    fail_if_failing,
    fail_study,
    mark_completed_if_done,
    runnable_studies,
)
from hpsearch.signals import StopEvent, started, stop_on_signals
from hpsearch.storage import DATABASE_ERRORS, heartbeat_interval_s, records, safe_url
from hpsearch.storage.db import is_transient
from hpsearch.storage.engine import driver_reason
from hpsearch.storage.optuna_internals import FIXED_PARAMS
from hpsearch.storage.queries import optuna_study_id
from hpsearch.storage.store import Store

T = TypeVar("T")
log = logging.getLogger("hpsearch.runtime.worker")

IDLE_POLL_S = 2.0
# Imported once by the server that worker processes are forked from (`worker_processes`).
FORKSERVER_PRELOAD = ("hpsearch.runtime.worker", "torch._dynamo")
RECONNECT_S = 1.0  # between attempts to reach a database that is down
WAITING_MESSAGE_S = 5.0  # how often a worker waiting for its database says so


@dataclass
class WorkerOptions:
    store: Store
    device: str = "cpu"
    studies: tuple[str, ...] = ()  # names to serve; empty = every runnable study
    max_trials: int | None = None
    idle_exit_s: float | None = None  # stop after this long with nothing to claim
    deadline: float | None = None  # a time.time() after which no trial is started
    # Trials trained together as one fused network; None: on a GPU as many as its free
    # memory holds (`memory.gpu_pack`), on a CPU one.
    pack: int | None = None
    compiled: bool = False  # a pack's step through torch.compile (`train_pack`'s `compiled`)
    # CPU threads for training; None = torch's default, one per core, which several workers
    # on one host would each take, slowing all of them down.
    threads: int | None = None
    logs: LogSettings = field(default_factory=LogSettings)  # for worker processes it starts

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


class Stopped(Exception):
    """The worker was stopped while it waited for the database."""


@dataclass
class Worker:
    """One worker process's loop; `run` returns the process's exit code.

    Nothing about one study stops the worker: a trial that raises is failed with its error
    (`hpsearch.runtime.trials.run_trial`); a study whose trials keep failing, or that cannot be
    opened, claimed from or trained, is failed with the reason (`_guarded`), and the worker
    serves the others. A database that cannot be reached is waited for, at start and later;
    only an error that waiting cannot cure (a bad URL, a refused login) ends the worker.
    """

    options: WorkerOptions
    stop: StopEvent = field(default_factory=StopEvent)  # set by SIGINT and SIGTERM
    _studies: dict[int, optuna.Study] = field(default_factory=dict)
    _pruning: dict[int, StudyPruning] = field(default_factory=dict)
    _facts: dict[int, DataFacts] = field(default_factory=dict)  # sizes packs on a GPU
    _turn: int = 0
    _worker_id: int | None = None
    _finished: threading.Event = field(default_factory=threading.Event)
    _busy: bool = False
    _waiting_for: list[int] = field(default_factory=list)  # silent trials last told of

    @property
    def store(self) -> Store:
        return self.options.store

    def run(self) -> int:
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        try:
            self._wait_for_database(self._connect)
        except Stopped:
            return 0
        log.info(
            "worker %s started on %s, database %s, serving %s",
            self._worker_id,
            self.options.device,
            safe_url(self.store.url),
            ", ".join(self.options.studies) or "every runnable study",
            extra={"worker_id": self._worker_id, "device": self.options.device},
        )
        beating = threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True)
        beating.start()
        try:
            return self._loop()
        finally:
            self._finished.set()
            beating.join()
            with contextlib.suppress(*DATABASE_ERRORS):  # its heartbeat stops all the same
                self._set(state="stopped", current_study_id=None, current_trial_number=None)

    def _connect(self) -> None:
        self.store.migrate()
        self._register()

    def _wait_for_database(self, step: Callable[[], T]) -> T:
        """`step()`, run again for as long as the database cannot be reached, with a message
        every few seconds; Stopped when the worker is stopped meanwhile. Errors that waiting
        cannot cure are raised."""
        waiting_since = said_at = None
        while True:
            try:
                result = step()
            except DATABASE_ERRORS as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                waiting_since = waiting_since or now
                if said_at is None or now - said_at >= WAITING_MESSAGE_S:
                    log.warning(
                        "waiting for the database at %s (%.0f s so far): %s",
                        safe_url(self.store.url),
                        now - waiting_since,
                        driver_reason(exc),
                    )
                    said_at = now
                if self.stop.wait(RECONNECT_S):
                    raise Stopped from None
                continue
            if waiting_since is not None:
                log.warning("the database is back after %.0f s", time.monotonic() - waiting_since)
            return result

    def _beat(self) -> None:
        """Keep this worker's row alive while it trains, so `GET /workers` can tell."""
        while not self._finished.wait(heartbeat_interval_s()):
            with contextlib.suppress(Exception):  # the next beat tries again
                self._set()

    def _loop(self) -> int:
        done = 0
        idle_since = time.monotonic()
        while not self.stop.is_set() and not self._past_deadline():
            try:
                trained = self._wait_for_database(self._step)
            except Stopped:
                break
            if not trained:
                if self._idle_too_long(idle_since) and not self._lost_trials_coming():
                    log.info("exiting: nothing to claim for %.0f s", self.options.idle_exit_s)
                    return 0
                self.stop.wait(IDLE_POLL_S)
                continue
            done += trained
            if self.options.max_trials is not None and done >= self.options.max_trials:
                log.info("exiting: %d trials trained (--max-trials)", done)
                return 0
            idle_since = time.monotonic()
        log.info("exiting: %s", "stopped by a signal" if self.stop.is_set() else "deadline passed")
        return 0

    def _step(self) -> int:
        """Claim and train the next trials; how many were claimed (0: nothing to claim)."""
        claimed = self._claim()
        if claimed is None:
            self._idle()
            return 0
        self._run(*claimed)
        return len(claimed[2])

    def _claim(self) -> tuple[StudyState, optuna.Study, list[Claim]] | None:
        """Trials of the next runnable study in turn (up to the pack size, fewer when its
        budget runs out): the turn rotates so every study gets trials while several share
        the workers."""
        candidates = self._runnable()
        for offset in range(len(candidates)):
            state = candidates[(self._turn + offset) % len(candidates)]
            with self._guarded(state):
                study = self._study(state)
                claim = functools.partial(
                    claim_trials, study, state, self.store, self._pack_size(state)
                )
                claims: list[Claim] = self.store.retrying(claim)
                if claims:
                    self._turn = (self._turn + offset + 1) % len(candidates)
                    _log_claim(state, [c.trial for c in claims])
                    return state, study, claims
        return None

    @contextlib.contextmanager
    def _guarded(self, state: StudyState) -> Iterator[None]:
        """Whatever goes wrong with this study fails the study with the reason, and the
        worker goes on with the others. A database that cannot be reached is the caller's
        to wait for; another database error skips the study this turn (it may be a race)."""
        try:
            yield
        except NoResultFound:  # deleted since it was listed: nothing left to fail
            self._forget(state.id)
        except DATABASE_ERRORS as exc:
            if is_transient(exc):
                raise
            log.warning(
                "study %s skipped this turn: %s",
                state.name,
                driver_reason(exc),
                extra={"study": state.name},
            )
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, KeyError) and not self._optuna_study_exists(state):
                reason = "its Optuna study was deleted outside hpsearch"
            self._give_up(state, reason)

    def _give_up(self, state: StudyState, reason: str) -> None:
        self._forget(state.id)
        store = self.store
        if store.retrying(functools.partial(fail_study, store, state.id, reason)):
            log.warning("study %s failed: %s", state.name, reason, extra={"study": state.name})

    def _optuna_study_exists(self, state: StudyState) -> bool:
        with self.store.session() as session:
            return optuna_study_id(session, state.name) is not None

    def _forget(self, study_id: int) -> None:
        self._studies.pop(study_id, None)
        self._pruning.pop(study_id, None)
        self._facts.pop(study_id, None)

    def _pack_size(self, state: StudyState) -> int:
        """Trials to claim at once: --pack; else on a GPU as many as its free memory holds
        (`memory.gpu_pack`), on a CPU one; never more than --max-trials."""
        size = self.options.pack or self._gpu_pack(state)
        if self.options.max_trials is not None:
            size = min(size, self.options.max_trials)
        return size

    def _gpu_pack(self, state: StudyState) -> int:
        if not self.options.on_gpu:
            return 1
        try:
            if state.id not in self._facts:
                self._facts[state.id] = inspect_dataset(state.spec, StoredUploads(self.store))
        except DATABASE_ERRORS:
            raise
        except Exception:  # the data's own error fails the trial that loads it
            return 1
        estimate = memory.estimate(state.spec, self._facts[state.id])
        return memory.gpu_pack(estimate, free_device_bytes(self.options.device), state.n_trials)

    def _pack_bytes(self, estimate: memory.MemoryEstimate) -> float:
        """The device memory one pack may take: on a GPU the share of what is free now that
        `memory.gpu_pack` sized the claim by, plus the data set, loaded there since; on a
        CPU the limit of one trial (HPSEARCH_MAX_TRIAL_GB)."""
        if not self.options.on_gpu:
            return memory.max_trial_bytes()
        free = free_device_bytes(self.options.device)
        return free * memory.GPU_PACK_SHARE + estimate.data

    def _runnable(self) -> list[StudyState]:
        find = functools.partial(runnable_studies, self.store, self.options.studies)
        return self.store.retrying(find)

    def _study(self, state: StudyState) -> optuna.Study:
        if state.id not in self._studies:
            study = open_study(state, self.store)
            self._studies[state.id] = study
            self._pruning[state.id] = StudyPruning(self.store, study, state.spec)
        return self._studies[state.id]

    def _run(
        self, state: StudyState, study: optuna.Study, claims: list[Claim]
    ) -> list[optuna.trial.TrialState | None]:
        """Train the claimed trials: those of one architecture as fused packs (as many as
        fit the device memory a trial may take), the others alone, all kept alive by
        heartbeats until their turn comes. Data that cannot be loaded fails them."""
        first = claims[0].trial.number
        self._set(state="busy", current_study_id=state.id, current_trial_number=first)
        self._busy = True
        outcomes: list[optuna.trial.TrialState | None] = []
        with self._guarded(state):
            try:
                data = load_dataset(state.spec, self.options.device, StoredUploads(self.store))
            except DATABASE_ERRORS:
                raise
            except Exception as exc:
                outcomes = fail_trials(study, claims, exc)
            else:
                outcomes = self._train(state, study, claims, data)
        if optuna.trial.TrialState.FAIL in outcomes:
            reason = self.store.retrying(lambda: fail_if_failing(self.store, state))
            if reason is not None:
                self._forget(state.id)
                log.warning("study %s failed: %s", state.name, reason, extra={"study": state.name})
        self.store.retrying(lambda: mark_completed_if_done(self.store, state))
        return outcomes

    def _train(
        self, state: StudyState, study: optuna.Study, claims: list[Claim], data: TensorData
    ) -> list[optuna.trial.TrialState | None]:
        context = TrialContext(
            self.store, state.id, self._pruning[state.id], self.stop, self.options.compiled
        )
        estimate = memory.estimate(state.spec, data.facts)
        largest = memory.largest_pack(estimate, self._pack_bytes(estimate))
        outcomes: list[optuna.trial.TrialState | None] = []
        try:
            with keep_alive(study, [c.trial for c in claims], self.store):
                for group in packs(claims, largest):
                    if len(group) == 1:
                        outcomes.append(run_trial(study, group[0], state.spec, data, context))
                    else:
                        outcomes += run_pack(study, group, state.spec, data, context)
        except DATABASE_ERRORS as exc:
            log.warning(
                "study %s: lost the database during trials %s (%s); they will be retried "
                "from their checkpoints",
                state.name,
                [c.trial.number for c in claims],
                driver_reason(exc),
                extra={"study": state.name, "trials": [c.trial.number for c in claims]},
            )
        return outcomes

    def _idle(self) -> None:
        """Show the worker idle once nothing is left to claim (not between two trials: that
        would cost every trial a write)."""
        if self._busy:
            self._set(state="idle", current_study_id=None, current_trial_number=None)
            self._busy = False
            log.info("idle: no trial to claim")

    def _lost_trials_coming(self) -> bool:
        """Whether a study this worker serves has running trials whose heartbeats stopped:
        their workers died, and their retries will be claimable at the end of the grace
        period. Exiting idle before then would leave the study unfinished."""
        for state in self._runnable():
            if state.optuna_study_id is None:
                continue
            silent = self.store.retrying(
                functools.partial(silent_trials, self.store, state.optuna_study_id)
            )
            if silent and self._waiting_for != (numbers := [t.number for t in silent]):
                self._waiting_for = numbers  # said once, not at every poll
                log.info(
                    "study %s: waiting for trial(s) %s, silent for %.0f s, to count as lost",
                    state.name,
                    ", ".join(str(t.number) for t in silent),
                    min(t.beat_age_s or 0.0 for t in silent),
                    extra={"study": state.name, "trials": numbers},
                )
            if silent:
                return True
        return False

    def _past_deadline(self) -> bool:
        return self.options.deadline is not None and time.time() >= self.options.deadline

    def _idle_too_long(self, since: float) -> bool:
        limit = self.options.idle_exit_s
        return limit is not None and time.monotonic() - since >= limit

    def _register(self) -> None:
        with self.store.session() as session:
            record = records.add_worker(
                session, host=socket.gethostname(), pid=os.getpid(), device=self.options.device
            )
            self._worker_id = record.id

    def _set(self, **values: object) -> None:
        """Update this worker's row; the heartbeat moves with every update."""

        def write() -> None:
            with self.store.session() as session:
                records.update_worker(session, self._worker_id, **values)

        self.store.retrying(write)


def _log_claim(state: StudyState, trials: list[optuna.Trial]) -> None:
    """Which trials were claimed, and which of them retry a trial that did not finish."""
    numbers = [trial.number for trial in trials]
    log.info(
        "study %s: claimed trial%s %s",
        state.name,
        "s" if len(numbers) > 1 else "",
        ", ".join(map(str, numbers)),
        extra={"study": state.name, "trials": numbers},
    )
    for trial in trials:
        system_attrs = as_asked(trial).system_attrs
        retried = system_attrs.get("failed_trial")
        if retried is not None:
            log.info(
                "study %s: trial %d retries trial %d from its newest checkpoint",
                state.name,
                trial.number,
                retried,
                extra={"study": state.name, "trial": trial.number, "retries": retried},
            )
        elif FIXED_PARAMS in system_attrs:
            log.info(
                "study %s: trial %d trains an enqueued configuration",
                state.name,
                trial.number,
                extra={"study": state.name, "trial": trial.number, "enqueued": True},
            )


def free_device_bytes(device: str) -> float:
    """What a new pack can take on a CUDA device: the memory free there, plus what torch's
    allocator holds for reuse but no tensor uses."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def resolve_devices(device: str, jobs: int = 1) -> list[str]:
    """The device of each of `jobs` workers: `auto` and `cuda` spread them over the GPUs;
    `all` means one worker per visible GPU."""
    n_gpus = torch.cuda.device_count()
    if device == "all":
        if n_gpus == 0:
            raise HpsearchError("--device all: no CUDA device is visible on this machine")
        return [f"cuda:{i}" for i in range(n_gpus)]
    if device == "auto":
        device = "cuda" if n_gpus else "cpu"
    if device == "cpu":
        return ["cpu"] * jobs
    if not device.startswith("cuda"):
        raise HpsearchError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or all")
    if n_gpus == 0:
        raise HpsearchError(f"--device {device}: no CUDA device is visible on this machine")
    if device == "cuda":
        return [f"cuda:{i % n_gpus}" for i in range(jobs)]
    index = device.removeprefix("cuda:")
    if not index.isdigit() or int(index) >= n_gpus:
        raise HpsearchError(f"--device {device}: this machine has cuda:0 to cuda:{n_gpus - 1}")
    return [device] * jobs


def run_worker_processes(options: WorkerOptions, devices: list[str]) -> int:
    """One worker per device: in this process for one device, else a process each (one per
    GPU), with SIGTERM and SIGINT passed on. Returns the worst exit code."""
    if len(devices) == 1:
        worker = Worker(dataclasses.replace(options, device=devices[0]))
        stop_on_signals(worker.stop)
        return worker.run()
    context = worker_processes()
    processes = [
        context.Process(
            target=_worker_process,
            args=(dataclasses.replace(options, device=device),),
            name=f"hpsearch-worker-{device}",
        )
        for device in devices
    ]
    with started(processes):
        for process in processes:
            process.join()
    return max(process.exitcode or 0 for process in processes)


def worker_processes() -> multiprocessing.context.BaseContext:
    """How worker processes start: forked from a server process that has imported the
    training code once (torch, scikit-learn, and what torch loads at a first optimiser
    step), so each new worker starts in milliseconds instead of seconds of imports. The
    server is started, single-threaded and before any CUDA call, the first time a worker
    starts, so forking it is safe where forking this process (threads, maybe CUDA) is not.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return context


def _worker_process(options: WorkerOptions) -> None:
    options.logs.apply()
    worker = Worker(options)
    stop_on_signals(worker.stop)
    raise SystemExit(worker.run())
