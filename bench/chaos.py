"""Chaos: workers killed with SIGKILL while they train, and what the fleet's recovery costs.

A study of digits trials (a 64-128-10 network, a checkpoint every epoch, early stopping and
pruning off, so every trial trains every epoch; the random sampler with a fixed seed) is
run on PostgreSQL by `hpsearch worker` processes (CPU, one thread each; heartbeat 2 s,
grace period 10 s), each run a new study of the same spec, timed from its submit to its
completion with its workers started and registered beforehand:

1. fault-free;
2. faulty: every `--interval` seconds one busy worker (one holding a running trial, by the
   trial's recorded holder) is killed with SIGKILL and a replacement started at once, for
   `--rounds` rounds (a round waits for a busy worker when none is);
3. start-ups only, no kills: at the same pace, a process that does what a replacement
   does before it trains (hpsearch's imports, and torch._dynamo, which torch's first
   optimizer imports), to tell the cost of starting processes on shared cores from the
   cost of recovery.

    python bench/chaos.py [--trials 30] [--epochs 30] [--workers 3] [--rounds 10]
        [--interval 3] [--smoke] [--logs DIR] [--url postgresql://...]

Reported: the times and their ratios, the machine's CPU use, the kills, the retries (trials
with the system attribute `failed_trial`), those resumed from a checkpoint (user attribute
`resumed_from_epoch`), the budget check (exactly `--trials` complete, none running or
waiting), live workers' trials failed (must be none); and, from the workers' logs (JSON
lines) and the kill times, where each kill's time went.

The database is made and dropped by the script on the server of `--url` (default
$HPSEARCH_BENCH_POSTGRES_URL, else the test server). Writes the "Recovery under chaos"
section of BENCHMARKS.md; `--smoke` runs a small size without the start-ups run in well
under a minute and leaves BENCHMARKS.md alone. The JSON summary is printed last; the exit
status is 1 when a budget check fails or a live worker's trial was failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial
from report import environment, markdown_table, write_section

from hpsearch.service.holders import HOLDER_ATTR
from hpsearch.service.studies import submit_study
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store, optuna_storage, upgrade

T = TypeVar("T")
Mode = Literal["fault-free", "faulty", "start-ups"]
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
TITLE = "## Recovery under chaos"
HEARTBEAT_S = 2
GRACE_S = 10
GOAL_RATIO = 1.5  # Ray Tune's fault-tolerance test: at most 1.5x the fault-free time
POLL_S = 0.1
START_WAIT_S = 120.0  # for workers to register
RUN_WAIT_S = 1800.0  # for a study to complete
WORKER_ENV = {
    "HPSEARCH_HEARTBEAT_S": str(HEARTBEAT_S),
    "HPSEARCH_GRACE_PERIOD_S": str(GRACE_S),
    # Several workers share the cores: one thread each trains faster than contending ones.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# What a replacement worker costs before it trains, without the worker.
START_UP = "import hpsearch.cli.commands, torch._dynamo"
# The steps of a kill's recovery that the report times, with their labels.
STEPS = {
    "lost": "kill -> its trial failed and its retry queued (s)",
    "queued": "retry queued -> claimed (s)",
    "start-up": "replacement started -> its `started` log line (s)",
    "first claim": "replacement started -> its first claim (s)",
    "epochs redone": "checkpointed epochs the finished retry did not resume from",
}


@dataclass(frozen=True)
class Size:
    trials: int
    epochs: int
    workers: int
    rounds: int
    interval: float


DEFAULT = Size(trials=30, epochs=30, workers=3, rounds=10, interval=3.0)
SMOKE = Size(trials=4, epochs=8, workers=2, rounds=1, interval=1.0)


def bench_spec(name: str, size: Size) -> StudySpec:
    return parse_spec(
        {
            "name": name,
            "dataset": {"source": "builtin", "name": "digits"},
            "split": {"val": 0.2, "test": 0.1, "seed": 0},
            "model": {"hidden": [128]},
            "search_space": {
                "learning_rate": {"low": 1e-5, "high": 1e-2, "log": True},
                "batch_size": {"low": 32, "high": 256, "log": True},
                "dropout": {"low": 0.2, "high": 0.7},
            },
            "training": {
                "max_epochs": size.epochs,
                "early_stopping_patience": None,
                "checkpoint_every_s": 0,
            },
            "objective": {"metric": "val_accuracy"},
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "budget": {"n_trials": size.trials},
        }
    )


# --- the database, seen from outside -----------------------------------------------------


class Db:
    """Plain SQL on Optuna's and hpsearch's tables."""

    def __init__(self, url: str) -> None:
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)

    def rows(self, sql: str, **params: Any) -> list[sqlalchemy.Row[Any]]:
        with self.engine.connect() as connection:
            return list(connection.execute(sqlalchemy.text(sql), params))

    def study_state(self, name: str) -> str | None:
        found = self.rows("SELECT state FROM hps_studies WHERE name = :name", name=name)
        return found[0][0] if found else None

    def registered(self, pids: set[int]) -> int:
        """How many of these processes registered as workers."""
        return sum(pid in pids for (pid,) in self.rows("SELECT pid FROM hps_workers"))

    def held(self, study: str) -> dict[int, int]:
        """PID of the holder -> number of the running trial it holds."""
        rows = self.rows(
            "SELECT t.number, a.value_json FROM trials t "
            "JOIN studies s ON s.study_id = t.study_id "
            "JOIN trial_system_attributes a ON a.trial_id = t.trial_id "
            "WHERE s.study_name = :name AND t.state = 'RUNNING' AND a.key = :key",
            name=study,
            key=HOLDER_ATTR,
        )
        holders = {number: json.loads(value) for number, value in rows}
        return {int(h.split("/")[3]): n for n, h in holders.items() if isinstance(h, str)}

    def checkpoints(self, study: str) -> dict[int, int]:
        """trial number -> the epoch of its checkpoint."""
        rows = self.rows(
            "SELECT c.trial_number, c.epoch FROM hps_checkpoints c "
            "JOIN hps_studies s ON s.id = c.study_id WHERE s.name = :name",
            name=study,
        )
        return dict(rows)


@contextmanager
def scratch_database(url: str) -> Iterator[str]:
    """A new database on the server of `url`, dropped at the end; yields its URL."""
    server = sqlalchemy.make_url(url).set(drivername="postgresql+psycopg")
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    database = f"hpsearch_bench_chaos_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    try:
        yield server.set(database=database).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE "{database}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def logs_folder(kept: Path | None) -> Iterator[Path]:
    """`kept`, made new, or a temporary folder deleted at the end."""
    if kept is not None:
        kept.mkdir(parents=True)
        yield kept
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


# --- processes -----------------------------------------------------------------------------


@dataclass
class Fleet:
    """`hpsearch worker` processes, each logging JSON lines to a file of its own, and the
    start-up processes of the start-ups run."""

    url: str
    directory: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: dict[int, float] = field(default_factory=dict)  # pid -> time.time() at start
    killed: set[int] = field(default_factory=set)

    def start(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "hpsearch", "worker", "--db", self.url]
        return self._spawn([*command, "--device", "cpu", "--threads", "1", "--log-format", "json"])

    def start_up_only(self) -> subprocess.Popen[bytes]:
        return self._spawn([sys.executable, "-c", START_UP])

    def _spawn(self, command: list[str]) -> subprocess.Popen[bytes]:
        log = self.directory / f"worker-{len(self.processes)}.jsonl"
        env = os.environ | WORKER_ENV | {"HPSEARCH_DATA_DIR": str(self.directory)}
        with open(log, "wb") as err:
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        self.started[process.pid] = time.time()
        self.processes.append(process)
        return process

    def alive(self) -> dict[int, subprocess.Popen[bytes]]:
        return {p.pid: p for p in self.processes if p.poll() is None}

    def kill(self, pid: int) -> None:
        process = self.alive()[pid]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        self.killed.add(pid)

    def stop(self) -> None:
        """SIGTERM: idle workers exit 0 at once; SIGKILL whatever is left after a minute."""
        for process in self.alive().values():
            if process.args[1:3] == ["-m", "hpsearch"]:  # start-ups end by themselves
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def crashed(self) -> list[int]:
        """Processes that exited on their own with an error."""
        return [
            p.pid for p in self.processes if p.pid not in self.killed and p.poll() not in (None, 0)
        ]

    def records(self) -> list[dict[str, Any]]:
        """Every log record of every worker, oldest first, with `at` (time.time())."""
        found = []
        for path in sorted(self.directory.glob("worker-*.jsonl")):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue  # a traceback's lines, say
                record = json.loads(line)
                record["at"] = datetime.fromisoformat(record["time"]).timestamp()
                found.append(record)
        return sorted(found, key=lambda r: r["at"])

    def tail(self, lines: int = 20) -> str:
        """The end of every worker's log, for an error message."""
        return "\n".join(
            f"--- {path.name}:\n"
            + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in sorted(self.directory.glob("worker-*.jsonl"))
        )


