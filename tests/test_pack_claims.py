"""Packs of trials claimed at once (`claim_trials`): one transaction under the study's claim
lock counts the budget and starts the whole pack.

* A worker training a fused pack of 8 is killed with SIGKILL mid-epoch: the next worker
  retries every member once, with its params, from its checkpoint, and the budget stays
  exact (real `hpsearch worker --pack 8` processes, SQLite and PostgreSQL).
* Two processes claiming packs at the same moment never start more trials than the budget.
  That this is the claim lock's doing is shown deterministically: one claimant pauses
  between counting the budget and starting its trials; with the lock the other one's claim
  waits for it (seen waiting on the lock), without it (`Store.claim` replaced by a claim
  that does not lock) the other one counts the same free budget and both start a full pack.

Nothing waits a fixed time: every wait polls a condition, with a generous deadline.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from hpsearch.runtime.trials import TrialContext, _PackRun, claim_trials, keep_alive, open_study
from hpsearch.search.pruning import StudyPruning
from hpsearch.service.studies import submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store, StudyClaim, StudyRecord
from hpsearch.storage.db import session_scope
from tests.fleet import (
    Db,
    Workers,
    assert_budget_never_exceeded,
    assert_finished_exactly,
    crash_spec,
    original_of,
    running_checkpointed,
    submit,
    summary,
    wait_for,
    watch_until_exit,
)

pytestmark = pytest.mark.timeout(300)

T = TypeVar("T")
PACK = 8  # trials per claim, and per fused pack
MAX_EPOCHS = 60  # long enough to kill the pack mid-training, short enough to finish quickly
CLAIM_BUDGET = 10  # n_trials of the claim races: more than one pack, less than two
WAIT_S = 120.0  # deadline of every wait in the claim races
POLL_S = 0.05


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'packs.db'}"


# --- a killed pack ---------------------------------------------------------------------


@pytest.mark.system
def test_a_killed_pack_of_eight_resumes_every_member_with_the_budget_exact(
    tmp_path: Path, url: str, workers: Workers
) -> None:
    """Only the learning rate is searched, so the 8 trials share one architecture and train
    as one fused pack, checkpointing every epoch. SIGKILL once every member has a checkpoint
    of epoch 2 or later; a second worker fails the 8 (their holder is certainly dead),
    retries each once from its checkpoint as one pack, and no ninth trial is started."""
    name = "pack-of-eight"
    submit(url, tmp_path, crash_spec(name, PACK, max_epochs=MAX_EPOCHS))
    db = Db(url)
    first = workers.start(url, "--pack", str(PACK))
    wait_for(
        f"{PACK} running members with checkpoints of epoch 2",
        lambda: running_checkpointed(db, name, 2, count=PACK),
        workers,
    )
    workers.kill(first)
    orphaned = running_checkpointed(db, name, 1)  # read after the kill: nothing moves now
    assert len(orphaned) == PACK, (orphaned, db.snapshot())
    assert db.snapshot().trials[name] == Counter({"RUNNING": PACK})

    second = workers.start(url, "--pack", str(PACK), "--idle-exit", "1")
    snapshots = watch_until_exit(db, workers)

    log = workers.stderr(second)
    assert second.returncode == 0, workers.report()
    assert "Traceback" not in log, workers.report()
    assert_budget_never_exceeded(snapshots, name, PACK)
    trials = assert_finished_exactly(url, name, PACK)
    # The 8 killed trials and one retry each: no new trial beyond the retries.
    assert Counter(t.state.name for t in trials) == {"FAIL": PACK, "COMPLETE": PACK}, summary(
        trials
    )
    retries = []
    for number, epoch in orphaned.items():
        killed = trials[number]
        assert killed.state == TrialState.FAIL, summary(trials)
        assert killed.user_attrs.get("error") is None, summary(trials)  # lost, not failed
        (retry,) = [t for t in trials if original_of(t) == number]
        info = summary([killed, retry])
        assert retry.params == killed.params, info
        assert retry.state == TrialState.COMPLETE, info
        # A write committed as the process died may be newer than the one read above.
        assert retry.user_attrs.get("resumed_from_epoch", -1) >= epoch, info
        epochs = [row[0] for row in retry.user_attrs["history"]]
        assert epochs == list(range(1, MAX_EPOCHS + 1)), info
        assert sorted(retry.intermediate_values) == list(range(1, MAX_EPOCHS + 1)), info
        assert retry.user_attrs["worker"].endswith(f":{second.pid}"), info
        retries.append(retry.number)
    # The second worker claimed the 8 retries in one claim: they trained as one pack.
    claimed = ", ".join(map(str, sorted(retries)))
    assert f"study {name}: claimed trials {claimed}" in log, log
    assert db.checkpoints(name) == {}  # the whole chain's checkpoints are gone
    db.close()


# --- claims racing ---------------------------------------------------------------------


@contextlib.contextmanager
def unlocked_claim(url: str, study_id: int) -> Iterator[StudyClaim]:
    """`storage.db.claim_study` without its lock: the study's row is read, not locked (no
    `FOR UPDATE` on PostgreSQL, no file lock on SQLite). Only for showing what the lock
    prevents."""
    if sqlalchemy.make_url(url).get_backend_name() == "postgresql":
        with session_scope(url) as session:
            record = session.get(StudyRecord, study_id, populate_existing=True)
            assert record is not None
            yield StudyClaim(record, lambda _immediate: contextlib.nullcontext(session))
        return
    with session_scope(url) as session:
        record = session.get(StudyRecord, study_id, populate_existing=True)
    assert record is not None
    yield StudyClaim(record, lambda immediate: session_scope(url, immediate=immediate))


def _claimant(url: str, name: str, locked: bool) -> Callable[[], list[int]]:
    """In a spawned process: one claim of a pack (`claim_trials`) on the study, as a worker
    makes it; the numbers of the trials it started."""
    from hpsearch.runtime.trials import claim_trials, open_study
    from hpsearch.service.studies import runnable_studies

    if not locked:
        Store.claim = lambda self, study_id: unlocked_claim(self.url, study_id)  # type: ignore[method-assign]
    store = Store(url)
    (state,) = runnable_studies(store, (name,))
    study = open_study(state, store)
    return lambda: [c.trial.number for c in claim_trials(study, state, store, PACK)]


def claim_with_a_pause(
    url: str, name: str, locked: bool, role: str, events: dict[str, Any], results: Any
) -> None:
    """In a spawned process: one claim of a pack. The "first" claimant stops between
    counting the budget and starting its trials until `go` is set; the "second" starts its
    claim once the first has counted, and says when it has counted."""
    claim = _claimant(url, name, locked)
    counts = StudyClaim.trial_counts

    def counted(self: StudyClaim) -> dict[str, int]:
        found = counts(self)
        events[f"{role}_counted"].set()
        if role == "first":
            assert events["go"].wait(WAIT_S), "never told to go on"
        return found

    StudyClaim.trial_counts = counted  # type: ignore[method-assign]
    if role == "second":
        assert events["first_counted"].wait(WAIT_S), "the first claimant never counted"
    results.put((role, claim()))
    # Alive until told: a claim reaps the trials of a holder that has exited.
    assert events["leave"].wait(WAIT_S)


def claim_in_rounds(
    url: str, name: str, role: str, rounds: int, barrier: Any, leave: Any, results: Any
) -> None:
    """In a spawned process: `rounds` claims of a pack, each started at the same moment as
    the other claimant's (`barrier`)."""
    claim = _claimant(url, name, locked=True)
    started: list[int] = []
    for _ in range(rounds):
        barrier.wait(WAIT_S)
        started += claim()
    results.put((role, started))
    assert leave.wait(WAIT_S)


