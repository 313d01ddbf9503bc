"""The service's own cost, each figure beside a baseline measured in the same run.

1. Overhead per trial: the worker's loop (`Worker._claim` + `Worker._run`: claim under the
   study's lock with the budget counted, 20 reported epochs with `should_prune`, one
   checkpoint write, the results recorded, the tell, the best weights kept, the completion
   check) with training replaced by a replay of one recorded 20-epoch training of a
   64-128-10 network; against plain Optuna on `RDBStorage` (`ask`, 20 x `report` +
   `should_prune`, `tell`) on the same database, both with the random sampler and the median
   pruner, in studies already holding 100, 1,000 and 10,000 finished trials.
2. Leaderboard and listing latency of the REST API on a study of 10,000 trials, against
   the same answers computed by loading every trial with `optuna.load_study(...).get_trials()`.
3. Sampler latency: time per ask at 100 and 1,000 finished trials (`bench/samplers.py`'s
   `ask_seconds`), against the random sampler.
4. Load: 32 claimant processes on PostgreSQL for 60 s, then 32 against a budget of 500.

Everything runs on SQLite (a temporary file) and on PostgreSQL (a database created for the
run on $HPSEARCH_BENCH_POSTGRES_URL's server, default postgresql://postgres@127.0.0.1:5432/test,
and dropped at the end).

Run: .venv/bin/python bench/service.py [--quick]
It rewrites the section "## Service overhead" of BENCHMARKS.md (`--quick`: small sizes, for a
smoke run; prints the tables and leaves BENCHMARKS.md alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.distributions import distribution_to_json
from optuna.trial import TrialState
from report import environment, markdown_table, write_section
from samplers import PROBLEMS, ask_seconds

import hpsearch.runtime.trials
from hpsearch.data.tensors import load_dataset
from hpsearch.runtime.trials import claim_trial, open_study
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.search.bayes import _MAX_BEST as BAYES_BEST
from hpsearch.search.bayes import _MAX_RECENT as BAYES_RECENT
from hpsearch.search.pruning import REFRESH_S, Halving, rung_key
from hpsearch.search.space import distributions, make_pruner, make_sampler, suggest_params
from hpsearch.service.studies import StudyState, submit_study
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store, make_engine, optuna_storage, upgrade
from hpsearch.storage.optuna_internals import (
    StudyModel,
    TrialIntermediateValueModel,
    TrialModel,
    TrialParamModel,
    TrialSystemAttributeModel,
    TrialUserAttributeModel,
    TrialValueModel,
)
from hpsearch.storage.queries import trial_counts
from hpsearch.training.train import EpochRecord, TrainResult, TrialConfig, train

SECTION = "## Service overhead"
COMMAND = ".venv/bin/python bench/service.py"
ADMIN_URL = os.environ.get(
    "HPSEARCH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
KINDS = ("sqlite", "postgresql")
EPOCHS = 20
CHECKPOINT_EPOCH = 10  # the one checkpoint of a trial is written after this epoch
SPACE = {
    "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"low": 16, "high": 256, "log": True},
    "dropout": {"low": 0.0, "high": 0.5},
}
SAMPLER_NAMES = ("random", "tpe", "bayes", "gp")
PRUNED_EVERY = 3  # every third pre-filled trial was pruned, at a random epoch
INSERT_BATCH = 2_000
FINITE_STEP = TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
LOAD_CLAIMANTS = 32
LOAD_REPORTS = 3
LOAD_BUDGET = 500
PYTHON_WAY_REPEATS = 3  # loading 10,000 trials takes seconds: fewer repeats of the baseline


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run measures."""

    prefilled: tuple[int, ...] = (100, 1_000, 10_000)
    rounds: int = 6  # trials alternate between hpsearch and plain Optuna in rounds ...
    per_round: int = 10  # ... of this many each
    warmup: int = 2  # untimed trials first (the first one loads the study into Optuna's cache)
    requests: int = 50
    ask_sizes: tuple[int, ...] = (100, 1_000)
    load_seconds: float = 60.0
    claimants: int = LOAD_CLAIMANTS
    load_budget: int = LOAD_BUDGET
    # Measured besides the median pruner, on PostgreSQL at the largest size.
    pruners: tuple[str, ...] = ("sha", "hyperband")


QUICK = Sizes(
    prefilled=(100, 1_000),
    rounds=2,
    per_round=3,
    requests=10,
    ask_sizes=(30, 100),
    load_seconds=5.0,
    claimants=4,
    load_budget=40,
)


# --- databases -------------------------------------------------------------------------