def wait_until(what: str, probe: Callable[[], T | None], fleet: Fleet, timeout: float) -> T:
    """Poll `probe` until it returns something true; an error at the deadline or when a
    process crashed."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if fleet.crashed():
            raise RuntimeError(f"a worker exited with an error before {what}\n{fleet.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out after {timeout:.0f} s waiting for {what}\n{fleet.tail()}"
            )
        time.sleep(POLL_S)
    return value


class CpuMeter:
    """The machine's CPU use (/proc/stat: busy share of all cores) and the CPU seconds of
    this process's children that ended, between `start` and `stop`."""

    def start(self) -> None:
        self._stat, self._children = _proc_stat(), _children_cpu_s()

    def stop(self) -> tuple[float, float]:
        """(busy fraction of the machine, children's CPU seconds)."""
        (busy0, total0), (busy1, total1) = self._stat, _proc_stat()
        return (busy1 - busy0) / max(1, total1 - total0), _children_cpu_s() - self._children


def _proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return sum(ticks) - idle, sum(ticks)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- one run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    at: float  # time.time()
    pid: int
    trial: int  # the number of the trial it held
    checkpoints: dict[int, int]  # the study's checkpoints just after: number -> epoch
    replacement: int  # the PID of the worker started in its place


@dataclass
class Run:
    mode: Mode
    seconds: float
    cpu_busy: float  # share of the machine's cores busy while the study ran
    cpu_s: float  # CPU seconds of the run's processes, their start-up included
    kills: list[Kill]
    trials: list[FrozenTrial]
    records: list[dict[str, Any]]  # the workers' log records
    started: dict[int, float]  # pid -> time.time() at start

    @property
    def states(self) -> Counter[str]:
        return Counter(t.state.name for t in self.trials)

    @property
    def retries(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.system_attrs.get("failed_trial") is not None]

    @property
    def finished_retries(self) -> list[FrozenTrial]:
        """Retries that trained to the end (a retry killed in turn is retried too)."""
        return [t for t in self.retries if t.state.name == "COMPLETE"]

    @property
    def resumed(self) -> list[FrozenTrial]:
        return [t for t in self.finished_retries if "resumed_from_epoch" in t.user_attrs]

    def budget_ok(self, n_trials: int) -> bool:
        states = self.states
        return states["COMPLETE"] == n_trials and states["RUNNING"] + states["WAITING"] == 0

    def taken_from_live(self) -> list[int]:
        """Trials failed while their worker lived (never to happen): failed as lost though
        no kill hit them, or told by their worker that they were taken away."""
        killed = {k.trial for k in self.kills}
        lost = {r["trial"] for r in self.records if "is lost" in r["message"]}
        taken = {r["trial"] for r in self.records if "failed as stale" in r["message"]}
        return sorted((lost - killed) | taken)


