"""The service's own cost, each figure beside a baseline measured in the same run.

1. Overhead per trial: the worker's loop (`Worker._claim` + `Worker._run`: the claim under
   the study's lock with the budget counted, 20 reported epochs with pruning decisions, one
   checkpoint write, the results recorded, the tell, the best weights kept, the completion
   check) with training replaced by a replay of one recorded 20-epoch training of a
   64-128-10 network, one trial at a time and in packs of 32; against plain Optuna on
   `RDBStorage` (`ask`, 20 x `report` + `should_prune`, `tell`) and Optuna's `ask` + `tell`
   alone on the same database, with the random sampler and the median pruner, in studies
   already holding 100, 1,000 and 10,000 finished trials. PostgreSQL's CPU time per trial
   (every server process, from /proc) gives the ceiling of one server.
2. A worker's first claim in a study of 10,000 trials (random and TPE), against Optuna's
   first ask through a fresh `RDBStorage`.
3. Leaderboard and listing latency of the REST API on a study of 10,000 trials, against
   the same answers computed by loading every trial with `optuna.load_study(...).get_trials()`.
4. Sampler latency: time per ask at 100 and 1,000 finished trials (`bench/samplers.py`'s
   `ask_seconds`), against the random sampler.
5. Load: 32 claimant processes on PostgreSQL, claiming one trial at a time as workers did
   before packs were claimed at once, then packs of 8, for 60 s each and against a budget
   of 500, with the random sampler and with TPE.

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
import itertools
import json
import logging
import multiprocessing
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import optuna
import sqlalchemy
from optuna.distributions import distribution_to_json
from optuna.trial import TrialState
from report import environment, markdown_table, scratch_database, write_section
from samplers import PROBLEMS, ask_seconds

import hpsearch.runtime.trials
from hpsearch.data.tensors import load_dataset
from hpsearch.runtime.trials import claim_trials, open_study
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.search.bayes import _MAX_BEST as BAYES_BEST
from hpsearch.search.bayes import _MAX_RECENT as BAYES_RECENT
from hpsearch.search.pruning import Halving, rung_key
from hpsearch.search.space import (
    BUDGET_STATES,
    distributions,
    make_pruner,
    make_sampler,
    suggest_params,
)
from hpsearch.service.recovery import holder_attrs, reap_lost_trials
from hpsearch.service.studies import (
    RUNNABLE_STATES,
    StudyState,
    effective_budget,
    submit_study,
)
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import (
    StorageError,
    Store,
    grace_period_s,
    make_engine,
    optuna_internals,
    optuna_storage,
    upgrade,
)
from hpsearch.storage.db import is_transient
from hpsearch.storage.optuna_internals import (
    StudyModel,
    TrialIntermediateValueModel,
    TrialModel,
    TrialParamModel,
    TrialSystemAttributeModel,
    TrialUserAttributeModel,
    TrialValueModel,
)
from hpsearch.storage.queries import STATE_NAMES, trial_counts
from hpsearch.training.train import EpochRecord, TrainResult, TrialConfig, train

T = TypeVar("T")
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
PACK = 32  # trials a worker claims, trains and tells together in the overhead's pack runs
LOAD_PACK = 8  # trials each claimant claims at once in the load's pack runs
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TRANSIENT_WAIT_S = 0.5  # a claimant refused by the database waits this long, as a worker does
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


def bench_spec(
    name: str, n_trials: int, pruner: str = "median", sampler: str = "random"
) -> StudySpec:
    """The measured studies: three searched params, the random sampler unless told (so that
    the sampler's own cost does not hide the storage's), the median pruner unless told, 20
    epochs."""
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
            "sampler": {"name": sampler, "seed": 0},
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
        history, result = self.run(config)
        for record in history:
            if on_epoch is not None:
                on_epoch(record)
            if on_checkpoint is not None and record.epoch == CHECKPOINT_EPOCH:
                on_checkpoint(self.replay.checkpoint, record.epoch)
        return result

    def run(self, _config: TrialConfig) -> tuple[list[EpochRecord], TrainResult]:
        """The next curve's epochs and the result that ends them."""
        curve = next(self.curves)
        history = [
            dataclasses.replace(record, value=value)
            for record, value in zip(self.replay.result.history, curve, strict=False)
        ]
        return history, dataclasses.replace(self.replay.result, value=max(curve), history=history)


