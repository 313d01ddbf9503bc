"""Crash safety of `hpsearch worker` (DESIGN.md, "Trial life cycle and crash safety").

Real worker processes on real databases, training real (tiny) networks, killed with
SIGKILL or stopped with SIGTERM. The test watches the database with plain SQL, as an
outsider would, and waits with deadlines, never a fixed sleep. The workers run with a
heartbeat of 1 s and a grace period of 4 s, so a dead worker's trial goes stale quickly.

Studies are submitted in this process (`submit_study`, what `hpsearch submit` calls) to save
a CLI start-up per test; `hpsearch resume` and `hpsearch worker` run as commands.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
import pytest
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from hpsearch.service import submit_study
from hpsearch.spec import load_spec
from hpsearch.worker import IDLE_POLL_S
from storage import optuna_storage
from tests.conftest import hpsearch_command, write_spec
from tests.pg_private import private_postgres

T = TypeVar("T")

HEARTBEAT_S = 1
GRACE_S = 4
WORKER_ENV = {
    "HPSEARCH_HEARTBEAT_S": str(HEARTBEAT_S),
    "HPSEARCH_GRACE_PERIOD_S": str(GRACE_S),
    # Several workers share two cores: one thread each trains faster than contending ones.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
FINISHED = ("COMPLETE", "PRUNED")
IN_BUDGET = (*FINISHED, "RUNNING", "WAITING")  # what counts against n_trials
POLL_S = 0.2
WAIT_S = 120.0  # deadline of every wait: generous for a loaded machine, yet bounded


def crash_spec(name: str, n_trials: int, *, max_epochs: int, **training: Any) -> dict[str, Any]:
    """Iris, a tiny network and batches of 8: an epoch takes some tens of milliseconds, and
    with early stopping and pruning off every trial runs exactly `max_epochs` epochs."""
    return {
        "name": name,
        "dataset": {"source": "builtin", "name": "iris"},
        "model": {"hidden": [16]},
        "search_space": {"learning_rate": {"low": 1e-3, "high": 1e-1, "log": True}},
        "training": {
            "max_epochs": max_epochs,
            "batch_size": 8,
            "early_stopping_patience": None,
            "checkpoint_every_s": 0,
            **training,
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"n_trials": n_trials},
    }


def submit(url: str, directory: Path, spec: dict[str, Any]) -> None:
    submit_study(url, load_spec(write_spec(directory / f"{spec['name']}.yaml", **spec)))


# --- watching the database from outside ------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Trial states per study name, and the service's state of each study, at one moment."""

    trials: dict[str, Counter[str]]
    studies: dict[str, str]

    def count(self, study: str, *states: str) -> int:
        return sum(self.trials.get(study, Counter())[state] for state in states)


class Db:
    """Plain SQL on Optuna's and hpsearch's tables; a fresh connection per look, so a
    database restart between two looks does not matter."""

    def __init__(self, url: str) -> None:
        parsed = sqlalchemy.make_url(url)
        if parsed.get_backend_name() == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.NullPool)

    def rows(self, sql: str, **params: Any) -> list[sqlalchemy.Row[Any]]:
        with self.engine.connect() as connection:
            return list(connection.execute(sqlalchemy.text(sql), params))

    def snapshot(self) -> Snapshot:
        with self.engine.connect() as connection:
            trials = connection.execute(
                sqlalchemy.text(
                    "SELECT s.study_name, t.state, count(*) FROM trials t "
                    "JOIN studies s ON s.study_id = t.study_id GROUP BY s.study_name, t.state"
                )
            )
            counts: dict[str, Counter[str]] = {}
            for name, state, n in trials:
                counts.setdefault(name, Counter())[str(state)] = n
            studies = connection.execute(sqlalchemy.text("SELECT name, state FROM hps_studies"))
            return Snapshot(counts, {name: state for name, state in studies})

    def checkpoints(self, study: str) -> dict[int, int]:
        """trial number -> epoch of its checkpoint."""
        return {
            number: epoch
            for number, epoch in self.rows(
                "SELECT c.trial_number, c.epoch FROM hps_checkpoints c "
                "JOIN hps_studies s ON s.id = c.study_id WHERE s.name = :name",
                name=study,
            )
        }

    def numbers(self, study: str) -> list[int]:
        return [
            number
            for (number,) in self.rows(
                "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "WHERE s.study_name = :name",
                name=study,
            )
        ]

    def reported_epochs(self, study: str) -> dict[int, int]:
        """trial number -> epochs reported (intermediate values) so far."""
        return {
            number: n
            for number, n in self.rows(
                "SELECT t.number, count(v.trial_intermediate_value_id) FROM trials t "
                "JOIN studies s ON s.study_id = t.study_id "
                "LEFT JOIN trial_intermediate_values v ON v.trial_id = t.trial_id "
                "WHERE s.study_name = :name GROUP BY t.number",
                name=study,
            )
        }

    def close(self) -> None:
        self.engine.dispose()