def run_study(url: str, size: Size, directory: Path, mode: Mode) -> Run:
    """Start the workers, submit the study (named after `mode`), disturb it as `mode` says
    until it completes, and time it."""
    directory.mkdir()
    db, fleet, meter = Db(url), Fleet(url, directory), CpuMeter()
    meter.start()
    try:
        for _ in range(size.workers):
            fleet.start()
        wait_until(
            "the workers registered",
            lambda: db.registered(set(fleet.started)) >= size.workers,
            fleet,
            START_WAIT_S,
        )
        started = time.time()
        store = Store.open(url)
        submit_study(store, bench_spec(mode, size))
        kills = _disturb(db, fleet, size, mode, started)
        seconds = time.time() - started
        cpu_busy, _ = meter.stop()
    finally:
        fleet.stop()
        db.engine.dispose()
    storage = optuna_storage(url)
    trials = optuna.load_study(study_name=mode, storage=storage).get_trials()
    cpu_s = meter.stop()[1]
    return Run(mode, seconds, cpu_busy, cpu_s, kills, trials, fleet.records(), fleet.started)


def _disturb(db: Db, fleet: Fleet, size: Size, mode: Mode, started: float) -> list[Kill]:
    """Until the study completes: nothing (fault-free), or every `size.interval` seconds
    for `size.rounds` rounds, kill a busy worker and start a replacement (faulty), or start
    a start-up process (start-ups)."""
    rng = random.Random(0)
    kills: list[Kill] = []
    rounds, due = 0, started + size.interval
    deadline = time.monotonic() + RUN_WAIT_S
    while db.study_state(mode) != "completed":
        if fleet.crashed() or time.monotonic() > deadline:
            raise RuntimeError(f"study {mode} did not complete\n{fleet.tail()}")
        if mode != "fault-free" and rounds < size.rounds and time.time() >= due:
            if mode == "start-ups":
                fleet.start_up_only()
            elif (kill := _kill_one(db, fleet, mode, rng)) is not None:
                kills.append(kill)
            else:
                time.sleep(POLL_S)
                continue  # no worker is busy: the round waits for one
            rounds, due = rounds + 1, time.time() + size.interval
        time.sleep(POLL_S)
    return kills


