"""The embedded mode: one machine, N local worker processes, one database file.

Workers are processes, not threads: training holds the GIL between kernels, and a process
per worker keeps a crash or an out-of-memory in one trial away from the others.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import optuna
import torch

from hpsearch.data import load_dataset
from hpsearch.errors import HpsearchError
from hpsearch.service import StudyState, mark_completed_if_done
from hpsearch.study import FINISHED_STATES, claim_trial, open_study, run_trial
from storage import StorageError, optuna_storage

MAX_CONSECUTIVE_FAILURES = 3


@dataclass(frozen=True)
class StudyProgress:
    finished: int
    running: int
    failed: int
    best: float | None


def resolve_devices(device: str, jobs: int) -> list[str]:
    """The device of each of `jobs` workers: `auto` and `cuda` spread them over the GPUs."""
    n_gpus = torch.cuda.device_count()
    if device == "auto":
        device = "cuda" if n_gpus else "cpu"
    if device == "cpu":
        return ["cpu"] * jobs
    if not device.startswith("cuda"):
        raise HpsearchError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if n_gpus == 0:
        raise HpsearchError(f"--device {device}: no CUDA device is visible on this machine")
    if device == "cuda":
        return [f"cuda:{i % n_gpus}" for i in range(jobs)]
    index = device.removeprefix("cuda:")
    if not index.isdigit() or int(index) >= n_gpus:
        raise HpsearchError(f"--device {device}: this machine has cuda:0 to cuda:{n_gpus - 1}")
    return [device] * jobs


def run_workers(
    state: StudyState,
    url: str,
    jobs: int,
    devices: list[str],
    on_progress: Callable[[StudyProgress], None],
    poll_s: float = 0.5,
) -> list[int]:
    """Start `jobs` worker processes on the study and poll its progress until they exit.

    Returns the workers' exit codes. Ctrl-C (SIGINT) is passed on to the workers, which fail
    their running trial (so it uses no budget) and stop; running again resumes.
    """
    timeout_s = state.spec.budget.timeout_s
    deadline = None if timeout_s is None else time.time() + timeout_s
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker_main,
            args=(state, url, devices[i], i, threads, deadline),
            name=f"hpsearch-worker-{i}",
        )
        for i in range(jobs)
    ]
    for worker in workers:
        worker.start()
    study = optuna.load_study(study_name=state.name, storage=optuna_storage(url))
    try:
        while any(w.is_alive() for w in workers):
            on_progress(read_progress(study))
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGINT)
        for worker in workers:
            worker.join()
        raise
    finally:
        on_progress(read_progress(study))
    return [w.exitcode if w.exitcode is not None else 1 for w in workers]


def read_progress(study: optuna.Study) -> StudyProgress:
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED_STATES]
    completed = [t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return StudyProgress(
        finished=len(finished),
        running=sum(t.state == optuna.trial.TrialState.RUNNING for t in trials),
        failed=sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        best=(max(completed) if maximize else min(completed)) if completed else None,
    )


def _worker_main(
    state: StudyState, url: str, device: str, stream: int, threads: int, deadline: float | None
) -> None:
    """A worker process: claim and run trials until the budget, the deadline or an interrupt."""
    _interrupt_once()
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = open_study(state, url, stream)
        data = load_dataset(state.spec, device)
        failures = 0
        while deadline is None or time.time() < deadline:
            trial = claim_trial(study, state, url)
            if trial is None:
                return
            outcome = run_trial(study, trial, state.spec, data)
            finished = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
            mark_completed_if_done(url, state.id, finished)
            failures = failures + 1 if outcome == optuna.trial.TrialState.FAIL else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise SystemExit(3)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (HpsearchError, StorageError) as exc:
        print(f"error: worker {stream}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:  # a user reads one line, not a traceback from a child process
        print(f"error: worker {stream}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _interrupt_once() -> None:
    """Turn the first SIGINT or SIGTERM into KeyboardInterrupt and ignore the rest, so the
    cleanup (failing the running trial) is not itself interrupted."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