def load_trials(url: str, study: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=study, storage=optuna_storage(url)).get_trials()


def original_of(trial: FrozenTrial) -> int | None:
    """The number of the trial that `trial` retries (None for a first attempt)."""
    return trial.system_attrs.get("failed_trial")


def summary(trials: list[FrozenTrial]) -> list[tuple[Any, ...]]:
    """Enough of each trial to understand a failed assertion."""
    return [
        (
            t.number,
            t.state.name,
            original_of(t),
            t.user_attrs.get("resumed_from_epoch"),
            len(t.user_attrs.get("history", [])),
            t.user_attrs.get("error"),
        )
        for t in trials
    ]


# --- worker processes ------------------------------------------------------------------


@dataclass
class Workers:
    """`hpsearch worker` processes of one test, each with its output in a file; whatever
    is still alive when the test ends is killed."""

    directory: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, url: str, *args: str) -> subprocess.Popen[bytes]:
        index = len(self.processes)
        with (
            open(self.directory / f"worker-{index}.out", "wb") as out,
            open(self.directory / f"worker-{index}.err", "wb") as err,
        ):
            process = subprocess.Popen(
                hpsearch_command("worker", "--db", url, "--device", "cpu", *args),
                cwd=self.directory,
                env=os.environ | WORKER_ENV | {"HPSEARCH_DATA_DIR": str(self.directory)},
                stdout=out,
                stderr=err,
            )
        self.processes.append(process)
        return process

    def stderr(self, process: subprocess.Popen[bytes]) -> str:
        index = self.processes.index(process)
        return (self.directory / f"worker-{index}.err").read_text(errors="replace")

    def report(self) -> str:
        """Each worker's exit code and its stderr (the start, where the first error is,
        and the end), for failure messages."""
        parts = []
        for i, process in enumerate(self.processes):
            text = self.stderr(process)
            if len(text) > 4000:
                text = f"{text[:2000]}\n[...]\n{text[-2000:]}"
            parts.append(f"--- worker {i} (pid {process.pid}, exit {process.poll()}):\n{text}")
        return "\n".join(parts)

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.processes if p.poll() is None]

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.kill()
        process.wait(timeout=30)

    def kill_all(self) -> None:
        for process in self.alive():
            self.kill(process)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


def wait_for(
    what: str, probe: Callable[[], T | None], workers: Workers, timeout: float = WAIT_S
) -> T:
    """Poll `probe` until it returns something true; fail, with the workers' stderr, at the
    deadline or when every worker has exited (nothing could change any more)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if not workers.alive():
            pytest.fail(f"every worker exited before {what}\n{workers.report()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{workers.report()}")
        time.sleep(POLL_S)


def watch_until_exit(
    db: Db, workers: Workers, timeout: float = WAIT_S, *, tolerate_outage: bool = False
) -> list[Snapshot]:
    """Snapshots every POLL_S until every worker has exited; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    snapshots: list[Snapshot] = []
    while True:
        try:
            snapshots.append(db.snapshot())
        except sqlalchemy.exc.OperationalError:
            if not tolerate_outage:
                raise
        if not workers.alive():
            return snapshots
        if time.monotonic() > deadline:
            pytest.fail(f"workers still running after {timeout:.0f} s\n{workers.report()}")
        time.sleep(POLL_S)