def _kill_one(db: Db, fleet: Fleet, name: str, rng: random.Random) -> Kill | None:
    """SIGKILL one of the fleet's workers that holds a running trial and start another in
    its place at once; None when none holds one."""
    alive = fleet.alive()
    busy = {pid: number for pid, number in db.held(name).items() if pid in alive}
    if not busy:
        return None
    pid = rng.choice(sorted(busy))
    at = time.time()
    fleet.kill(pid)
    replacement = fleet.start().pid
    return Kill(at, pid, busy[pid], db.checkpoints(name), replacement)


# --- where the faulty run's time went --------------------------------------------------------


def timeline(run: Run) -> dict[str, list[float]]:
    """Per kill, as STEPS names them: seconds from the kill to its trial failed and retry
    queued, from then to the retry's claim, from the replacement's start to its `started`
    log line and to its first claim; and the checkpointed epochs that the retry, once
    finished, did not resume from."""
    steps: dict[str, list[float]] = {key: [] for key in STEPS}
    for kill in run.kills:
        lost_at = _first_at(
            run, lambda r, k=kill: "is lost" in r["message"] and r["trial"] == k.trial
        )
        retry = _retry_of(run.trials, kill.trial)
        claimed_at = None
        if retry is not None:
            claimed_at = _first_at(run, lambda r, n=retry.number: n in r.get("trials", ()))
        if lost_at is not None:
            steps["lost"].append(lost_at - kill.at)
        if lost_at is not None and claimed_at is not None:
            steps["queued"].append(claimed_at - lost_at)
        if retry is not None and (redone := _epochs_redone(run.trials, kill, retry)) is not None:
            steps["epochs redone"].append(redone)
        pid, start = kill.replacement, run.started[kill.replacement]
        ready = _first_at(run, lambda r, p=pid: r["pid"] == p and "started on" in r["message"])
        claimed = _first_at(run, lambda r, p=pid: r["pid"] == p and "claimed trial" in r["message"])
        if ready is not None:
            steps["start-up"].append(ready - start)
        if claimed is not None:
            steps["first claim"].append(claimed - start)
    return steps


def _first_at(run: Run, match: Callable[[dict[str, Any]], bool]) -> float | None:
    return next((r["at"] for r in run.records if match(r)), None)


def _retry_of(trials: list[FrozenTrial], number: int) -> FrozenTrial | None:
    """The trial that retries trial `number` directly."""
    return next(
        (t for t in trials if t.system_attrs.get("retry_history", [None])[-1] == number), None
    )


def _chain_epoch(trials: list[FrozenTrial], kill: Kill) -> int | None:
    """The newest checkpoint, at the kill, of the killed trial and of those it retried."""
    chain = [*trials[kill.trial].system_attrs.get("retry_history", []), kill.trial]
    epochs = [kill.checkpoints[n] for n in chain if n in kill.checkpoints]
    return max(epochs) if epochs else None


def _epochs_redone(trials: list[FrozenTrial], kill: Kill, retry: FrozenTrial) -> int | None:
    """Checkpointed epochs (at the kill) that the retry did not resume from, once it
    finished; None while it did not."""
    if retry.state.name != "COMPLETE":
        return None
    return (_chain_epoch(trials, kill) or 0) - retry.user_attrs.get("resumed_from_epoch", 0)


