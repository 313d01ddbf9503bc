"""The embedded mode: one machine, N local worker processes, one database file.

Workers are processes, not threads: training holds the GIL between kernels, and a process
per worker keeps a crash or an out-of-memory in one trial away from the others.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from hpsearch.errors import HpsearchError, Interrupted
from hpsearch.logs import LogSettings
from hpsearch.service import StudyState
from hpsearch.signals import started, stop_on_signals
from hpsearch.study import FINISHED_STATES
from hpsearch.worker import Worker, WorkerOptions
from storage import DATABASE_ERRORS, StorageError, optuna_storage, session_scope
from storage.db import is_transient
from storage.queries import STATE_NAMES, best_values, trial_counts


@dataclass(frozen=True)
class StudyProgress:
    finished: int
    running: int
    best: float | None


def run_workers(
    state: StudyState,
    url: str,
    jobs: int,
    devices: list[str],
    on_progress: Callable[[StudyProgress], None],
    poll_s: float = 0.5,
    pack: int | None = None,
) -> list[int]:
    """Start `jobs` worker processes on the study and poll its progress until they exit.

    Returns the workers' exit codes. Ctrl-C (SIGINT) or SIGTERM is passed on to the
    workers, which checkpoint their running trials, hand them back and stop; once they have,
    Interrupted is raised. Running again resumes the trials handed back.
    """
    timeout_s = state.spec.budget.timeout_s
    deadline = None if timeout_s is None else time.time() + timeout_s
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker_main,
            args=(state, url, devices[i], i, threads, deadline, pack),
            name=f"hpsearch-worker-{i}",
        )
        for i in range(jobs)
    ]
    study = optuna.load_study(study_name=state.name, storage=optuna_storage(url))
    with started(workers) as received:
        try:
            while any(w.is_alive() for w in workers):
                _show_progress(on_progress, url, study)
                time.sleep(poll_s)
        finally:
            for worker in workers:
                worker.join()
            _show_progress(on_progress, url, study)
    if received:
        raise Interrupted(received[0])
    return [w.exitcode if w.exitcode is not None else 1 for w in workers]


def _show_progress(
    on_progress: Callable[[StudyProgress], None], url: str, study: optuna.Study
) -> None:
    """Show the study's progress; while the database cannot be reached, the workers wait
    for it, and so does the progress bar."""
    try:
        on_progress(read_progress(url, study))
    except DATABASE_ERRORS as exc:
        if not is_transient(exc):
            raise


def read_progress(url: str, study: optuna.Study) -> StudyProgress:
    """Counts and the best value, aggregated by the database: polled twice a second, so it
    must not load the study's trials."""
    study_id = study._study_id
    with session_scope(url) as session:
        counts = trial_counts(session, [study_id]).get(study_id, {})
        low_high = best_values(session, [study_id]).get(study_id)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return StudyProgress(
        finished=sum(counts.get(STATE_NAMES[s], 0) for s in FINISHED_STATES),
        running=counts.get(STATE_NAMES[optuna.trial.TrialState.RUNNING], 0),
        best=None if low_high is None else low_high[1 if maximize else 0],
    )


def _worker_main(
    state: StudyState,
    url: str,
    device: str,
    index: int,
    threads: int,
    deadline: float | None,
    pack: int | None,
) -> None:
    """A worker process serving this one study until its budget is claimed, the deadline
    passes, or Ctrl-C (which checkpoints the running trial and hands it back)."""
    worker = Worker(
        WorkerOptions(
            url,
            device,
            studies=(state.name,),
            idle_exit_s=0,
            deadline=deadline,
            pack=pack,
            threads=threads,
        )
    )
    stop_on_signals(worker.stop)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    LogSettings("warning").apply()  # the progress bar tells the rest
    try:
        raise SystemExit(worker.run())
    except (HpsearchError, StorageError) as exc:
        print(f"error: worker {index}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:  # a user reads one line, not a traceback from a child process
        print(f"error: worker {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