def assert_clean_exits(workers: Workers) -> None:
    report = workers.report()
    assert [p.returncode for p in workers.processes] == [0] * len(workers.processes), report
    assert "Traceback" not in report, report


def assert_budget_never_exceeded(snapshots: list[Snapshot], study: str, n_trials: int) -> None:
    """DESIGN.md: finished plus running trials (and retries waiting) never exceed n_trials."""
    worst = max(snapshots, key=lambda s: s.count(study, *IN_BUDGET))
    assert worst.count(study, *IN_BUDGET) <= n_trials, worst.trials[study]


def assert_finished_exactly(url: str, study: str, n_trials: int) -> list[FrozenTrial]:
    """Exactly n_trials finished, nothing left running or waiting, no number twice, and
    the study is completed; returns its trials."""
    trials = load_trials(url, study)
    states = Counter(t.state.name for t in trials)
    assert states["COMPLETE"] + states["PRUNED"] == n_trials, summary(trials)
    assert states["RUNNING"] == states["WAITING"] == 0, summary(trials)
    numbers = Db(url).numbers(study)
    assert sorted(numbers) == list(range(len(numbers))), numbers  # unique and gapless
    assert Db(url).snapshot().studies[study] == "completed"
    return trials


def assert_resumed_whole(retry: FrozenTrial, max_epochs: int, from_epoch: int) -> None:
    """A retry that resumed from a checkpoint of epoch `from_epoch` and trained to the end:
    its history and its reported values hold every epoch, the earlier ones included."""
    info = summary([retry])
    assert retry.state == TrialState.COMPLETE, info
    assert retry.user_attrs.get("resumed_from_epoch") == from_epoch, info
    history = retry.user_attrs["history"]  # rows of [epoch, train_loss, val_loss, value, lr]
    assert [row[0] for row in history] == list(range(1, max_epochs + 1)), info
    assert retry.user_attrs["epochs"] == max_epochs
    assert sorted(retry.intermediate_values) == list(range(1, max_epochs + 1)), info


def assert_each_retried_once(
    trials: list[FrozenTrial], orphaned: dict[int, int], max_epochs: int
) -> list[FrozenTrial]:
    """Each orphaned trial (number -> epoch of its checkpoint) failed and was retried once,
    with its params, resuming from that checkpoint to the end; returns the retries."""
    found = []
    for number, epoch in orphaned.items():
        assert trials[number].state == TrialState.FAIL, summary(trials)
        retries = [t for t in trials if original_of(t) == number]
        assert len(retries) == 1, summary(trials)
        assert retries[0].params == trials[number].params
        assert_resumed_whole(retries[0], max_epochs, from_epoch=epoch)
        found.append(retries[0])
    return found