def kill_detail(run: Run, kill: Kill) -> dict[str, Any]:
    """What one kill hit and what became of it."""
    retry = _retry_of(run.trials, kill.trial)
    return {
        "at_s": round(kill.at - run.started[kill.pid], 2),  # since the victim's start
        "trial": kill.trial,
        "checkpoint_epoch": _chain_epoch(run.trials, kill),
        "retry": None if retry is None else retry.number,
        "resumed_from_epoch": None if retry is None else retry.user_attrs.get("resumed_from_epoch"),
    }


def scratch_reasons(run: Run) -> Counter[str]:
    """Why each kill's retry that finished restarted from scratch, if it did."""
    reasons: Counter[str] = Counter()
    for kill in run.kills:
        retry = _retry_of(run.trials, kill.trial)
        if retry is None or retry.state.name != "COMPLETE":
            continue
        if "resumed_from_epoch" not in retry.user_attrs:
            if _chain_epoch(run.trials, kill) is None:
                reasons["killed before its first checkpoint"] += 1
            else:
                reasons["a checkpoint was there"] += 1
    return reasons


# --- the report ----------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    """mean (min-max) of the values, or a dash."""
    if not values:
        return "-"
    return f"{statistics.fmean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def runs_table(size: Size, runs: list[Run]) -> str:
    calm = runs[0]
    rows = []
    for run in runs:
        states = run.states
        label = {
            "fault-free": "fault-free",
            "start-ups": f"{size.rounds} start-ups, no kills",
            "faulty": f"{len(run.kills)} kill{'' if len(run.kills) == 1 else 's'}",
        }[run.mode]
        rows.append(
            [
                label,
                f"{run.seconds:.1f}",
                f"{run.seconds / calm.seconds:.2f}x",
                f"{run.cpu_busy:.0%}",
                f"{run.cpu_s:.0f}",
                str(len(run.retries)),
                f"{len(run.resumed)} of {len(run.finished_retries)}" if run.retries else "-",
                f"{states['COMPLETE']} complete, {states['RUNNING'] + states['WAITING']} "
                f"running or waiting, {states['FAIL']} failed"
                + ("" if run.budget_ok(size.trials) else " (wrong)"),
                str(len(run.taken_from_live())),
            ]
        )
    header = ["run", "seconds", "vs fault-free", "CPU busy", "CPU s", "retries"]
    header += ["resumed (of finished)", "trials", "live trials failed"]
    return markdown_table(header, rows)


def steps_table(run: Run) -> str:
    steps = timeline(run)
    rows = [[label, spread(steps[key]), str(len(steps[key]))] for key, label in STEPS.items()]
    return markdown_table(["step, per kill", "mean (min-max)", "kills measured"], rows)


def summary(size: Size, runs: list[Run]) -> dict[str, Any]:
    by_mode = {run.mode: run for run in runs}
    calm, faulty = by_mode["fault-free"], by_mode["faulty"]
    ratio = faulty.seconds / calm.seconds
    result: dict[str, Any] = {
        "size": asdict(size),
        "fault_free_s": round(calm.seconds, 2),
        "faulty_s": round(faulty.seconds, 2),
        "ratio": round(ratio, 3),
        "goal_met": ratio <= GOAL_RATIO,
    }
    if "start-ups" in by_mode:
        result["start_ups_s"] = round(by_mode["start-ups"].seconds, 2)
        result["start_ups_ratio"] = round(by_mode["start-ups"].seconds / calm.seconds, 3)
    return result | {
        "cpu_s": {run.mode: round(run.cpu_s, 1) for run in runs},
        "cpu_busy": {run.mode: round(run.cpu_busy, 3) for run in runs},
        "kills": len(faulty.kills),
        "retries": len(faulty.retries),
        "finished_retries": len(faulty.finished_retries),
        "resumed": len(faulty.resumed),
        "scratch_reasons": dict(scratch_reasons(faulty)),
        "kill_details": [kill_detail(faulty, k) for k in faulty.kills],
        "timeline": {k: [round(v, 2) for v in vs] for k, vs in timeline(faulty).items()},
        "states": {run.mode: dict(run.states) for run in runs},
        "budget_ok": all(run.budget_ok(size.trials) for run in runs),
        "live_trials_failed": sorted({n for run in runs for n in run.taken_from_live()}),
    }