def poll(what: str, probe: Callable[[], T | None], processes: list[Any]) -> T:
    """Poll `probe` until it returns something true; fail when a claimant exited first or
    at the deadline."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = probe()
        if value:
            return value
        exited = [p.exitcode for p in processes if not p.is_alive()]
        if exited:
            pytest.fail(f"a claimant exited ({exited}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def collect(results: Any, processes: list[Any]) -> dict[str, list[int]]:
    """Each claimant's started trial numbers, by role."""
    found: dict[str, list[int]] = {}

    def one() -> bool:
        with contextlib.suppress(queue.Empty):
            role, numbers = results.get(timeout=POLL_S)
            found[role] = numbers
        return len(found) == len(processes)

    poll("every claimant's trials", one, processes)
    return found


@contextlib.contextmanager
def claimants(
    monkeypatch: pytest.MonkeyPatch, target: Callable[..., None], argss: list[tuple[Any, ...]]
) -> Iterator[list[Any]]:
    """Spawned processes running `target(*args)`; killed if still alive at the end."""
    # The claimed trials never beat: only their holders' deaths could make them lost.
    monkeypatch.setenv("HPSEARCH_GRACE_PERIOD_S", "3600")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=args, daemon=True) for args in argss]
    for process in processes:
        process.start()
    try:
        yield processes
    except BaseException:
        for process in processes:  # a failed test kills them at once
            process.kill()
        raise
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()