class ReplayPack:
    """Stands in for fused training (`hpsearch.training.fused.train_pack`): every member
    reports the next curve's epochs, hands out the recorded checkpoint once and ends with
    the recorded result, each epoch closed by `on_epoch_end` as the fused pack does."""

    def __init__(self, single: ReplayTrainer) -> None:
        self.single = single

    def __call__(
        self,
        configs: list[TrialConfig],
        data: Any,
        on_epoch: Callable[[int, EpochRecord], bool],
        on_done: Callable[[int, TrainResult], None],
        *,
        on_checkpoint: Callable[[int, bytes, int], None],
        on_epoch_end: Callable[[], None],
        **_options: Any,
    ) -> list[TrainResult]:
        runs = [self.single.run(config) for config in configs]
        epochs = max(len(history) for history, _ in runs)
        for epoch in range(1, epochs + 1):
            for i, (history, result) in enumerate(runs):
                if epoch <= len(history):
                    on_epoch(i, history[epoch - 1])
                if epoch == len(history):
                    on_done(i, result)
                elif epoch == CHECKPOINT_EPOCH:
                    on_checkpoint(i, self.single.replay.checkpoint, epoch)
            on_epoch_end()
        return [result for _, result in runs]


@contextmanager
def replayed_training(replay: Replay, curves: list[list[float]]) -> Iterator[None]:
    """Training replaced by the replay in this process, single trials and packs alike,
    each trial taking the next of `curves`."""
    trials = hpsearch.runtime.trials
    original = trials.train, trials.train_pack
    single = ReplayTrainer(replay, curves)
    trials.train, trials.train_pack = single, ReplayPack(single)
    try:
        yield
    finally:
        trials.train, trials.train_pack = original


class OursLoop:
    """A worker serving one study, driven one claim at a time through its own loop steps:
    one trial, or a pack of `pack` trials trained together."""

    def __init__(self, url: str, state: StudyState, pack: int = 1) -> None:
        store = Store.open(url)
        self.worker = Worker(WorkerOptions(store, "cpu", studies=(state.name,), pack=pack))
        self.worker._register()
        self.size = pack

    def trial(self) -> None:
        claimed = self.worker._claim()
        assert claimed is not None and len(claimed[2]) == self.size, "the budget ran out"
        self.worker._run(*claimed)


class PlainLoop:
    """What a user writes with Optuna alone on the same database: ask, report and ask the
    pruner each epoch, tell."""

    size = 1

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
    """One way of running trials: seconds per timed trial (a pack's time shared among its
    `size` trials), its SQL per trial, and the database server's CPU time per trial."""

    size: int = 1
    seconds: list[float] = dataclasses.field(default_factory=list)
    first: float = 0.0  # the first claim of a fresh process, in seconds
    counter: SqlCounter = dataclasses.field(default_factory=SqlCounter)
    server_cpu_s: float | None = 0.0  # summed over the timed trials; None: not readable

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def statements(self) -> float:
        return self.counter.statements / len(self.seconds)

    @property
    def commits(self) -> float:
        return self.counter.commits / len(self.seconds)

    @property
    def server_ms(self) -> float | None:
        """PostgreSQL's CPU time per trial, in ms."""
        if self.server_cpu_s is None:
            return None
        return 1000 * self.server_cpu_s / len(self.seconds)

    def per_trial(self) -> str:
        return f"{self.statements:.1f} / {self.commits:.2f}"

    def timed(self, call: Callable[[], Any], n: int, url: str) -> None:
        """`n` calls, each timed, with their SQL and the server's CPU time counted."""
        before = server_cpu_seconds(url)
        with self.counter:
            for seconds in timed_calls(call, n):
                self.seconds += [seconds / self.size] * self.size
        after = server_cpu_seconds(url)
        if before is None or after is None or self.server_cpu_s is None:
            self.server_cpu_s = None
        else:
            self.server_cpu_s += after - before