def running_checkpointed(db: Db, study: str, min_epoch: int, count: int = 1) -> dict[int, int]:
    """The checkpoints (number -> epoch) of running trials, once `count` of them reached
    `min_epoch`; otherwise an empty dict."""
    running = {
        number
        for (number,) in db.rows(
            "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = :name AND t.state = 'RUNNING'",
            name=study,
        )
    }
    reached = {n: e for n, e in db.checkpoints(study).items() if n in running and e >= min_epoch}
    return reached if len(reached) >= count else {}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """An `hpsearch` command with the workers' heartbeat settings."""
    return subprocess.run(
        hpsearch_command(*args),
        cwd=cwd,
        env=os.environ | WORKER_ENV | {"HPSEARCH_DATA_DIR": str(cwd), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- the tests -------------------------------------------------------------------------


@pytest.mark.postgres
def test_four_workers_spend_the_budget_exactly(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    name, n_trials = "four-workers", 24
    submit(postgres_url, tmp_path, crash_spec(name, n_trials, max_epochs=5))
    db = Db(postgres_url)
    for _ in range(4):
        workers.start(postgres_url, "--idle-exit", "1")
    snapshots = watch_until_exit(db, workers)

    assert_clean_exits(workers)
    assert_budget_never_exceeded(snapshots, name, n_trials)
    # The watch saw the workers race: otherwise the bound above would prove nothing.
    assert max(s.count(name, "RUNNING") for s in snapshots) >= 2
    trials = assert_finished_exactly(postgres_url, name, n_trials)
    assert len(trials) == n_trials  # nothing failed, nothing retried
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # the work was shared
    worker_states = [state for (state,) in db.rows("SELECT state FROM hps_workers")]
    assert worker_states == ["stopped"] * 4


@pytest.mark.postgres
def test_killed_worker_trial_is_resumed_by_another_after_the_grace_period(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    name, n_trials, max_epochs = "sigkill-one", 2, 30
    submit(postgres_url, tmp_path, crash_spec(name, n_trials, max_epochs=max_epochs))
    db = Db(postgres_url)
    first = workers.start(postgres_url)
    wait_for("a checkpoint of epoch 2", lambda: running_checkpointed(db, name, 2), workers)
    workers.kill(first)  # SIGKILL: no handler runs, the trial stays RUNNING
    killed = db.checkpoints(name)
    assert list(killed) == [0] and killed[0] >= 2, killed
    assert db.snapshot().count(name, "RUNNING") == 1  # killed mid-trial, not after it

    # No `resume`: the second worker fails the trial itself once its heartbeat is stale.
    second = workers.start(postgres_url, "--idle-exit", "1")
    snapshots = watch_until_exit(db, workers)

    assert second.returncode == 0, workers.report()
    assert "Traceback" not in workers.stderr(second), workers.report()
    assert_budget_never_exceeded(snapshots, name, n_trials)
    trials = assert_finished_exactly(postgres_url, name, n_trials)
    assert [t.state.name for t in trials].count("FAIL") == 1, summary(trials)
    original = trials[0]
    assert original.state == TrialState.FAIL, summary(trials)
    retries = [t for t in trials if original_of(t) == 0]
    assert len(retries) == 1, summary(trials)  # one retry, not one per look at the stale trial
    retry = retries[0]
    assert retry.params == original.params
    assert retry.user_attrs["worker"].endswith(f":{second.pid}")
    assert_resumed_whole(retry, max_epochs, from_epoch=killed[0])
    assert db.checkpoints(name) == {}  # a finished trial's checkpoints are deleted


@pytest.mark.postgres
def test_all_workers_killed_then_resume_frees_and_resumes_every_trial(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    name, n_trials, max_epochs = "sigkill-all", 4, 60
    submit(postgres_url, tmp_path, crash_spec(name, n_trials, max_epochs=max_epochs))
    db = Db(postgres_url)
    for _ in range(2):
        workers.start(postgres_url)
    wait_for(
        "two running trials with checkpoints",
        lambda: running_checkpointed(db, name, 1, count=2),
        workers,
    )
    workers.kill_all()
    orphaned = running_checkpointed(db, name, 1)  # read after the kills: nothing moves now
    # Usually both; one may have finished between the wait and the kill on a loaded machine.
    assert len(orphaned) >= 1, (orphaned, db.snapshot())

    resumed = cli("resume", name, "--db", postgres_url, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    freed = re.search(r"(\d+) stale trial\(s\) freed for retry", resumed.stdout)
    assert freed is not None, resumed.stdout
    assert int(freed.group(1)) == len(orphaned) >= 1, resumed.stdout
    snapshot = db.snapshot()
    assert snapshot.studies[name] == "running"
    assert snapshot.count(name, "RUNNING") == 0
    assert snapshot.count(name, "WAITING") == len(orphaned)  # queued at once, no grace period

    fresh = [workers.start(postgres_url, "--idle-exit", "1") for _ in range(2)]
    snapshots = watch_until_exit(db, workers)

    report = workers.report()
    assert [p.returncode for p in fresh] == [0, 0], report
    assert all("Traceback" not in workers.stderr(p) for p in fresh), report
    assert_budget_never_exceeded(snapshots, name, n_trials)
    trials = assert_finished_exactly(postgres_url, name, n_trials)
    assert_each_retried_once(trials, orphaned, max_epochs)


@pytest.mark.postgres
def test_sigterm_hands_the_trial_back_and_another_worker_resumes_it(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    # Long enough that SIGTERM, sent once 3 epochs are seen in the database (a worker writes
    # its reports at least every 2 s), lands before the trial ends.
    name, n_trials, max_epochs = "sigterm", 2, 400
    # No checkpoint on a timer: the one the retry resumes from is the one SIGTERM forced.
    spec = crash_spec(name, n_trials, max_epochs=max_epochs, checkpoint_every_s=3600)
    submit(postgres_url, tmp_path, spec)
    db = Db(postgres_url)
    first = workers.start(postgres_url)
    wait_for("three reported epochs", lambda: db.reported_epochs(name).get(0, 0) >= 3, workers)
    assert db.checkpoints(name) == {}
    first.send_signal(signal.SIGTERM)
    try:
        code = first.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within 10 s of SIGTERM\n{workers.report()}")
    assert code == 0, workers.report()
    assert "Traceback" not in workers.stderr(first), workers.report()
    stopped = db.rows("SELECT state FROM hps_workers WHERE pid = :pid", pid=first.pid)
    assert [state for (state,) in stopped] == ["stopped"]

    handed_back = load_trials(postgres_url, name)
    assert [t.state for t in handed_back] == [TrialState.FAIL, TrialState.WAITING], summary(
        handed_back
    )
    assert "handed back" in handed_back[0].user_attrs["error"]
    assert original_of(handed_back[1]) == 0
    assert handed_back[1].params == handed_back[0].params
    checkpoint = db.checkpoints(name)
    assert list(checkpoint) == [0] and checkpoint[0] >= 3, checkpoint
    assert db.snapshot().studies[name] == "running"

    second = workers.start(postgres_url, "--idle-exit", "1")
    snapshots = watch_until_exit(db, workers)

    assert second.returncode == 0, workers.report()
    assert "Traceback" not in workers.stderr(second), workers.report()
    assert_budget_never_exceeded(snapshots, name, n_trials)
    trials = assert_finished_exactly(postgres_url, name, n_trials)
    assert len(trials) == n_trials + 1, summary(trials)  # the handed-back trial, once
    assert trials[1].user_attrs["worker"].endswith(f":{second.pid}")
    assert trials[1].user_attrs.get("error") is None  # the retry does not look failed
    assert_resumed_whole(trials[1], max_epochs, from_epoch=checkpoint[0])


def test_three_workers_share_one_sqlite_file(tmp_path: Path, workers: Workers) -> None:
    name, n_trials = "sqlite-three", 12
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # A checkpoint every epoch: as many writes from every worker as a study can make.
    submit(url, tmp_path, crash_spec(name, n_trials, max_epochs=6))
    db = Db(url)
    for _ in range(3):  # three workers on this machine's cores: one thread each
        workers.start(url, "--idle-exit", "1", "--threads", "1")
    snapshots = watch_until_exit(db, workers)

    assert_clean_exits(workers)
    assert "database is locked" not in workers.report()
    assert_budget_never_exceeded(snapshots, name, n_trials)
    assert max(s.count(name, "RUNNING") for s in snapshots) >= 2
    trials = assert_finished_exactly(url, name, n_trials)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials, summary(trials)
    assert len({t.user_attrs["worker"] for t in trials}) >= 2
    assert {t.user_attrs["threads"] for t in trials} == {1}


@pytest.mark.postgres
def test_two_studies_progress_side_by_side(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    names, n_trials = ("side-a", "side-b"), 6
    for name in names:
        submit(postgres_url, tmp_path, crash_spec(name, n_trials, max_epochs=8))
    db = Db(postgres_url)
    for _ in range(2):
        workers.start(postgres_url, "--idle-exit", "1")
    snapshots = watch_until_exit(db, workers)

    assert_clean_exits(workers)
    both_going = [
        s
        for s in snapshots
        if all(s.count(n, *FINISHED, "RUNNING") > 0 for n in names)
        and all(s.studies[n] != "completed" for n in names)
    ]
    assert both_going, [(s.trials, s.studies) for s in snapshots[::5]]
    done = {name: assert_finished_exactly(postgres_url, name, n_trials) for name in names}
    # When the first study finished, the other had made progress too: none starved.
    first, other = sorted(names, key=lambda n: max(t.datetime_complete for t in done[n]))
    first_done = max(t.datetime_complete for t in done[first])
    other_by_then = [t for t in done[other] if t.datetime_complete <= first_done]
    assert len(other_by_then) >= n_trials // 3, summary(done[other])


@pytest.mark.postgres
def test_workers_survive_a_database_restart(tmp_path: Path, workers: Workers) -> None:
    name, n_trials, max_epochs = "outage", 8, 20
    with private_postgres() as server:
        url = server.url
        # Checkpoints on a timer, as in real use (the default is 30 s), not after every
        # epoch: the outage then mostly meets the workers in Optuna's calls (report,
        # should_prune, get_trials), not only in the checkpoint write.
        submit(
            url, tmp_path, crash_spec(name, n_trials, max_epochs=max_epochs, checkpoint_every_s=0.5)
        )
        db = Db(url)
        # Idle for longer than a grace period and two polls before leaving: a trial orphaned
        # by the outage must go stale, and be retried, while a worker still polls.
        for _ in range(2):
            workers.start(url, "--idle-exit", str(GRACE_S + 3 * IDLE_POLL_S))

        def mid_study() -> Snapshot | None:
            snapshot = db.snapshot()
            going = snapshot.count(name, *FINISHED) >= 2 and snapshot.count(name, "RUNNING")
            return snapshot if going else None

        before = wait_for("two finished trials and one running", mid_study, workers)
        finished_before = {
            t.number: t.value for t in load_trials(url, name) if t.state.name in FINISHED
        }
        in_flight = running_checkpointed(db, name, 1)  # their work must survive the outage
        server.stop("fast")  # every connection is cut, and none is accepted for 5 s
        time.sleep(5)
        server.start()
        snapshots = watch_until_exit(db, workers, tolerate_outage=True)

        report = workers.report() + "\n--- server log:\n" + server.server_log()
        assert [p.returncode for p in workers.processes] == [0, 0], report
        assert "Traceback" not in report, report
        assert_budget_never_exceeded([before, *snapshots], name, n_trials)
        trials = assert_finished_exactly(url, name, n_trials)
        # Nothing lost: what had finished stays as it was, and every trial that the outage
        # failed (its heartbeat went stale) was retried and finished.
        assert {n: trials[n].value for n in finished_before} == finished_before
        for trial in trials:
            if trial.state == TrialState.FAIL:
                retries = [t for t in trials if original_of(t) == trial.number]
                assert len(retries) == 1, summary(trials)
                assert retries[0].state.name in FINISHED, summary(trials)
        # A trial that was checkpointed when the database went away either finished in its
        # worker, or its retry resumed from that checkpoint (or a later one).
        for number, epoch in in_flight.items():
            if trials[number].state == TrialState.FAIL:
                (retry,) = [t for t in trials if original_of(t) == number]
                assert retry.user_attrs.get("resumed_from_epoch", 0) >= epoch, summary(trials)
        db.close()


@pytest.mark.postgres
def test_a_killed_pack_worker_resumes_every_member_from_its_checkpoint(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    name, n_trials, max_epochs = "pack-kill", 4, 40
    spec = crash_spec(name, n_trials, max_epochs=max_epochs)
    spec["search_space"]["batch_size"] = {"choices": [8, 16, 32]}
    submit(postgres_url, tmp_path, spec)
    db = Db(postgres_url)
    first = workers.start(postgres_url, "--pack", "4")
    wait_for(
        "four members with checkpoints of epoch 2",
        lambda: running_checkpointed(db, name, 2, count=4),
        workers,
    )
    workers.kill(first)
    orphaned = running_checkpointed(db, name, 1)
    assert len(orphaned) == 4, (orphaned, db.snapshot())

    second = workers.start(postgres_url, "--pack", "4", "--idle-exit", "1")
    snapshots = watch_until_exit(db, workers)

    assert second.returncode == 0, workers.report()
    assert "Traceback" not in workers.stderr(second), workers.report()
    assert_budget_never_exceeded(snapshots, name, n_trials)
    trials = assert_finished_exactly(postgres_url, name, n_trials)
    retries = assert_each_retried_once(trials, orphaned, max_epochs)
    assert all(t.user_attrs["worker"].endswith(f":{second.pid}") for t in retries)
