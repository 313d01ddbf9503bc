"""Signals: Ctrl-C (SIGINT) and SIGTERM at the command line and in worker processes.

At the command line a signal raises `Interrupted` where the main thread is, so a command
ends with one line and exit code 130 (`hpsearch.__main__`). Python swallows an exception
raised inside a finaliser or a weakref callback ("Exception ignored in ..."), and a signal
can land in one; so every signal is also recorded in `received`, for the command to honour
later (`started` passes it on to the workers it starts, `hpsearch.__main__` ends with 130).

SIGUSR1 prints every thread's Python stack to stderr, and the process goes on: where a
command or a worker that seems stuck is waiting, without a debugger on the host.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from hpsearch.errors import Interrupted

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
STACKS_SIGNAL = signal.SIGUSR1
received: list[int] = []  # signals this process was sent, in order


class StopEvent(threading.Event):
    """A `threading.Event` that a signal handler may set. A handler runs in the main thread
    between two of its bytecodes, and Event's own lock is not re-entrant: a handler that
    lands while that thread holds it (inside `set`, when a second signal follows the first
    at once, or inside `wait`) would wait for it for ever. This one's lock is re-entrant."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(threading.RLock())


def install() -> None:
    """The command line's handling: SIGINT raises Interrupted (even when the process started
    with it ignored, as a shell starts a background job), and an Interrupted that Python
    swallows prints no "Exception ignored" traceback: it is recorded in `received`."""
    signal.signal(signal.SIGINT, interrupt)
    sys.unraisablehook = _unraisable
    stacks_on_request()


def stacks_on_request() -> None:
    """`kill -USR1 PID` prints the process's stacks, every thread's, to its stderr. The dump
    is written by the interpreter's C handler, so it comes even when every Python thread is
    blocked. It goes to the process's own stderr file (`sys.__stderr__`), which has the file
    descriptor the dump needs where `sys.stderr` may be replaced; without one, no dump."""
    with contextlib.suppress(AttributeError, ValueError):  # io.UnsupportedOperation is both
        faulthandler.register(STACKS_SIGNAL, file=sys.__stderr__, all_threads=True)


def _unraisable(unraisable: Any) -> None:
    if not isinstance(unraisable.exc_value, Interrupted):
        sys.__unraisablehook__(unraisable)


def interrupt(signum: int, frame: FrameType | None) -> None:
    """The command line's handler: record the signal, and raise Interrupted."""
    received.append(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def started(processes: list[BaseProcess]) -> Iterator[list[int]]:
    """Start worker processes; while the block runs, SIGINT and SIGTERM are passed on to
    them (each checkpoints its trials, hands them back and exits) instead of ending this
    process. Yields the signals received, for the caller to end as they ask once the workers
    are done: one that came before the workers started is passed on to them as they start.
    A terminal's Ctrl-C reaches the workers too: they take the first signal and ignore the
    rest."""

    def forward(signum: int) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)

    with _passed_on(forward) as signals:
        _start(processes)
        if signals:
            forward(signals[0])
        yield signals


@contextlib.contextmanager
def stopping(stop: StopEvent) -> Iterator[list[int]]:
    """Run a worker in this process: while the block runs, SIGINT and SIGTERM set `stop`
    (the worker checkpoints its trials, hands them back and returns) instead of raising
    Interrupted in the middle of a training step. Yields the signals received, for the
    caller to end as they ask once the worker is done; one that came before sets `stop` at
    once."""
    with _passed_on(lambda signum: stop.set()) as signals:
        if signals:
            stop.set()
        yield signals


@contextlib.contextmanager
def _passed_on(act: Callable[[int], None]) -> Iterator[list[int]]:
    """While the block runs, SIGINT and SIGTERM are recorded and handed to `act`; yields the
    record, which starts with the signals this process received before."""
    signals = list(received)

    def handler(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)
        act(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield signals
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


def _start(processes: list[BaseProcess]) -> None:
    """Start worker processes with SIGINT and SIGTERM blocked in them until `stop_on_signals`
    is in place: a Ctrl-C during their seconds of start-up waits, then stops the worker
    cleanly, instead of a KeyboardInterrupt traceback from the middle of an import. The
    blocked mask is inherited by the fork server, which starts with the first worker, and
    by every worker forked from it; the resource tracker is started first because starting
    it unblocks the signals."""
    from multiprocessing import resource_tracker  # only commands that start workers need it

    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for process in processes:
            process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def stop_on_signals(stop: StopEvent) -> None:
    """A worker's handler: SIGTERM and SIGINT set `stop`; the running trial is checkpointed
    at the end of its epoch and handed back, and the worker exits 0. A second signal is
    ignored. A signal that came while `_start` kept it blocked is delivered now. SIGUSR1
    prints the worker's stacks (`stacks_on_request`)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    stacks_on_request()