def server_cpu_seconds(url: str) -> float | None:
    """CPU seconds used so far by every PostgreSQL server process of this machine (from
    /proc: the server's own time, whatever its statistics collector has flushed); None
    for SQLite, or a server that is not local."""
    if not url.startswith("postgresql") or ("127.0.0.1" not in url and "localhost" not in url):
        return None
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        if fields[0].endswith("(postgres"):
            utime, stime = fields[1].split()[11:13]
            ticks += int(utime) + int(stime)
    return ticks / os.sysconf("SC_CLK_TCK") if ticks else None


@dataclass
class OverheadResult:
    kind: str
    prefilled: int
    pruner: str
    ours: Side
    pack: Side  # the worker claiming, training and telling PACK trials at a time
    plain: Side
    ask_tell: Side
    commit_s: float  # one committed one-row write on this database


def measure_overhead(
    url: str, kind: str, n: int, sizes: Sizes, replay: Replay, pruner: str = "median"
) -> tuple[OverheadResult, StudyState]:
    """The three loops on three studies of `n` pre-filled trials in one database,
    alternating in rounds so that all meet the same load on the machine."""
    n_timed = sizes.rounds * sizes.per_round + sizes.warmup
    store = Store.open(url)
    states = {}
    for label, size in (("ours", 1), ("pack", PACK)):
        spec = bench_spec(f"{label}-{n}", n + (n_timed + 10) * size, pruner)
        states[label] = submit_study(store, spec)
        prefill(url, optuna_storage(url).get_study_id_from_name(spec.name), n, spec, seed=1)
    plain_storage = optuna.storages.RDBStorage(url)
    for name in (f"plain-{n}", f"ask-tell-{n}"):
        study_id = plain_storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
        prefill(url, study_id, n, spec, seed=1)

    loops = {
        "ours": OursLoop(url, states["ours"]),
        "pack": OursLoop(url, states["pack"], PACK),
        "plain": PlainLoop(url, spec, f"plain-{n}"),
        "ask_tell": AskTellLoop(url, spec, f"ask-tell-{n}"),
    }
    loops["plain"].curves = iter(replay.curves(n_timed, seed=2))
    loops["ask_tell"].curves = iter(replay.curves(n_timed, seed=2))
    sides = {label: Side(loop.size) for label, loop in loops.items()}
    with replayed_training(replay, replay.curves(n_timed * (PACK + 1), seed=2)):
        for label, loop in loops.items():
            sides[label].first = timed_calls(loop.trial, 1)[0]
        for _ in range(sizes.warmup - 1):
            for loop in loops.values():
                loop.trial()
        for _ in range(sizes.rounds):
            for label, loop in loops.items():
                sides[label].timed(loop.trial, sizes.per_round, url)
    result = OverheadResult(kind, n, pruner, **sides, commit_s=commit_seconds(url))
    return result, states["ours"]


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
        f"pack of {PACK}, per trial median (ms)",
        "plain median (ms)",
        "ask + tell alone median (ms)",
        "hpsearch / ask + tell",
        f"pack of {PACK} / ask + tell",
        "statements / commits per trial: hpsearch; pack; plain; ask + tell",
        "first turn, hpsearch; pack; plain (s)",
        "one commit (ms)",
    ]
    rows = [
        [
            r.kind,
            f"{r.prefilled:,}",
            r.pruner,
            ms(r.ours.median),
            ms(percentile(r.ours.seconds, 90)),
            ms(r.pack.median),
            ms(r.plain.median),
            ms(r.ask_tell.median),
            f"{r.ours.median / r.ask_tell.median:.2f}",
            f"{r.pack.median / r.ask_tell.median:.3f}",
            "; ".join(side.per_trial() for side in (r.ours, r.pack, r.plain, r.ask_tell)),
            f"{r.ours.first:.2f}; {r.pack.first:.2f}; {r.plain.first:.2f}",
            ms(r.commit_s),
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def server_table(results: list[OverheadResult]) -> str:
    """PostgreSQL's own CPU time per trial, and the trials per second one server core
    could serve at that cost."""
    header = ["way", "server CPU per trial (ms)", "trials / s per server core", "commits / trial"]
    rows = []
    for r in results:
        for label, side in (
            ("hpsearch, one trial at a time", r.ours),
            (f"hpsearch, pack of {PACK}", r.pack),
            ("plain Optuna", r.plain),
            ("Optuna ask + tell alone", r.ask_tell),
        ):
            if side.server_ms is not None:
                ceiling = 1000 / side.server_ms if side.server_ms > 0 else float("inf")
                rows.append(
                    [label, f"{side.server_ms:.2f}", f"{ceiling:,.0f}", f"{side.commits:.2f}"]
                )
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
    waits: int  # database refusals waited out (`Tally`)
    errors: int
    first_error: str
    counts: dict[str, int]  # the study's trials by state at the end, read from the database
    budget: int
    server_s: float | None  # PostgreSQL's CPU seconds over the run (`server_cpu_seconds`)

    @property
    def server_ms(self) -> str:
        """PostgreSQL's CPU time per trial told."""
        return "n/a" if self.server_s is None else f"{1000 * self.server_s / self.told:.2f}"

    @property
    def rate(self) -> float:
        return self.told / self.seconds

    @property
    def used(self) -> int:
        """The trials that count against the budget."""
        return sum(self.counts.get(s, 0) for s in ("complete", "pruned", "running", "waiting"))


def one_trial_claim(study: optuna.Study, state: StudyState, store: Store) -> optuna.Trial | None:
    """The claim as it was before packs were claimed at once, kept as the load's baseline:
    under the study's lock, the budget counted, then Optuna's `ask`, the first heartbeat,
    the holder and each param in a transaction of its own, the sampler run under the lock."""
    with store.claim(state.id) as claim:
        if claim.record.state not in RUNNABLE_STATES:
            return None
        claim.beat_for_orphans()
        reap_lost_trials(study, claim, grace_period_s())
        counts = claim.trial_counts()
        used = sum(counts.get(STATE_NAMES[s], 0) for s in BUDGET_STATES)
        waiting = counts.get(STATE_NAMES[TrialState.WAITING], 0) > 0
        if not waiting and used >= effective_budget(state.spec, claim.record.n_trials):
            return None
        trial = study.ask()
        optuna_internals.study_storage(study).record_heartbeat(optuna_internals.trial_id(trial))
        for key, value in holder_attrs().items():
            optuna_internals.set_system_attr(study, trial, key, value)
        suggest_params(trial, state.spec)
        return trial


@dataclass
class Tally:
    """What one claimant did: trials told, database refusals waited out as a worker waits
    them out (`is_transient`: every connection slot taken, say), and other errors."""

    told: int = 0
    waits: int = 0
    errors: int = 0
    first_error: str = ""

    def failed(self, exc: Exception) -> None:
        if is_transient(exc):
            self.waits += 1
            time.sleep(TRANSIENT_WAIT_S)
            return
        self.errors += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"[:300]


def waiting_out(tally: Tally, fn: Callable[[], T]) -> T:
    """`fn()` once the database accepts it, refusals waited out (opening a store or a
    study, as a worker waits at its start)."""
    while True:
        try:
            return fn()
        except StorageError as exc:
            if not is_transient(exc):
                raise
            tally.failed(exc)


def one_trial_at_a_time(
    url: str, state: StudyState, seconds: float, stream: int, _replay: Replay
) -> Tally:
    """Claim one trial (`one_trial_claim`), report LOAD_REPORTS epochs asking the pruner
    each time, tell; until `seconds` pass or the budget is spent."""
    tally = Tally()
    store = waiting_out(tally, lambda: Store.open(url))
    study = waiting_out(tally, lambda: open_study(state, store))
    rng = np.random.default_rng(stream)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            trial = one_trial_claim(study, state, store)
            if trial is None:
                break
            for epoch in range(1, LOAD_REPORTS + 1):
                trial.report(float(rng.uniform()), epoch)
                trial.should_prune()
            study.tell(trial, float(rng.uniform()))
            tally.told += 1
        except Exception as exc:  # counted, and the claimant goes on
            tally.failed(exc)
    return tally


def packs_at_a_time(
    url: str, state: StudyState, seconds: float, stream: int, replay: Replay
) -> Tally:
    """A worker claiming LOAD_PACK trials at once and running each pack with its training
    replayed (LOAD_REPORTS epochs of random values per trial): reports, pruning decisions,
    checkpoints and tells written together."""
    rng = np.random.default_rng(stream)
    curves = ([float(v) for v in rng.uniform(size=LOAD_REPORTS)] for _ in itertools.count())
    tally = Tally()
    store = waiting_out(tally, lambda: Store.open(url))
    worker = Worker(WorkerOptions(store, "cpu", studies=(state.name,), pack=LOAD_PACK))
    worker._register()
    deadline = time.monotonic() + seconds
    with replayed_training(replay, curves):
        while time.monotonic() < deadline:
            try:
                claimed = worker._claim()
                if claimed is None:
                    break
                outcomes = worker._run(*claimed)
                tally.told += sum(o in FINISHED for o in outcomes)
            except Exception as exc:  # counted, and the claimant goes on
                tally.failed(exc)
    return tally


FLAVOURS = {"one": one_trial_at_a_time, "pack": packs_at_a_time}


def claimant(
    url: str,
    state: StudyState,
    flavour: str,
    replay: Replay,
    stream: int,
    seconds: float,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """One claimant process, started with the others, counting what it told and met."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.disable(logging.WARNING)
    ready.put(stream)
    go.wait()
    try:
        out.put(FLAVOURS[flavour](url, state, seconds, stream, replay))
    except Exception as exc:  # a claimant that could not even start
        out.put(Tally(errors=1, first_error=f"{type(exc).__name__}: {exc}"[:300]))


def run_load(
    url: str,
    label: str,
    flavour: str,
    sampler: str,
    n_trials: int,
    seconds: float,
    claimants: int,
    replay: Replay,
) -> LoadResult:
    """`claimants` processes (spawned, as real workers are) on one study, started together."""
    store = Store.open(url)
    state = submit_study(store, bench_spec(f"load-{label}", n_trials, sampler=sampler))
    context = multiprocessing.get_context("spawn")
    ready, out, go = context.Queue(), context.Queue(), context.Event()
    processes = [
        context.Process(
            target=claimant, args=(url, state, flavour, replay, i, seconds, ready, go, out)
        )
        for i in range(claimants)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=600)
    cpu_before = server_cpu_seconds(url)
    start = time.perf_counter()
    go.set()
    tallies: list[Tally] = [out.get(timeout=seconds + 600) for _ in processes]
    elapsed = time.perf_counter() - start
    cpu_after = server_cpu_seconds(url)
    for process in processes:
        process.join()
    with sqlalchemy.orm.Session(make_engine(url)) as session:
        study_id = optuna_storage(url).get_study_id_from_name(state.name)
        counts = dict(trial_counts(session, [study_id]).get(study_id, {}))
    server_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return LoadResult(
        label,
        claimants,
        elapsed,
        told=sum(t.told for t in tallies),
        waits=sum(t.waits for t in tallies),
        errors=sum(t.errors for t in tallies),
        first_error=next((t.first_error for t in tallies if t.first_error), ""),
        counts=counts,
        budget=n_trials,
        server_s=server_s,
    )


def load_table(results: list[LoadResult]) -> str:
    header = [
        "run",
        "claimants",
        "seconds",
        "trials told",
        "trials / s",
        "server CPU / trial (ms)",
        "refusals waited out",
        "errors",
        "complete + pruned + running + waiting",
        "budget",
        "failed",
    ]
    rows = [
        [
            r.label,
            str(r.claimants),
            f"{r.seconds:.1f}",
            f"{r.told:,}",
            f"{r.rate:.1f}",
            r.server_ms,
            str(r.waits),
            str(r.errors),
            f"{r.used:,}",
            f"{r.budget:,}",
            str(r.counts.get("failed", 0)),
        ]
        for r in results
    ]
    return markdown_table(header, rows)


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstClaim:
    """A joining worker's first claim in a study of `prefilled` finished trials."""

    sampler: str
    prefilled: int
    ours_s: float  # hpsearch's `claim_trials` of a process that has not read the study
    optuna_s: float  # `optuna.load_study` + `ask` + the params, through a fresh RDBStorage


def measure_first_claims(url: str, n: int, samplers: tuple[str, ...]) -> list[FirstClaim]:
    """The first claim of a process in a study of `n` finished trials, per sampler, against
    what a process joining with Optuna alone pays for its first trial."""
    store = Store.open(url)
    results = []
    for sampler in samplers:
        spec = bench_spec(f"first-{sampler}", n + 10, sampler=sampler)
        state = submit_study(store, spec)
        prefill(url, optuna_storage(url).get_study_id_from_name(spec.name), n, spec, seed=3)
        plain = f"first-plain-{sampler}"
        storage = optuna.storages.RDBStorage(url)
        study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], plain)
        prefill(url, study_id, n, spec, seed=3)
        start = time.perf_counter()
        assert claim_trials(open_study(state, store), state, store, 1)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        study = optuna.load_study(
            study_name=plain, storage=optuna.storages.RDBStorage(url), sampler=make_sampler(spec)
        )
        suggest_params(study.ask(), spec)
        results.append(FirstClaim(sampler, n, ours, time.perf_counter() - start))
    return results


def first_claim_table(results: list[FirstClaim]) -> str:
    header = ["sampler", "finished trials", "hpsearch first claim (s)", "Optuna first ask (s)"]
    rows = [
        [r.sampler, f"{r.prefilled:,}", f"{r.ours_s:.2f}", f"{r.optuna_s:.2f}"] for r in results
    ]
    return markdown_table(header, rows)


@dataclass
class Results:
    overhead: list[OverheadResult]
    latency: list[LatencyResult]
    upgrade_s: dict[str, float]
    asks: dict[tuple[str, int], float]
    first_claims: list[FirstClaim]
    load: list[LoadResult]
    checkpoint_bytes: int


def run(sizes: Sizes) -> Results:
    replay = Replay.record()
    overhead, latency, upgrade_s, first_claims = [], [], {}, []
    for kind in KINDS:
        for n in sizes.prefilled:
            with scratch_database(kind, ADMIN_URL, "service") as url:
                result, state = measure_overhead(url, kind, n, sizes, replay)
                overhead.append(result)
                print(overhead_table(overhead[-1:]), flush=True)
                if n == max(sizes.prefilled):
                    latency += measure_latency(url, kind, state.name, sizes)
                    upgrade_s[kind] = upgrade_cost(url)
                    print(latency_table(latency[-3:]), flush=True)
                if n == max(sizes.prefilled) and kind == "postgresql":
                    print(server_table(overhead[-1:]), flush=True)
                    first_claims = measure_first_claims(url, n, ("random", "tpe"))
                    print(first_claim_table(first_claims), flush=True)
    for pruner in sizes.pruners:
        with scratch_database("postgresql", ADMIN_URL, "service") as url:
            n = max(sizes.prefilled)
            overhead.append(measure_overhead(url, "postgresql", n, sizes, replay, pruner)[0])
            print(overhead_table(overhead[-1:]), flush=True)
    asks = sampler_latency(sizes)
    print(sampler_table(asks, sizes), flush=True)
    load = []
    for sampler in ("random", "tpe"):
        with scratch_database("postgresql", ADMIN_URL, "service") as url:
            runs = [
                ("one", 1_000_000, "steady"),
                ("pack", 1_000_000, "steady"),
                ("pack", sizes.load_budget, "budget"),
            ]
            for flavour, budget, kind in runs:
                label = f"{flavour}-{sampler}-{kind}"
                load.append(
                    run_load(
                        url,
                        label,
                        flavour,
                        sampler,
                        budget,
                        sizes.load_seconds,
                        sizes.claimants,
                        replay,
                    )
                )
                print(load_table(load[-1:]), flush=True)
    return Results(overhead, latency, upgrade_s, asks, first_claims, load, len(replay.checkpoint))


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
            server_text(results.overhead, sizes),
            first_claim_text(results.first_claims),
            latency_text(results.latency, results.upgrade_s, sizes),
            sampler_text(results.asks, sizes),
            load_text(results.load, sizes),
        ]
    )