@contextmanager
def database(kind: str) -> Iterator[str]:
    """A new, empty database of `kind` for one measurement, removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="hps-bench-") as folder:
            yield f"sqlite:///{folder}/bench.db"
        return
    admin_url = sqlalchemy.make_url(ADMIN_URL).set(drivername="postgresql+psycopg")
    name = f"hps_bench_service_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def bench_spec(name: str, n_trials: int, pruner: str = "median") -> StudySpec:
    """The measured studies: three searched params, the random sampler (so that the sampler's
    own cost does not hide the storage's), the median pruner unless told, 20 epochs."""
    return parse_spec(
        {
            "name": name,
            "dataset": {"source": "builtin", "name": "digits"},
            "model": {"hidden": [128]},
            "search_space": SPACE,
            "training": {
                "max_epochs": EPOCHS,
                "early_stopping_patience": None,
                "checkpoint_every_s": 0,
            },
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": pruner},
            "budget": {"n_trials": n_trials},
        }
    )


def prefill(url: str, study_id: int, n: int, spec: StudySpec, seed: int) -> None:
    """`n` finished trials in Optuna's tables, as a worker leaves them (params, value, one
    intermediate value per epoch, the user attributes `hpsearch.runtime.trials._record` writes, and
    under successive halving the rungs each reached), inserted in bulk (Optuna's
    `add_trials` would take minutes for 10,000), then analysed."""
    rng = np.random.default_rng(seed)
    engine = make_engine(url)
    start = datetime(2026, 1, 1)
    with engine.begin() as connection:
        for low in range(0, n, INSERT_BATCH):
            rows = [
                {
                    "number": number,
                    "study_id": study_id,
                    "state": TrialState.PRUNED
                    if number % PRUNED_EVERY == 1
                    else TrialState.COMPLETE,
                    "datetime_start": start + timedelta(seconds=30 * number),
                    "datetime_complete": start + timedelta(seconds=30 * number + 25),
                }
                for number in range(low, min(n, low + INSERT_BATCH))
            ]
            connection.execute(sqlalchemy.insert(TrialModel.__table__), rows)
        query = sqlalchemy.select(
            TrialModel.__table__.c.trial_id, TrialModel.__table__.c.number
        ).where(TrialModel.__table__.c.study_id == study_id)
        name = connection.scalar(
            sqlalchemy.select(StudyModel.study_name).where(StudyModel.study_id == study_id)
        )
        ids = dict(connection.execute(query).all())
        for table, rows in trial_rows(ids, name, spec, rng).items():
            for low in range(0, len(rows), INSERT_BATCH * 10):
                connection.execute(sqlalchemy.insert(table), rows[low : low + INSERT_BATCH * 10])
    with engine.begin() as connection:
        # The planner's statistics, as the database's autovacuum (PostgreSQL) or a long-lived
        # study would have them: right after a bulk insert they describe an empty table.
        connection.exec_driver_sql("ANALYZE")


def trial_rows(
    ids: dict[int, int], study_name: str, spec: StudySpec, rng: np.random.Generator
) -> dict[sqlalchemy.Table, list[dict[str, Any]]]:
    """The child rows of pre-filled trials {trial id: number}, by table."""
    tables: dict[sqlalchemy.Table, list[dict[str, Any]]] = {
        TrialParamModel.__table__: [],
        TrialValueModel.__table__: [],
        TrialIntermediateValueModel.__table__: [],
        TrialUserAttributeModel.__table__: [],
        TrialSystemAttributeModel.__table__: [],
    }
    halving = Halving.from_spec(spec)
    dists = {name: (dist, distribution_to_json(dist)) for name, dist in distributions(spec).items()}
    for trial_id, number in ids.items():
        pruned = number % PRUNED_EVERY == 1
        epochs = int(rng.integers(3, EPOCHS)) if pruned else EPOCHS
        curve = np.minimum.accumulate(1 - 0.9 * (1 - np.exp(-np.arange(1, epochs + 1) / 4)))
        curve = (1 - curve * rng.uniform(0.8, 1.2)).round(4)  # accuracies, rising
        for name, (dist, dist_json) in dists.items():
            value = rng.uniform(0, 1)
            tables[TrialParamModel.__table__].append(
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": internal(dist, value),
                    "distribution_json": dist_json,
                }
            )
        if not pruned:
            tables[TrialValueModel.__table__].append(
                {
                    "trial_id": trial_id,
                    "objective": 0,
                    "value": float(curve.max()),
                    "value_type": TrialValueModel.TrialValueType.FINITE,
                }
            )
        tables[TrialIntermediateValueModel.__table__] += [
            {
                "trial_id": trial_id,
                "step": step,
                "intermediate_value": float(value),
                "intermediate_value_type": FINITE_STEP,
            }
            for step, value in enumerate(curve, start=1)
        ]
        tables[TrialUserAttributeModel.__table__] += [
            {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            for key, value in recorded_attrs(curve, pruned).items()
        ]
        if halving is not None:
            tables[TrialSystemAttributeModel.__table__] += [
                {"trial_id": trial_id, "key": rung_key(rung), "value_json": json.dumps(value)}
                for rung, value in rungs_reached(halving, study_name, number, curve).items()
            ]
    return tables


def rungs_reached(
    halving: Halving, study_name: str, number: int, curve: np.ndarray
) -> dict[int, float]:
    """{rung: value} of the rungs a trial that reported `curve` reached in its bracket."""
    bracket = halving.bracket(study_name, number)
    rungs: dict[int, float] = {}
    while (step := halving.promotion_step(bracket, len(rungs))) <= len(curve):
        rungs[len(rungs)] = float(curve[step - 1])
    return rungs


def internal(dist: optuna.distributions.BaseDistribution, unit: float) -> float:
    """The internal representation of the point `unit` (0..1) of a numeric dimension."""
    low, high = float(dist.low), float(dist.high)
    if dist.log:
        value = float(np.exp(np.log(low) + unit * (np.log(high) - np.log(low))))
    else:
        value = low + unit * (high - low)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return float(min(max(round(value), dist.low), dist.high))
    return value


def recorded_attrs(curve: np.ndarray, pruned: bool) -> dict[str, Any]:
    """What a worker records on a finished trial (`_sign` and `_record`)."""
    return {
        "worker": "bench-host:1",
        "device": "cpu",
        "val_accuracy": float(curve.max()),
        "val_loss": float(1 - curve.max()),
        "test_accuracy": float(curve.max() - 0.01),
        "test_loss": float(1.01 - curve.max()),
        "epochs": len(curve),
        "best_epoch": int(curve.argmax()) + 1,
        "seconds": 2.5,
        "diagnosis": "pruned" if pruned else "ok",
        "history": [[i + 1, 0.5, 0.4, float(v), 1e-3] for i, v in enumerate(curve)],
    }


# --- 1. overhead per trial ---------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """A recorded training, replayed instead of training: the reports, one checkpoint and
    the result a 64-128-10 network on digits produced, so a trial costs only the service."""

    result: TrainResult
    checkpoint: bytes

    @classmethod
    def record(cls) -> Replay:
        spec = bench_spec("record", 1)
        config = TrialConfig.from_spec(
            spec, {"learning_rate": 1e-3, "batch_size": 64, "dropout": 0.1}
        )
        payloads: list[bytes] = []
        result = train(
            config,
            load_dataset(spec),
            on_checkpoint=lambda payload, _epoch: payloads.append(payload),
            checkpoint_every_s=0,
        )
        return cls(result, payloads[CHECKPOINT_EPOCH - 1])

    def curves(self, n: int, seed: int) -> list[list[float]]:
        """`n` learning curves around the recorded one, the same for hpsearch and plain."""
        rng = np.random.default_rng(seed)
        values = np.array([r.value for r in self.result.history])
        return [(values + rng.normal(0, 0.02)).tolist() for _ in range(n)]


class ReplayTrainer:
    """Stands in for training (`hpsearch.training.train.train`) in the runtime: reports the next
    curve's epochs (whatever the pruner answers, so every trial does the same work), hands
    out the recorded checkpoint once, and returns the recorded result."""

    def __init__(self, replay: Replay, curves: list[list[float]]) -> None:
        self.replay = replay
        self.curves = iter(curves)

    def __call__(
        self,
        config: TrialConfig,
        data: Any,
        on_epoch: Callable[[EpochRecord], bool] | None = None,
        *,
        on_checkpoint: Callable[[bytes, int], None] | None = None,
        **_options: Any,
    ) -> TrainResult:
        curve = next(self.curves)
        history = [
            dataclasses.replace(record, value=value)
            for record, value in zip(self.replay.result.history, curve, strict=True)
        ]
        for record in history:
            if on_epoch is not None:
                on_epoch(record)
            if on_checkpoint is not None and record.epoch == CHECKPOINT_EPOCH:
                on_checkpoint(self.replay.checkpoint, record.epoch)
        return dataclasses.replace(self.replay.result, value=max(curve), history=history)


@contextmanager
def replayed_training(replay: Replay, curves: list[list[float]]) -> Iterator[None]:
    original = hpsearch.runtime.trials.train
    hpsearch.runtime.trials.train = ReplayTrainer(replay, curves)
    try:
        yield
    finally:
        hpsearch.runtime.trials.train = original


class OursLoop:
    """A worker serving one study, driven one trial at a time through its own loop steps."""

    def __init__(self, url: str, state: StudyState) -> None:
        store = Store.open(url)
        self.worker = Worker(WorkerOptions(store, "cpu", studies=(state.name,)))
        self.worker._register()

    def trial(self) -> None:
        claimed = self.worker._claim()
        assert claimed is not None, "the budget ran out"
        self.worker._run(*claimed)


class PlainLoop:
    """What a user writes with Optuna alone on the same database: ask, report and ask the
    pruner each epoch, tell."""

    def __init__(self, url: str, spec: StudySpec, name: str) -> None:
        self.spec = spec
        self.study = optuna.load_study(
            study_name=name,
            storage=optuna.storages.RDBStorage(url),
            sampler=make_sampler(spec),
            pruner=make_pruner(spec),
        )
        self.curves: Iterator[list[float]] = iter(())

    def trial(self) -> None:
        curve = next(self.curves)
        trial = self.study.ask()
        suggest_params(trial, self.spec)
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
            trial.should_prune()
        self.study.tell(trial, max(curve))


class AskTellLoop(PlainLoop):
    """Optuna's `ask` and `tell` alone, no epoch reported: the floor under any service that
    keeps its trials in Optuna's storage."""

    def trial(self) -> None:
        curve = next(self.curves)
        trial = self.study.ask()
        suggest_params(trial, self.spec)
        self.study.tell(trial, max(curve))


class SqlCounter:
    """Statements and commits of every engine in this process, over the timed trials."""

    def __init__(self) -> None:
        self.statements = self.commits = 0

    def __enter__(self) -> SqlCounter:
        sqlalchemy.event.listen(sqlalchemy.Engine, "before_cursor_execute", self._statement)
        sqlalchemy.event.listen(sqlalchemy.Engine, "commit", self._commit)
        return self

    def __exit__(self, *_: object) -> None:
        sqlalchemy.event.remove(sqlalchemy.Engine, "before_cursor_execute", self._statement)
        sqlalchemy.event.remove(sqlalchemy.Engine, "commit", self._commit)

    def _statement(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.startswith("BEGIN"):
            self.statements += 1

    def _commit(self, _conn: Any) -> None:
        self.commits += 1


@dataclass
class Side:
    """One way of running trials: seconds per timed trial, and its SQL per trial."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    first: float = 0.0  # the first trial of a fresh process: Optuna's cache loads the study
    counter: SqlCounter = dataclasses.field(default_factory=SqlCounter)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def per_trial(self) -> str:
        n = len(self.seconds)
        return f"{self.counter.statements / n:.0f} / {self.counter.commits / n:.0f}"


@dataclass
class OverheadResult:
    kind: str
    prefilled: int
    pruner: str
    ours: Side
    plain: Side
    ask_tell: Side
    commit_s: float  # one committed one-row write on this database


def measure_overhead(
    url: str, kind: str, n: int, sizes: Sizes, replay: Replay, pruner: str = "median"
) -> tuple[OverheadResult, StudyState]:
    """The three loops on three studies of `n` pre-filled trials in one database,
    alternating in rounds so that all meet the same load on the machine."""
    n_timed = sizes.rounds * sizes.per_round + sizes.warmup
    spec = bench_spec(f"ours-{n}", n + n_timed + 10, pruner)
    store = Store.open(url)
    state = submit_study(store, spec)
    prefill(url, optuna_storage(url).get_study_id_from_name(spec.name), n, spec, seed=1)
    plain_storage = optuna.storages.RDBStorage(url)
    for name in (f"plain-{n}", f"ask-tell-{n}"):
        study_id = plain_storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
        prefill(url, study_id, n, spec, seed=1)

    loops = {
        "ours": OursLoop(url, state),
        "plain": PlainLoop(url, spec, f"plain-{n}"),
        "ask_tell": AskTellLoop(url, spec, f"ask-tell-{n}"),
    }
    loops["plain"].curves = iter(replay.curves(n_timed, seed=2))
    loops["ask_tell"].curves = iter(replay.curves(n_timed, seed=2))
    sides = {label: Side() for label in loops}
    with replayed_training(replay, replay.curves(n_timed, seed=2)):
        for label, loop in loops.items():
            sides[label].first = timed_calls(loop.trial, 1)[0]
        for _ in range(sizes.warmup - 1):
            for loop in loops.values():
                loop.trial()
        for _ in range(sizes.rounds):
            for label, loop in loops.items():
                with sides[label].counter:
                    sides[label].seconds += timed_calls(loop.trial, sizes.per_round)
    result = OverheadResult(kind, n, pruner, **sides, commit_s=commit_seconds(url))
    return result, state


def commit_seconds(url: str, n: int = 50) -> float:
    """Median seconds of one committed one-row insert: each `trial.report` commits once, so
    20 of these are a floor under a trial's 20 reports on any path."""
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE bench_commit (i INTEGER)")

    def write() -> None:
        with engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO bench_commit VALUES (1)")

    seconds = statistics.median(timed_calls(write, n))
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE bench_commit")
    return seconds


def overhead_table(results: list[OverheadResult]) -> str:
    header = [
        "database",
        "finished trials",
        "pruner",
        "hpsearch median (ms)",
        "hpsearch p90 (ms)",
        "plain median (ms)",
        "plain p90 (ms)",
        "hpsearch / plain",
        "ask + tell alone median (ms)",
        "statements / commits per trial, hpsearch; plain; ask + tell",
        "first trial, hpsearch; plain (s)",
        "one commit (ms)",
    ]
    rows = [
        [
            r.kind,
            f"{r.prefilled:,}",
            r.pruner,
            ms(r.ours.median),
            ms(percentile(r.ours.seconds, 90)),
            ms(r.plain.median),
            ms(percentile(r.plain.seconds, 90)),
            f"{r.ours.median / r.plain.median:.2f}",
            ms(r.ask_tell.median),
            f"{r.ours.per_trial()}; {r.plain.per_trial()}; {r.ask_tell.per_trial()}",
            f"{r.ours.first:.2f}; {r.plain.first:.2f}",
            ms(r.commit_s),
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# --- 2. leaderboard and listing latency ---------------------------------------------------


@dataclass
class Endpoint:
    label: str
    path: str
    python_way: Callable[[optuna.storages.RDBStorage], Any]


def endpoints(name: str) -> list[Endpoint]:
    """The three reads, each with the answer computed by loading every trial instead."""
    return [
        Endpoint(
            "leaderboard top 10",
            f"/api/v1/studies/{name}/leaderboard?top=10",
            lambda storage: python_leaderboard(storage, name),
        ),
        Endpoint(
            "studies list", "/api/v1/studies", lambda storage: python_listing(storage, [name])
        ),
        Endpoint(
            "trials page of 50",
            f"/api/v1/studies/{name}/trials?limit=50",
            lambda storage: python_trials_page(storage, name),
        ),
    ]


def python_leaderboard(storage: optuna.storages.RDBStorage, name: str) -> list[Any]:
    study = optuna.load_study(study_name=name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-t.value, t.number))[:10]


def python_listing(storage: optuna.storages.RDBStorage, names: list[str]) -> list[Any]:
    """Each listed study's trials by state and best value."""
    listing = []
    for name in names:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        counts = {state: sum(t.state == state for t in trials) for state in TrialState}
        values = [t.value for t in trials if t.state == TrialState.COMPLETE]
        listing.append((name, counts, max(values, default=None)))
    return listing


def python_trials_page(storage: optuna.storages.RDBStorage, name: str) -> tuple[list[Any], int]:
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    return trials[:50], len(trials)


@dataclass
class LatencyResult:
    kind: str
    label: str
    api: list[float]
    python_way: list[float]
    queries: int  # SQL statements of one request (BEGIN not counted)
    upgrades: int  # of which reads of the schema version (`upgrade`)
    scans: list[str]


def measure_latency(url: str, kind: str, name: str, sizes: Sizes) -> list[LatencyResult]:
    """Each endpoint through the FastAPI app in process (Starlette's TestClient, no network),
    then the load-everything way; the SQL of one request is counted and explained."""
    from fastapi.testclient import TestClient

    from hpsearch.api import Settings, create_app

    client = TestClient(create_app(Settings(database_url=url)))
    storage = optuna.storages.RDBStorage(url)
    results = []
    for endpoint in endpoints(name):
        for _ in range(5):
            check(client.get(endpoint.path))
        with captured_sql(url) as statements:
            check(client.get(endpoint.path))
        api = timed_calls(lambda e=endpoint: check(client.get(e.path)), sizes.requests)
        python_way = timed_calls(lambda e=endpoint: e.python_way(storage), PYTHON_WAY_REPEATS)
        statements = [(sql, args) for sql, args in statements if not sql.startswith("BEGIN")]
        upgrades = sum("hps_alembic_version" in sql for sql, _ in statements)
        scans = full_scans(url, statements)
        results.append(
            LatencyResult(kind, endpoint.label, api, python_way, len(statements), upgrades, scans)
        )
    return results


def check(response: Any) -> Any:
    assert response.status_code == 200, response.text
    return response


def timed_calls(call: Callable[[], Any], n: int) -> list[float]:
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


@contextmanager
def captured_sql(url: str) -> Iterator[list[tuple[str, Any]]]:
    """The statements (with parameters) that the service's engine runs inside the block."""
    engine = make_engine(url)
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    sqlalchemy.event.listen(engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", capture)


TRIAL_TABLES = (
    "trials",
    "trial_values",
    "trial_params",
    "trial_user_attributes",
    "trial_intermediate_values",
)


def full_scans(url: str, statements: list[tuple[str, Any]]) -> list[str]:
    """The trial tables that a captured SELECT reads whole, by the database's own plan
    (PostgreSQL: a Seq Scan; SQLite: a SCAN, with or without a covering index)."""
    engine = make_engine(url)
    postgres = engine.dialect.name == "postgresql"
    explain = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "
    pattern = re.compile(r"Seq Scan on (\w+)" if postgres else r"^SCAN (\w+)")
    scans = set()
    with engine.connect() as connection:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            for row in connection.exec_driver_sql(explain + statement, parameters):
                match = pattern.search(str(row[0] if postgres else row[-1]).strip())
                if match and match.group(1) in TRIAL_TABLES:
                    scans.add(match.group(1))
    return sorted(scans)


def latency_table(results: list[LatencyResult]) -> str:
    header = [
        "database",
        "request",
        "API median (ms)",
        "API p90 (ms)",
        "load-all median (ms)",
        "load-all / API",
        "SQL statements",
        "trial tables read whole",
    ]
    rows = [
        [
            r.kind,
            r.label,
            ms(statistics.median(r.api)),
            ms(percentile(r.api, 90)),
            ms(statistics.median(r.python_way)),
            f"{statistics.median(r.python_way) / statistics.median(r.api):.0f}",
            str(r.queries),
            ", ".join(r.scans) or "none",
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def upgrade_cost(url: str, n: int = 200) -> float:
    """Median seconds of one `upgrade(url)` on a database already at head."""
    return statistics.median(timed_calls(lambda: upgrade(url), n))


# --- 3. sampler latency ---------------------------------------------------------------------


def sampler_latency(sizes: Sizes) -> dict[tuple[str, int], float]:
    """Median seconds per ask on the 5-d mixed space of `bench/samplers.py`."""
    return {
        (sampler, n): ask_seconds(PROBLEMS[-1], sampler, n)
        for sampler in SAMPLER_NAMES
        for n in sizes.ask_sizes
    }


def sampler_table(seconds: dict[tuple[str, int], float], sizes: Sizes) -> str:
    header = ["sampler", *(f"ask @ {n:,} trials (ms)" for n in sizes.ask_sizes)]
    header += [f"/ random @ {n:,}" for n in sizes.ask_sizes]
    rows = [
        [
            sampler,
            *(ms(seconds[sampler, n]) for n in sizes.ask_sizes),
            *(f"{seconds[sampler, n] / seconds['random', n]:.0f}" for n in sizes.ask_sizes),
        ]
        for sampler in SAMPLER_NAMES
    ]
    return markdown_table(header, rows)


# --- 4. load ----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    label: str
    claimants: int
    seconds: float
    told: int  # trials the claimants finished
    errors: int
    first_error: str
    counts: dict[str, int]  # the study's trials by state at the end, read from the database
    budget: int


def claimant(
    url: str, state: StudyState, stream: int, seconds: float, ready: Any, go: Any, out: Any
) -> None:
    """One claimant process: claim (through the worker's retrying claim), report three
    epochs asking the pruner each time, tell; until `seconds` pass or the budget is spent."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = Store.open(url)
    study = open_study(state, store)
    claim = functools.partial(claim_trial, study, state, store)
    rng = np.random.default_rng(stream)
    told = errors = 0
    first_error = ""
    ready.put(stream)
    go.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            claimed = store.retrying(claim)
            if claimed is None:
                break
            trial = claimed.trial
            for epoch in range(1, LOAD_REPORTS + 1):
                trial.report(float(rng.uniform()), epoch)
                trial.should_prune()
            study.tell(trial, float(rng.uniform()))
            told += 1
        except Exception as exc:  # counted, and the claimant goes on
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
    out.put((told, errors, first_error))


def run_load(url: str, label: str, n_trials: int, seconds: float, claimants: int) -> LoadResult:
    """`claimants` processes (spawned, as real workers are) on one study, started together."""
    store = Store.open(url)
    state = submit_study(store, bench_spec(f"load-{label}", n_trials))
    context = multiprocessing.get_context("spawn")
    ready, out, go = context.Queue(), context.Queue(), context.Event()
    processes = [
        context.Process(target=claimant, args=(url, state, i, seconds, ready, go, out))
        for i in range(claimants)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=600)
    start = time.perf_counter()
    go.set()
    outcomes = [out.get(timeout=seconds + 600) for _ in processes]
    elapsed = time.perf_counter() - start
    for process in processes:
        process.join()
    with sqlalchemy.orm.Session(make_engine(url)) as session:
        study_id = optuna_storage(url).get_study_id_from_name(state.name)
        counts = dict(trial_counts(session, [study_id]).get(study_id, {}))
    return LoadResult(
        label,
        claimants,
        elapsed,
        told=sum(o[0] for o in outcomes),
        errors=sum(o[1] for o in outcomes),
        first_error=next((o[2] for o in outcomes if o[2]), ""),
        counts=counts,
        budget=n_trials,
    )


def load_table(results: list[LoadResult]) -> str:
    header = [
        "run",
        "claimants",
        "seconds",
        "trials told",
        "trials / s",
        "errors",
        "complete + pruned + running + waiting",
        "budget",
        "failed",
    ]
    rows = []
    for r in results:
        used = sum(r.counts.get(s, 0) for s in ("complete", "pruned", "running", "waiting"))
        rows.append(
            [
                r.label,
                str(r.claimants),
                f"{r.seconds:.1f}",
                f"{r.told:,}",
                f"{r.told / r.seconds:.1f}",
                str(r.errors),
                f"{used:,}",
                f"{r.budget:,}",
                str(r.counts.get("failed", 0)),
            ]
        )
    return markdown_table(header, rows)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Results:
    overhead: list[OverheadResult]
    latency: list[LatencyResult]
    upgrade_s: dict[str, float]
    asks: dict[tuple[str, int], float]
    load: list[LoadResult]
    checkpoint_bytes: int


def run(sizes: Sizes) -> Results:
    replay = Replay.record()
    overhead, latency, upgrade_s = [], [], {}
    for kind in KINDS:
        for n in sizes.prefilled:
            with database(kind) as url:
                result, state = measure_overhead(url, kind, n, sizes, replay)
                overhead.append(result)
                print(overhead_table(overhead[-1:]), flush=True)
                if n == max(sizes.prefilled):
                    latency += measure_latency(url, kind, state.name, sizes)
                    upgrade_s[kind] = upgrade_cost(url)
                    print(latency_table(latency[-3:]), flush=True)
    for pruner in sizes.pruners:
        with database("postgresql") as url:
            n = max(sizes.prefilled)
            overhead.append(measure_overhead(url, "postgresql", n, sizes, replay, pruner)[0])
            print(overhead_table(overhead[-1:]), flush=True)
    asks = sampler_latency(sizes)
    print(sampler_table(asks, sizes), flush=True)
    with database("postgresql") as url:
        load = [
            run_load(url, "steady", 1_000_000, sizes.load_seconds, sizes.claimants),
            run_load(url, "budget", sizes.load_budget, sizes.load_seconds, sizes.claimants),
        ]
    print(load_table(load), flush=True)
    return Results(overhead, latency, upgrade_s, asks, load, len(replay.checkpoint))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; BENCHMARKS.md untouched")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sizes = QUICK if args.quick else Sizes()
    load, start = os.getloadavg()[0], time.perf_counter()
    results = run(sizes)
    run_seconds = time.perf_counter() - start
    print(f"Run time: {run_seconds:.0f} s")
    if not args.quick:
        write_section(SECTION, section(results, sizes, run_seconds, load))


def section(results: Results, sizes: Sizes, run_seconds: float, load: float) -> str:
    """The Markdown section: what was measured, the tables, and a reading of each."""
    return "\n\n".join(
        [
            SECTION,
            environment(COMMAND, ("optuna", "sqlalchemy", "psycopg", "fastapi", "torch"))
            + f"\n- Run time: {run_seconds:.0f} s; load average {load:.1f} when it started",
            overhead_text(results.overhead, sizes, results.checkpoint_bytes),
            latency_text(results.latency, results.upgrade_s, sizes),
            sampler_text(results.asks, sizes),
            load_text(results.load, sizes),
        ]
    )


def overhead_text(results: list[OverheadResult], sizes: Sizes, checkpoint_bytes: int) -> str:
    median = [r for r in results if r.pruner == "median"]
    pg = max((r for r in median if r.kind == "postgresql"), key=lambda r: r.prefilled)
    halving = "; ".join(
        f"{r.pruner} {ms(r.ours.median)} ms against {ms(r.plain.median)} ms "
        f"(x{r.ours.median / r.plain.median:.2f})"
        for r in results
        if r.pruner != "median"
    )
    holds = pg.ours.median <= 0.020 and pg.ours.median <= pg.plain.median
    n_ours, n_plain = len(pg.ours.seconds), len(pg.plain.seconds)
    commits = pg.ours.counter.commits / n_ours, pg.plain.counter.commits / n_plain
    by_size = ", ".join(
        f"{ms(r.ours.median)} / {ms(r.plain.median)} ms at {r.prefilled:,}"
        for r in median
        if r.kind == "postgresql"
    )
    return f"""### Overhead per trial

A trial with no training, three ways, on the same database and study size, with the random
sampler (so the sampler's own cost does not dominate) and the median pruner; on PostgreSQL
at the largest size also with {" and ".join(sizes.pruners)}:

- hpsearch: one turn of the worker's loop (`Worker._claim` + `Worker._run`): the claim under
  the study's lock (budget counted, stale trials failed, `ask`, first heartbeat), the
  worker's status row, heartbeats, {EPOCHS} reported epochs each with a pruning decision,
  one checkpoint of a 64-128-10 network with its Adam state
  ({checkpoint_bytes / 1000:.0f} kB), the results recorded, the tell, the weights kept among
  the best five, the checkpoints dropped and the completion check.
  `hpsearch.training.train.train` is replaced by a replay of one recorded training of that network
  on digits (its reports, checkpoint and result).
- plain Optuna (`RDBStorage`, what a user writes around it): `ask`, {EPOCHS} x `report` +
  `should_prune`, `tell`.
- `ask` + `tell` alone, nothing reported: the floor under anything that keeps its trials in
  Optuna's storage.

Both hpsearch and plain Optuna report every epoch whatever the pruner answers, so every trial
does the same work. The studies were pre-filled with that many finished trials (one in three
pruned) in Optuna's tables, with params, values, an intermediate value per epoch and the user
attributes a worker records (under sha and hyperband also the rungs each reached, Optuna's
`completed_rung_N` system attributes), then analysed (as autovacuum would have).
{sizes.rounds} rounds of {sizes.per_round} trials per way, alternating, after
{sizes.warmup} untimed ones; "first trial" is the first one of the process, which loads
the whole study into Optuna's trial cache (each worker process pays it once).
"statements / commits" are counted on every engine of the process; "one commit" is a
committed one-row insert on the same database.

{overhead_table(results)}

Reading: on PostgreSQL with {pg.prefilled:,} finished trials a trial costs
{ms(pg.ours.median)} ms through the worker against {ms(pg.plain.median)} ms in plain Optuna
(x{pg.ours.median / pg.plain.median:.2f}, {commits[0]:.0f} commits against {commits[1]:.0f});
the target (median at most 20 ms and no more than plain Optuna's)
{"holds" if holds else "does not hold"}. hpsearch against plain Optuna, median, on
PostgreSQL: {by_size}.

Where plain Optuna's time goes: each `report` is a committed transaction, and the median
pruner reads every trial of the study at each `should_prune` (`study.get_trials`, then the
percentile over the completed ones), so its cost grows with the study. A worker keeps its
reports in memory, where the pruner reads the trial's own values, and writes them with the
trial's checkpoint and results (or every {hpsearch.runtime.trials.WRITE_EVERY_S:.0f} s), each write
one lease-checked transaction; its median and percentile decisions come from the completed
trials' values per epoch kept sorted in memory and caught up from the database at each
trial's first decision and every {REFRESH_S:.0f} s after it, reading only trials it has not
seen finish (`hpsearch.search.pruning`). What remains is mostly Optuna's `ask` and `tell`
({ms(pg.ask_tell.median)} ms alone here: each reads the whole trial back, six statements,
and `ask` sets each param in a transaction of its own), then the checkpoint, the results,
the kept weights and the claim's lock and counts.

Successive halving and hyperband at {max(sizes.prefilled):,} trials on PostgreSQL, hpsearch
against plain Optuna:
{halving}.
Optuna's pruners read every trial of the study at each rung a trial reaches, and hyperband
also reads the trial itself and looks its study up by name at every epoch; a worker judges
from the values recorded at each rung, per bracket, kept sorted in memory and caught up
like the median's view (`hpsearch.search.pruning.RungValues`), and writes the rungs a trial
reaches with its next write."""


def latency_text(results: list[LatencyResult], upgrade_s: dict[str, float], sizes: Sizes) -> str:
    top = [r for r in results if r.label.startswith("leaderboard")]
    holds = all(statistics.median(r.api) < 0.050 for r in top)
    upgrade_lines = "; ".join(
        f"{kind}: {ms(seconds)} ms per call" for kind, seconds in upgrade_s.items()
    )
    calls = max(r.upgrades for r in results) if results else 0
    share = max(
        calls * upgrade_s[r.kind] / statistics.median(r.api) for r in results if r.kind in upgrade_s
    )
    return f"""### Leaderboard and listing latency

The REST API in process (`create_app` behind Starlette's `TestClient`: no network, the whole
app with its auth check and middleware) on the hpsearch study of the largest size above,
{sizes.requests} requests each after 5 of warm-up. "load-all" computes the same answer
the way a script does it with Optuna alone, `optuna.load_study(...).get_trials()` then
sorted or counted in Python ({PYTHON_WAY_REPEATS} runs; it reads every trial each time).
"SQL statements" are those of one request; "trial tables read whole" are the trial tables
that a sequential scan reads in the database's own plan (`EXPLAIN`) of those statements.

{latency_table(results)}

Reading: the leaderboard's top 10 takes
{", ".join(f"{ms(statistics.median(r.api))} ms on {r.kind}" for r in top)}; the target
(under 50 ms) {"holds" if holds else "does not hold"}. Every request is a fixed number of
statements whatever the study's size. Each request checks the schema version {calls} times
(`upgrade`, once for the token check and once in the service function): {upgrade_lines},
at most {share:.0%} of a request, so it was left as it is."""


def sampler_text(asks: dict[tuple[str, int], float], sizes: Sizes) -> str:
    largest = max(sizes.ask_sizes)
    bayes = asks["bayes", largest]
    return f"""### Sampler latency

Median of 5 asks (every param sampled) per sampler, built by `make_sampler` from a parsed
spec, in an in-memory study already holding that many finished random trials of
`bench/samplers.py`'s 5-dimensional mixed space (3 continuous, 1 integer, 1 categorical);
`random` is the baseline. The storage is left out on purpose: its cost is measured above.

{sampler_table(asks, sizes)}

Reading: a `bayes` ask takes {ms(bayes)} ms at {largest:,} trials; the target (under 1 s)
{"holds" if bayes < 1.0 else "does not hold"}. The Gaussian process is fitted on at most the
{BAYES_BEST} best and the {BAYES_RECENT} newest finished trials, so its fit stops growing
past {BAYES_BEST + BAYES_RECENT} trials; what still grows with the study is collecting the
observations, which reads every trial at each ask."""


def load_text(results: list[LoadResult], sizes: Sizes) -> str:
    steady, budget = results
    used = sum(budget.counts.get(s, 0) for s in ("complete", "pruned", "running", "waiting"))
    verdict = "exact" if used == budget.budget else "NOT exact"
    errors = sum(r.errors for r in results)
    first = next((f" (first: `{r.first_error}`)" for r in results if r.first_error), "")
    return f"""### Load

{sizes.claimants} claimant processes (spawned, as workers are) on one PostgreSQL study, each
looping: the worker's claim (`claim_trial` through `with_retries`), {LOAD_REPORTS} x
`report` + `should_prune`, `tell`. "steady": {sizes.load_seconds:.0f} s on a budget that
cannot run out; "budget": the same on a budget of {sizes.load_budget:,}, run until every
claimant is refused. Any exception a claimant sees counts as an error. The last columns are
the study's trials by state in the database afterwards.

{load_table(results)}

Reading: {steady.told / steady.seconds:.0f} trials per second under {steady.claimants}
claimants (claims are serialised by the study's row lock); {errors} errors{first}; the
budget run ends with {used:,} trials counted against a budget of {budget.budget:,}:
{verdict}."""


if __name__ == "__main__":
    main()