def waiting_for_the_claim_lock(db: Db, url: str, pid: int) -> bool:
    """Whether process `pid` waits for a study's claim lock: on SQLite a blocked request
    for the file lock (`/proc/locks`), on PostgreSQL a backend waiting for a row lock."""
    parsed = sqlalchemy.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        (waiting,) = db.rows(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )[0]
        return waiting > 0
    lock = Path(f"{parsed.database}.claim-lock")
    if not lock.exists():
        return False
    inode = os.stat(lock).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        # A blocked request: "N: -> FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> ..."
        fields = line.split()
        blocked = fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid)
        if blocked and int(fields[6].rsplit(":", 1)[1]) == inode:
            return True
    return False


def started_trials(db: Db, name: str) -> Counter[str]:
    return db.snapshot().trials.get(name, Counter())


@pytest.mark.integration
@pytest.mark.parametrize("locked", [True, False], ids=["locked", "without-the-lock"])
def test_a_claim_waits_for_one_that_counted_the_budget(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch, locked: bool
) -> None:
    """The first claimant counts the budget (10, nothing used) and pauses before starting
    its pack of 8. With the lock, the second claimant's claim waits on the lock until the
    first has started its 8, then gets the 2 left: 10 trials. Without it, the second counts
    the same free budget and starts 8, and so does the first: 16 trials, over budget."""
    name = "paused-claim"
    submit(url, tmp_path, crash_spec(name, CLAIM_BUDGET, max_epochs=1))
    db = Db(url)
    context = multiprocessing.get_context("spawn")
    events = {e: context.Event() for e in ("first_counted", "second_counted", "go", "leave")}
    results = context.Queue()
    argss = [(url, name, locked, role, events, results) for role in ("first", "second")]
    with claimants(monkeypatch, claim_with_a_pause, argss) as processes:
        second = processes[1]
        poll("the first claimant to count", events["first_counted"].is_set, processes)

        def second_counted_or_waits() -> str | None:
            if events["second_counted"].is_set():
                return "counted"
            return "waits" if waiting_for_the_claim_lock(db, url, second.pid) else None

        while_first_paused = poll("the second claimant", second_counted_or_waits, processes)
        if while_first_paused == "waits":  # and the first is paused: no trial started yet
            assert started_trials(db, name) == Counter()
        events["go"].set()
        got = collect(results, processes)
        trials = started_trials(db, name)
        events["leave"].set()

    assert [p.exitcode for p in processes] == [0, 0]
    if locked:
        assert while_first_paused == "waits"
        assert got == {"first": list(range(PACK)), "second": list(range(PACK, CLAIM_BUDGET))}
        assert trials == Counter({"RUNNING": CLAIM_BUDGET})
    else:  # what the lock prevents: both packs counted against the same free budget
        assert while_first_paused == "counted"
        assert sorted(got["first"] + got["second"]) == list(range(2 * PACK)), got
        assert trials == Counter({"RUNNING": 2 * PACK})
    db.close()