def overhead_text(results: list[OverheadResult], sizes: Sizes, checkpoint_bytes: int) -> str:
    median = [r for r in results if r.pruner == "median"]
    pg = max((r for r in median if r.kind == "postgresql"), key=lambda r: r.prefilled)
    pack_ratio = pg.pack.median / pg.ask_tell.median
    holds = pack_ratio <= 0.25 and pg.pack.commits <= 1
    halving = "; ".join(
        f"{r.pruner}: one at a time {ms(r.ours.median)} ms, in a pack {ms(r.pack.median)} ms, "
        f"plain Optuna {ms(r.plain.median)} ms"
        for r in results
        if r.pruner != "median"
    )
    return f"""### Overhead per trial

A trial with no training, four ways, on the same database and study size, with the random
sampler (so the sampler's own cost does not dominate) and the median pruner; on PostgreSQL
at the largest size also with {" and ".join(sizes.pruners)}:

- hpsearch, one trial at a time: one turn of the worker's loop (`Worker._claim` +
  `Worker._run`, `--pack 1`): the claim (under the study's lock the budget counted, stale
  trials failed, the trial started with its first heartbeat and holder; then its params
  drawn and written), the worker's status row, {EPOCHS} reported epochs each with a pruning
  decision, one checkpoint of a 64-128-10 network with its Adam state
  ({checkpoint_bytes / 1000:.0f} kB), the results recorded, the tell, the weights kept among
  the best five, the checkpoints dropped and the completion check.
- hpsearch, a pack of {PACK}: the same turn with `--pack {PACK}`: {PACK} trials claimed in
  one transaction, drawn and written in one more, and every epoch's reports, the
  checkpoints, results, tells, kept weights and dropped checkpoints of all members written
  together; its time is shared among its {PACK} trials.
- plain Optuna (`RDBStorage`, what a user writes around it): `ask`, {EPOCHS} x `report` +
  `should_prune`, `tell`.
- `ask` + `tell` alone, nothing reported: the floor under anything that keeps its trials
  one by one in Optuna's storage.

Training is replaced by a replay of one recorded training of that network on digits (its
reports, checkpoint and result; `train` and `train_pack`), and every way reports every epoch
whatever the pruner answers, so every trial does the same work. The studies were pre-filled
with that many finished trials (one in three pruned) in Optuna's tables, with params,
values, an intermediate value per epoch and the user attributes a worker records (under sha
and hyperband also the rungs each reached), then analysed (as autovacuum would have).
{sizes.rounds} rounds of {sizes.per_round} claims per way, alternating, after
{sizes.warmup} untimed ones; "first turn" is the first claim and trial (or pack) of the
process: its pruning view reads the study's completed curves then, and plain Optuna's
cache loads every trial.
"statements / commits" are counted on every engine of the process, per trial (a read-only
transaction counts as a commit); "one commit" is a committed one-row insert on the same
database.

{overhead_table(results)}

Reading: on PostgreSQL with {pg.prefilled:,} finished trials, a trial in a pack of {PACK}
costs {ms(pg.pack.median)} ms of bookkeeping and {pg.pack.commits:.2f} commits, against
{ms(pg.ask_tell.median)} ms for Optuna's own `ask` + `tell` (x{pack_ratio:.3f}); the target
(at most a quarter of `ask` + `tell`, at most one commit per trial) {
        "holds" if holds else "does not hold"
    }. One trial at a time costs {ms(pg.ours.median)} ms
(x{pg.ours.median / pg.ask_tell.median:.2f} `ask` + `tell`); the run before packs were
claimed at once measured 75.9 ms here (x2.1). Plain Optuna, reporting every epoch through
`RDBStorage` and its median pruner reading every trial, costs {ms(pg.plain.median)} ms.

Where a pack's time goes: its checkpoints ({PACK} x {checkpoint_bytes / 1000:.0f} kB in one
statement, stored uncompressed), the {PACK} x {EPOCHS} reports and the recorded results (one
multi-row statement per table), and the claim. With {" and ".join(sizes.pruners)} at
{max(sizes.prefilled):,} trials on PostgreSQL: {halving}."""


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
statements whatever the study's size. A request checks the schema version {calls} times
(the server migrates once, as it starts: `Store.open`); one check (`upgrade`) costs
{upgrade_lines}, {share:.0%} of a request."""


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
    by_label = {r.label: r for r in results}
    ratios = {
        sampler: (by_label[f"pack-{sampler}-steady"].rate / by_label[f"one-{sampler}-steady"].rate)
        for sampler in ("random", "tpe")
    }
    budgets = [r for r in results if r.label.endswith("budget")]
    exact = all(r.used == r.budget for r in budgets)
    errors = sum(r.errors + r.counts.get("failed", 0) for r in results)
    waits = sum(r.waits for r in results)
    first = next((f" (first: `{r.first_error}`)" for r in results if r.first_error), "")
    one, pack = by_label["one-random-steady"], by_label["pack-random-steady"]
    return f"""### Load

