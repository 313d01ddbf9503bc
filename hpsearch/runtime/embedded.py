"""The embedded mode: `hpsearch run` on one machine, one database, N local workers.

One worker trains in this process: the command pays its start-up once. Several are
processes, not threads (training holds the GIL between kernels, and a process per worker
keeps a crash or an out-of-memory in one trial away from the others); they are forked from
a server that imported the training code once (`worker.worker_processes`), instead of each
importing it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import optuna

from hpsearch.errors import HpsearchError, Interrupted
from hpsearch.logs import LogSettings
from hpsearch.runtime.trials import FINISHED_STATES
from hpsearch.runtime.worker import Worker, WorkerOptions, worker_processes
from hpsearch.service.studies import StudyState
from hpsearch.signals import started, stop_on_signals, stopping
from hpsearch.storage import DATABASE_ERRORS, StorageError
from hpsearch.storage.db import is_transient
from hpsearch.storage.queries import STATE_NAMES, best_values, trial_counts
from hpsearch.storage.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyProgress:
    finished: int
    running: int
    best: float | None


def run_workers(
    state: StudyState,
    store: Store,
    jobs: int,
    devices: list[str],
    on_progress: Callable[[StudyProgress], None],
    poll_s: float = 0.5,
    pack: int | None = None,
) -> list[int]:
    """Run `jobs` workers on the study, showing its progress, until they are done.

    Returns the workers' exit codes. Ctrl-C (SIGINT) or SIGTERM stops the workers, which
    checkpoint their running trials and hand them back; once they have, Interrupted is
    raised. Running again resumes the trials handed back.
    """
    timeout_s = state.spec.budget.timeout_s
    options = [
        WorkerOptions(
            store,
            device,
            studies=(state.name,),
            idle_exit_s=0,
            deadline=None if timeout_s is None else time.time() + timeout_s,
            pack=pack,
            threads=max(1, len(os.sched_getaffinity(0)) // jobs),
            logs=LogSettings("warning"),  # the progress bar tells the rest
        )
        for device in devices[:jobs]
    ]
    show = _progress_reader(on_progress, store, state)
    with _polled(show, poll_s):
        codes, received = _run_here(options[0]) if jobs == 1 else _run_apart(options)
    if received:
        raise Interrupted(received[0])
    return codes


def _run_here(options: WorkerOptions) -> tuple[list[int], list[int]]:
    """One worker in this process; its exit code and the signals that stopped it."""
    options.logs.apply()
    worker = Worker(options)
    with stopping(worker.stop) as received:
        code = _served(worker, 0)
    return [code], received


def _run_apart(options: list[WorkerOptions]) -> tuple[list[int], list[int]]:
    """A worker process per options; their exit codes and the signals passed on to them."""
    context = worker_processes()
    workers = [
        context.Process(target=_worker_main, args=(option, i), name=f"hpsearch-worker-{i}")
        for i, option in enumerate(options)
    ]
    with started(workers) as received:
        for worker in workers:
            worker.join()  # blocks until it exits: no poll, no sleep
    return [w.exitcode if w.exitcode is not None else 1 for w in workers], received


@contextlib.contextmanager
def _polled(show: Callable[[], None], every_s: float) -> Iterator[None]:
    """Call `show` every `every_s` seconds in a thread while the block runs, and once after."""
    done = threading.Event()

    def poll() -> None:
        while not done.wait(every_s):
            try:
                show()
            except Exception:  # the last call, in the caller's thread, raises it
                return

    thread = threading.Thread(target=poll, name="hpsearch-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        show()


def _progress_reader(
    on_progress: Callable[[StudyProgress], None], store: Store, state: StudyState
) -> Callable[[], None]:
    """Show the study's progress; while the database cannot be reached, the workers wait
    for it, and so does the progress bar."""
    maximize = state.spec.objective.direction == "maximize"

    def show() -> None:
        try:
            on_progress(read_progress(store, state.optuna_study_id, maximize))
        except DATABASE_ERRORS as exc:
            if not is_transient(exc):
                raise

    return show


def read_progress(store: Store, optuna_study_id: int | None, maximize: bool) -> StudyProgress:
    """Counts and the best value, aggregated by the database: polled twice a second, so it
    must not load the study's trials."""
    with store.session() as session:
        counts = trial_counts(session, [optuna_study_id]).get(optuna_study_id, {})
        low_high = best_values(session, [optuna_study_id]).get(optuna_study_id)
    return StudyProgress(
        finished=sum(counts.get(STATE_NAMES[s], 0) for s in FINISHED_STATES),
        running=counts.get(STATE_NAMES[optuna.trial.TrialState.RUNNING], 0),
        best=None if low_high is None else low_high[1 if maximize else 0],
    )


def _worker_main(options: WorkerOptions, index: int) -> None:
    """A worker process serving the one study until its budget is claimed, the deadline
    passes, or Ctrl-C (which checkpoints the running trial and hands it back)."""
    options.logs.apply()
    worker = Worker(options)
    stop_on_signals(worker.stop)
    raise SystemExit(_served(worker, index))


def _served(worker: Worker, index: int) -> int:
    """The worker's exit code; what stopped it early is one logged line, not a traceback,
    and the caller says the run failed."""
    try:
        return worker.run()
    except (HpsearchError, StorageError) as exc:
        log.error("worker %d stopped: %s", index, exc, extra={"worker": index})
        return 2
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("worker %d stopped: %s", index, reason, extra={"worker": index})
        return 1