@pytest.mark.integration
def test_two_processes_claiming_packs_at_once_never_exceed_the_budget(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes claim packs of 8 from a budget of 10 at the same moments, three
    rounds each: 10 trials are started in all, each once, whoever wins each race."""
    name = "claim-race"
    rounds = 3
    submit(url, tmp_path, crash_spec(name, CLAIM_BUDGET, max_epochs=1))
    db = Db(url)
    context = multiprocessing.get_context("spawn")
    barrier, leave, results = context.Barrier(2), context.Event(), context.Queue()
    argss = [(url, name, role, rounds, barrier, leave, results) for role in ("a", "b")]
    with claimants(monkeypatch, claim_in_rounds, argss) as processes:
        got = collect(results, processes)
        trials = started_trials(db, name)
        leave.set()

    assert [p.exitcode for p in processes] == [0, 0]
    assert sorted(got["a"] + got["b"]) == list(range(CLAIM_BUDGET)), got
    assert trials == Counter({"RUNNING": CLAIM_BUDGET})
    assert sorted(db.numbers(name)) == list(range(CLAIM_BUDGET))
    db.close()


def test_a_pack_that_fails_leaves_a_member_taken_away_meanwhile_alone(tmp_path: Path) -> None:
    """A member failed as stale elsewhere is neither failed again nor able to fail the
    study: the others are failed with the error."""
    store = Store.open(f"sqlite:///{tmp_path / 'failing.db'}")
    state = submit_study(store, parse_spec(crash_spec("failing-pack", 2, max_epochs=3)))
    study = open_study(state, store)
    taken, kept = claim_trials(study, state, store, 2)
    study._storage.set_trial_state_values(taken.trial._trial_id, TrialState.FAIL)  # stale
    context = TrialContext(store, state.id, StudyPruning(store, study, state.spec))
    pack = _PackRun(study, [taken, kept], context)
    pack.fail_the_rest(RuntimeError("CUDA out of memory"))
    assert pack.outcomes == [None, TrialState.FAIL]
    trials = optuna.load_study(study_name="failing-pack", storage=store.optuna()).trials
    assert [t.user_attrs.get("error") for t in trials] == [None, "RuntimeError: CUDA out of memory"]


def test_a_pack_beats_for_all_its_members_in_one_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPSEARCH_HEARTBEAT_S", "1")
    store = Store.open(f"sqlite:///{tmp_path / 'beats.db'}")
    state = submit_study(store, parse_spec(crash_spec("beating-pack", 4, max_epochs=3)))
    study = open_study(state, store)
    trials = [c.trial for c in claim_trials(study, state, store, 4)]
    engine = sqlalchemy.create_engine(store.url)

    def beats() -> dict[int, str]:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT trial_id, heartbeat FROM trial_heartbeats")
            return dict(rows.all())

    first = beats()
    written: list[list[int]] = []  # the trial ids of each heartbeat statement

    def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TRIAL_HEARTBEATS"):
            written.append(sorted(parameters))

    sqlalchemy.event.listen(sqlalchemy.Engine, "before_cursor_execute", count)
    try:
        with keep_alive(study, trials, store):
            deadline = time.monotonic() + WAIT_S
            while not all(beats()[t._trial_id] > first[t._trial_id] for t in trials):
                assert time.monotonic() < deadline, "the heartbeats never moved"
                time.sleep(POLL_S)
    finally:
        sqlalchemy.event.remove(sqlalchemy.Engine, "before_cursor_execute", count)
    assert written  # a beat a second, each one statement for all four trials
    assert all(ids == sorted(t._trial_id for t in trials) for ids in written), written
    engine.dispose()