{sizes.claimants} claimant processes (spawned, as workers are) on one PostgreSQL study per
run, two ways side by side, with the random sampler and then with TPE:

- "one": one trial at a time, as workers claimed before packs were claimed at once
  (`one_trial_claim`, kept here as the baseline: under the study's lock the budget counted,
  Optuna's `ask`, the first heartbeat, the holder and each param in a transaction of its own,
  the sampler run under the lock), then {LOAD_REPORTS} x `report` + `should_prune` and `tell`
  through Optuna;
- "pack": a worker (`Worker._claim` + `Worker._run`, `--pack {LOAD_PACK}`) whose training is
  replayed ({LOAD_REPORTS} epochs of random values per trial): {LOAD_PACK} trials claimed in one
  transaction, their params drawn outside the lock and written in one more, each epoch's
  reports and pruning decisions, the members' checkpoints, results and tells written together.

"steady": {sizes.load_seconds:.0f} s on a budget that cannot run out; "budget": the same on a
budget of {sizes.load_budget:,}, run until every claimant is refused. "Server CPU / trial" is
PostgreSQL's CPU time over the run (every server process, from /proc) per trial told.
{sizes.claimants} processes hold more connections than PostgreSQL's default 100: a claimant
refused one ("too many clients") waits {TRANSIENT_WAIT_S} s and goes on, as a worker waits out a
transient database error ("refusals waited out"); any other exception counts as an error.
The last columns are the study's trials by state in the database afterwards.

