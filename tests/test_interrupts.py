"""Ctrl-C of `hpsearch run`: at any moment, exit code 130, one line, no traceback, and the
next run resumes without repeating a trial. Real processes, signals and training."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import pytest
from optuna.trial import FrozenTrial, TrialState

from hpsearch import signals
from hpsearch.__main__ import main
from hpsearch.errors import Interrupted
from tests.conftest import hpsearch_command, run_cli, write_spec
from tests.test_cli import FINISHED, quick_spec, trials

# Rounds of the random-moment test; the suite runs a few, HPSEARCH_INTERRUPT_ROUNDS=20 more.
ROUNDS = int(os.environ.get("HPSEARCH_INTERRUPT_ROUNDS", "2"))
RESUME = "run the same command again to resume"


def start_run(
    spec: Path,
    url: str,
    cwd: Path,
    sigint: signal.Handlers = signal.SIG_IGN,
    stderr: int | IO[str] = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """`hpsearch run --jobs 2` in its own process group, as a terminal's Ctrl-C reaches it.
    By default started with SIGINT ignored, as a shell starts a background job (CI runs the
    suite so): the command must handle Ctrl-C itself all the same."""
    env = os.environ | {"HPSEARCH_DATA_DIR": str(cwd), "PYTHONUNBUFFERED": "1"}
    with inherited_sigint(sigint):
        return subprocess.Popen(
            hpsearch_command("run", str(spec), "--db", url, "--jobs", "2"),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )


@contextmanager
def inherited_sigint(disposition: signal.Handlers) -> Iterator[None]:
    """SIGINT ignored (or default) here for the moment a child starts, which inherits it."""
    previous = signal.signal(signal.SIGINT, disposition)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupt(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Ctrl-C to the whole process group; its output once every process has ended. A group
    still running after minutes fails the test with every hpsearch process's stacks."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        return process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 180 s after Ctrl-C; its stacks:\n{stacks_and_kill(process)}")


def stacks_and_kill(process: subprocess.Popen[str]) -> str:
    """The stderr of a hung process group once each of its processes has printed its stacks
    (SIGUSR1, one process a second so that the dumps do not interleave) and the group is
    killed. Its fork server and resource tracker have no such handler and just end."""
    for pid in group_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signals.STACKS_SIGNAL)
        time.sleep(1)  # a pause between dumps for the reader; nothing waits on it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.communicate()[1] or ""


def group_pids(group: int) -> list[int]:
    """The processes of a process group, in the order of their ids (Linux's /proc)."""
    pids = sorted(int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    members = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            if os.getpgid(pid) == group:
                members.append(pid)
    return members


def assert_ended_interrupted(process: subprocess.Popen[str], stdout: str, stderr: str) -> None:
    assert process.returncode == 130, (process.returncode, stdout, stderr)
    assert "interrupted" in stderr, stderr
    assert "Traceback" not in stdout + stderr, stdout + stderr
    assert "KeyboardInterrupt" not in stdout + stderr, stdout + stderr


def trial_states(path: Path) -> list[str]:
    """Trial states read with plain SQL, so that watching never races the CLI to create
    Optuna's tables in a new database."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            return [state for (state,) in connection.execute("SELECT state FROM trials")]
    except sqlite3.OperationalError:  # not created yet
        return []


def digits_spec(path: Path, name: str, budget: int, epochs: int) -> Path:
    return write_spec(
        path,
        **quick_spec(
            name,
            budget,
            dataset={"source": "builtin", "name": "digits"},
            training={
                "max_epochs": epochs,
                "early_stopping_patience": None,
                "checkpoint_every_s": 0,
            },
            sampler={"name": "random", "seed": 0},
        ),
    )


@pytest.mark.timeout(600)
@pytest.mark.system
def test_interrupted_run_resumes_without_repeating_trials(tmp_path: Path) -> None:
    name, budget = "digits-resume", 6
    spec = digits_spec(tmp_path / "digits.yaml", name, budget, epochs=25)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    process = start_run(spec, url, tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = trial_states(tmp_path / "study.db")
        if states.count("COMPLETE") + states.count("PRUNED") >= 2 and "RUNNING" in states:
            break
        if process.poll() is not None:
            pytest.fail(f"the first run ended before it was interrupted: {process.communicate()}")
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"never two finished trials and one running: {process.communicate()}")
    stdout, stderr = interrupt(process)
    assert_ended_interrupted(process, stdout, stderr)
    assert RESUME in stderr

    before = trials(url, name)
    finished_before = {t.number: t.params for t in before if t.state in FINISHED}
    assert 2 <= len(finished_before) < budget
    assert not [t for t in before if t.state == TrialState.RUNNING]  # handed back, not left running

    again = run_cli("run", str(spec), "--db", url, "--jobs", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    after = trials(url, name)
    finished_after = {t.number: t.params for t in after if t.state in FINISHED}
    assert len(finished_after) == budget  # exact: no trial lost, none extra
    assert all(finished_after[n] == p for n, p in finished_before.items())  # kept as they were
    # Ctrl-C checkpointed the running trials and queued their retries; the second run
    # resumed those and started only what the budget still lacked: nothing repeated.
    handed_back = [t for t in before if t.state == TrialState.WAITING]
    assert handed_back, [(t.number, t.state, t.user_attrs.get("error")) for t in before]
    new = [t for t in after if t.number > max(t.number for t in before)]
    assert len(new) == budget - len(finished_before) - len(handed_back), [
        (t.number, t.state, t.user_attrs.get("error")) for t in after
    ]
    resumed = [after[t.number] for t in handed_back]
    assert all(t.state in FINISHED for t in resumed)
    assert any(t.user_attrs.get("resumed_from_epoch", 0) >= 1 for t in resumed)


@pytest.mark.timeout(600)
@pytest.mark.system
def test_sigusr1_prints_the_stacks_of_the_command_and_its_workers_which_go_on(
    tmp_path: Path,
) -> None:
    """A process that seems stuck tells where it waits: SIGUSR1 to `hpsearch run` and to
    its worker processes prints each one's stacks, and the run goes on to its end."""
    name, budget = "digits-stacks", 4
    spec = digits_spec(tmp_path / "digits.yaml", name, budget, epochs=25)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as stderr_file:
        process = start_run(spec, url, tmp_path, stderr=stderr_file)
    deadline = time.monotonic() + 300
    while (
        "RUNNING" not in trial_states(tmp_path / "study.db")
        or len(workers := worker_pids(tmp_path / "study.db")) < 2
    ):
        if process.poll() is not None or time.monotonic() > deadline:
            stacks_and_kill(process)
            pytest.fail(f"never two workers and a trial running: {stderr.read_text()}")
        time.sleep(0.2)
    # One process at a time: dumps written together to the same stderr interleave.
    dump_stacks(process.pid, stderr, COMMAND_OUTERMOST_FRAME)
    for pid in workers:
        dump_stacks(pid, stderr, WORKER_OUTERMOST_FRAME)
    try:
        process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        stacks_and_kill(process)
        pytest.fail(f"the run did not end: {stderr.read_text()}")
    dumps = stderr.read_text()
    assert process.returncode == 0, dumps
    assert dumps.count("Current thread 0x") == 3, dumps  # one dump per process
    assert "in run_workers" in dumps, dumps  # the command, waiting for its workers
    assert dumps.count("in _worker_main") == 2, dumps  # each worker, wherever it was
    finished = [t for t in trials(url, name) if t.state in FINISHED]
    assert len(finished) == budget


# The last line of a process's dump: faulthandler prints the main thread last, outermost
# frame last; `python -m` runs the command, the fork server's `-c` code its workers.
COMMAND_OUTERMOST_FRAME = "in _run_module_as_main\n"
WORKER_OUTERMOST_FRAME = '"<string>", line 1 in <module>\n'


def dump_stacks(pid: int, stderr: Path, outermost_frame: str) -> None:
    """SIGUSR1 to one process, then wait until its dump has reached its last line."""
    dumped = stderr.read_text().count(outermost_frame)
    os.kill(pid, signals.STACKS_SIGNAL)
    deadline = time.monotonic() + 60
    while stderr.read_text().count(outermost_frame) == dumped:
        assert time.monotonic() < deadline, f"no dump from {pid}: {stderr.read_text()}"
        time.sleep(0.1)


def worker_pids(path: Path) -> list[int]:
    """The process ids of the workers registered in a SQLite database."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        return [pid for (pid,) in connection.execute("SELECT pid FROM hps_workers")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sigint", [signal.SIG_IGN, signal.SIG_DFL], ids=["ignored", "default"])
@pytest.mark.system
def test_ctrl_c_while_the_workers_start_ends_without_a_traceback(
    tmp_path: Path, sigint: signal.Handlers
) -> None:
    """The workers take seconds to import torch; a Ctrl-C then must neither kill them with a
    KeyboardInterrupt traceback from the middle of an import nor be lost."""
    spec = digits_spec(tmp_path / "digits.yaml", "digits-start", 4, epochs=5)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    process = start_run(spec, url, tmp_path, sigint)
    assert process.stdout is not None
    first_line = process.stdout.readline()  # printed just before the workers are started
    assert "worker(s)" in first_line, first_line
    time.sleep(1.5)  # the moment: the workers are importing torch, which takes seconds
    stdout, stderr = interrupt(process)
    assert_ended_interrupted(process, first_line + stdout, stderr)
    assert "RUNNING" not in trial_states(tmp_path / "study.db")


@pytest.fixture
def busy_cores() -> Iterator[None]:
    """Two busy loops: the interrupts land on a loaded machine, as CI's often is."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


@pytest.mark.timeout(300 + 120 * ROUNDS)
@pytest.mark.system
def test_interrupts_at_random_moments_end_cleanly_and_lose_nothing(
    tmp_path: Path, busy_cores: None
) -> None:
    """Ctrl-C at random moments, start-up included, round after round: every round ends
    with 130 and one line, no trial is left running, finished trials stay as they were;
    then a run to a budget just above what exists finishes it exactly, with nothing
    repeated."""
    seed = random.randrange(2**32)
    moments = random.Random(seed)
    name = "digits-interrupts"
    spec = digits_spec(tmp_path / "digits.yaml", name, 4 * ROUNDS + 8, epochs=30)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    finished: dict[int, dict[str, Any]] = {}
    for round_ in range(ROUNDS):
        process = start_run(spec, url, tmp_path)
        time.sleep(moments.uniform(0, 12))  # the moment to interrupt, not a wait for a state
        if process.poll() is not None:
            pytest.fail(f"seed {seed}, round {round_}: ended early: {process.communicate()}")
        stdout, stderr = interrupt(process)
        assert_ended_interrupted(process, stdout, stderr)
        if "RUNNING" in trial_states(tmp_path / "study.db"):
            pytest.fail(f"seed {seed}, round {round_}: a trial was left running")
        now = {t.number: t.params for t in _trials_or_none(url, name) if t.state in FINISHED}
        assert all(now[n] == p for n, p in finished.items()), f"seed {seed}, round {round_}"
        finished = now

    waiting = [t for t in _trials_or_none(url, name) if t.state == TrialState.WAITING]
    budget = len(finished) + len(waiting) + 2
    spec = digits_spec(tmp_path / "digits.yaml", name, budget, epochs=30)
    last = run_cli("run", str(spec), "--db", url, "--jobs", "2", cwd=tmp_path)
    assert last.returncode == 0, last.stderr
    after = _trials_or_none(url, name)
    done = {t.number: t.params for t in after if t.state in FINISHED}
    assert len(done) == budget, f"seed {seed}: {[(t.number, t.state) for t in after]}"
    assert all(done[n] == p for n, p in finished.items())
    assert all(after[t.number].state in FINISHED for t in waiting)  # the retries were trained


def _trials_or_none(url: str, name: str) -> list[FrozenTrial]:
    """The study's trials; none when an interrupt came before the study was created."""
    try:
        return trials(url, name)
    except KeyError:
        return []


@pytest.mark.timeout(120)
@pytest.mark.integration
@pytest.mark.parametrize(
    "handling",
    ["signals.stop_on_signals(stop)", "handling = signals.stopping(stop); handling.__enter__()"],
    ids=["worker-process", "worker-in-the-command"],
)
def test_a_signal_that_lands_while_the_stop_event_s_lock_is_held_stops_the_worker(
    handling: str,
) -> None:
    """A handler runs in the main thread between two bytecodes, also inside the stop event's
    own `set` (a second Ctrl-C right after the first: the terminal's and the one the
    command passes on) or `wait`, where that thread holds the event's lock. The handler's
    `set` must not wait for that lock for ever: the worker would never stop."""
    script = f"""
import os, signal
from hpsearch import signals
stop = signals.StopEvent()
{handling}
with stop._cond:  # held, as inside Event.set and Event.wait
    os.kill(os.getpid(), signal.SIGINT)  # its handler runs here, in this thread
print("stopped" if stop.is_set() else "not stopped")
"""
    try:
        ran = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the handler waited for ever on the lock its own thread holds")
    assert (ran.returncode, ran.stdout.strip()) == (0, "stopped"), ran.stderr


def test_a_signal_whose_exception_was_swallowed_still_ends_the_command_with_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Python swallows an exception raised in a weakref callback or a finaliser; a Ctrl-C
    landing there must not let the command end as if nothing happened."""
    import hpsearch.__main__
    import hpsearch.cli.commands

    monkeypatch.setattr(signals, "received", [])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's handler alone
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after

    def command_that_swallows_the_signal() -> None:
        with contextlib.suppress(Interrupted):  # as Python does in a weakref callback
            signals.interrupt(signal.SIGINT, None)
        raise SystemExit(0)

    def leave(code: object) -> None:  # the process's end, without ending pytest's
        raise SystemExit(code)

    monkeypatch.setattr(hpsearch.cli.commands, "app", command_that_swallows_the_signal)
    monkeypatch.setattr(hpsearch.__main__, "leave", leave)
    with pytest.raises(SystemExit) as ended:
        main()
    assert ended.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"
    # Where Python reports the exception it swallowed, nothing is printed either.
    swallowed = SimpleNamespace(exc_value=Interrupted(), exc_type=Interrupted, object=None)
    sys.unraisablehook(swallowed)  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""
