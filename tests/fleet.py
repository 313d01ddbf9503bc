"""Helpers for tests of worker processes: crash-test specs, plain-SQL views of the
database, `hpsearch worker` processes with their output, and waits with deadlines."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
import pytest
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from hpsearch.service.holders import HOLDER_ATTR
from hpsearch.service.studies import submit_study
from hpsearch.spec import load_spec
from hpsearch.storage import Store, optuna_storage
from tests.conftest import hpsearch_command, write_spec

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
    store = Store.open(url)
    submit_study(store, load_spec(write_spec(directory / f"{spec['name']}.yaml", **spec)))


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

    def execute(self, sql: str, **params: Any) -> None:
        with self.engine.begin() as connection:
            connection.execute(sqlalchemy.text(sql), params)

    def holders(self, study: str) -> dict[int, str]:
        """trial number -> the holder recorded by the claim of each running trial."""
        return {
            number: json.loads(value)
            for number, value in self.rows(
                "SELECT t.number, a.value_json FROM trials t "
                "JOIN studies s ON s.study_id = t.study_id "
                "JOIN trial_system_attributes a ON a.trial_id = t.trial_id "
                "WHERE s.study_name = :name AND t.state = 'RUNNING' AND a.key = :key",
                name=study,
                key=HOLDER_ATTR,
            )
        }

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

    def start(
        self, url: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`hpsearch worker` with WORKER_ENV, or `env` over it."""
        index = len(self.processes)
        with (
            open(self.directory / f"worker-{index}.out", "wb") as out,
            open(self.directory / f"worker-{index}.err", "wb") as err,
        ):
            process = subprocess.Popen(
                hpsearch_command("worker", "--db", url, "--device", "cpu", *args),
                cwd=self.directory,
                env=os.environ
                | WORKER_ENV
                | (env or {})
                | {"HPSEARCH_DATA_DIR": str(self.directory)},
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
    """The budget (docs/architecture.md): finished plus running trials (and retries
    waiting) never exceed n_trials."""
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


def kill_while_running(
    db: Db, workers: Workers, url: str, study: str, count: int, env: dict[str, str] | None = None
) -> dict[int, int]:
    """Start `count` workers, SIGKILL them all once `count` trials run with a checkpoint,
    and return the checkpoints (number -> epoch) of the trials left running."""
    for _ in range(count):
        workers.start(url, env=env)
    wait_for(
        f"{count} running trials with checkpoints",
        lambda: running_checkpointed(db, study, 1, count=count),
        workers,
    )
    workers.kill_all()
    return running_checkpointed(db, study, 1)  # read after the kills: nothing moves now


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """An `hpsearch` command with the workers' heartbeat settings (or `env` over them)."""
    return subprocess.run(
        hpsearch_command(*args),
        cwd=cwd,
        env=os.environ
        | WORKER_ENV
        | (env or {})
        | {"HPSEARCH_DATA_DIR": str(cwd), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