def excess(runs: list[Run]) -> str:
    """What each disturbed run cost beyond the fault-free one, per kill or start-up."""
    calm = runs[0]
    parts = []
    for run in runs[1:]:
        n = len(run.kills) if run.mode == "faulty" else None
        what = f"{n} kills" if n is not None else "the start-ups"
        extra_s, extra_cpu = run.seconds - calm.seconds, run.cpu_s - calm.cpu_s
        per = f" ({extra_cpu / n:.1f} CPU s per kill)" if n else ""
        parts.append(f"{what}: +{extra_s:.1f} s, +{extra_cpu:.0f} CPU s{per}")
    return "Beyond the fault-free run: " + "; ".join(parts) + "."


def write_report(size: Size, runs: list[Run], command: str, run_s: float, load: str) -> None:
    faulty = next(run for run in runs if run.mode == "faulty")
    ratio = faulty.seconds / runs[0].seconds
    scratch = ", ".join(f"{n} {why}" for why, n in scratch_reasons(faulty).items()) or "none"
    write_section(
        TITLE,
        f"{TITLE}\n\n"
        f"{environment(command, ('optuna', 'torch', 'sqlalchemy', 'psycopg'))}\n"
        f"- Run time: {run_s:.0f} s; load average {load}\n\n"
        f"{size.trials} digits trials of {size.epochs} epochs (64-128-10, a checkpoint every "
        "epoch, no early stopping or pruning, random sampler with seed 0) trained by "
        f"{size.workers} `hpsearch worker` processes (CPU, one thread each) on PostgreSQL, "
        f"heartbeat {HEARTBEAT_S} s, grace period {GRACE_S} s; each run a new study, timed "
        "from its submit to its completion, its workers started beforehand. The faulty run "
        f"SIGKILLs a worker holding a running trial every {size.interval:g} s for "
        f"{size.rounds} rounds and starts a replacement at once; the start-ups run kills "
        f"nothing but starts, at the same pace, a process doing what a replacement does "
        f"before it trains (`python -c '{START_UP}'`). CPU busy: the machine's cores while "
        "the study ran; CPU s: the run's processes, their start-up included. Goal: at most "
        f"{GOAL_RATIO}x the fault-free time (Ray Tune's fault-tolerance test): {ratio:.2f}x, "
        f"{'met' if ratio <= GOAL_RATIO else 'not met'}.\n\n"
        f"{runs_table(size, runs)}\n\n"
        f"{excess(runs)}\n\n"
        "Where the faulty run's time went, from the workers' logs (JSON lines) and the kill "
        f"times; finished retries that restarted from scratch: {scratch}.\n\n"
        f"{steps_table(faulty)}\n",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=DEFAULT.trials)
    parser.add_argument("--epochs", type=int, default=DEFAULT.epochs)
    parser.add_argument("--workers", type=int, default=DEFAULT.workers)
    parser.add_argument("--rounds", type=int, default=DEFAULT.rounds)
    parser.add_argument("--interval", type=float, default=DEFAULT.interval)
    parser.add_argument("--smoke", action="store_true", help="a small size, in seconds")
    parser.add_argument("--logs", type=Path, help="keep the workers' logs in this new folder")
    parser.add_argument("--url", default=os.environ.get("HPSEARCH_BENCH_POSTGRES_URL", DEFAULT_URL))
    args = parser.parse_args()
    size = (
        SMOKE
        if args.smoke
        else Size(args.trials, args.epochs, args.workers, args.rounds, args.interval)
    )
    modes: list[Mode] = (
        ["fault-free", "faulty"] if args.smoke else ["fault-free", "start-ups", "faulty"]
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_at_start, began = os.getloadavg()[0], time.monotonic()
    with scratch_database(args.url) as url, logs_folder(args.logs) as logs:
        upgrade(url)
        runs = [run_study(url, size, logs / mode, mode) for mode in modes]
    load = f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    faulty = next(run for run in runs if run.mode == "faulty")
    print(f"{runs_table(size, runs)}\n\n{steps_table(faulty)}\n")
    if not args.smoke:
        command = (
            f"python bench/chaos.py --trials {size.trials} --epochs {size.epochs} "
            f"--workers {size.workers} --rounds {size.rounds} --interval {size.interval:g}"
        )
        write_report(size, runs, command, time.monotonic() - began, load)
    result = summary(size, runs)
    print(json.dumps(result))
    raise SystemExit(0 if result["budget_ok"] and not result["live_trials_failed"] else 1)


if __name__ == "__main__":
    main()