{load_table(results)}

Reading: packs of {LOAD_PACK} serve {ratios["random"]:.1f}x the trials per second of one-trial
claims with the random sampler and {ratios["tpe"]:.1f}x with TPE, where the sampler's own time
dominates (it runs outside the lock for packs, under it one at a time); PostgreSQL's CPU per
trial falls from {one.server_ms} ms to {pack.server_ms} ms. {errors} errors or failed
trials{first}, {waits} refusals waited out; the budget runs end with
{", ".join(f"{r.used:,} trials against {r.budget:,}" for r in budgets)}:
{"exact" if exact else "NOT exact"}."""


def server_text(results: list[OverheadResult], sizes: Sizes) -> str:
    pg = [r for r in results if r.kind == "postgresql" and r.pruner == "median"]
    largest = max(pg, key=lambda r: r.prefilled)
    cores = os.cpu_count() or 1
    ours, pack = largest.ours.server_ms or 0.0, largest.pack.server_ms or 0.0
    return f"""### The ceiling of one database

PostgreSQL's own CPU time per trial in the overhead runs above at {largest.prefilled:,}
finished trials (the median pruner): the user and system time of every PostgreSQL server
process of this machine (`/proc/<pid>/stat`: backends, WAL writer, checkpointer), read
before and after each round of each way and shared among its trials. "Trials / s per
server core" is what one core of such a server could serve at that cost; this machine's
server has {cores}.

{server_table([largest])}

Reading: one trial at a time costs the server {ours:.2f} ms of CPU, a trial in a pack of
{PACK} {pack:.2f} ms; one server core would serve about
{1000 / ours if ours else float("inf"):,.0f} and {1000 / pack if pack else float("inf"):,.0f}
trials per second. Commits are the other cost: each is a flush of the write-ahead log, which
PostgreSQL groups across concurrent sessions."""


def first_claim_text(results: list[FirstClaim]) -> str:
    if not results:
        return ""
    largest = max(r.prefilled for r in results)
    return f"""### A worker joining a large study

The first claim of a process in a PostgreSQL study of {largest:,} finished trials (as
pre-filled above), per sampler: hpsearch's `claim_trials` in a process that has not read the
study, against `optuna.load_study` + `ask` + the params through a fresh `RDBStorage`, the
first trial of a process that joins with Optuna alone.

{first_claim_table(results)}

Optuna's cache builds every trial whole through its ORM at the first request for the
study's trials (every epoch's value and user attribute included), which TPE makes at its
first ask. hpsearch's samplers read the study through `storage.history`: states, params,
values, system attributes and each trial's last report, one query per table, then only what
changed."""


if __name__ == "__main__":
    main()
