"""Crash safety of `hpsearch worker` (docs/architecture.md, "The trial life cycle and crash
semantics").

Real worker processes on real databases, training real (tiny) networks, killed with
SIGKILL or stopped with SIGTERM. The test watches the database with plain SQL, as an
outsider would, and waits with deadlines, never a fixed sleep. The workers run with a
heartbeat of 1 s and a grace period of 4 s, so a dead worker's trial goes stale quickly.

Studies are submitted in this process (`submit_study`, what `hpsearch submit` calls) to save
a CLI start-up per test; `hpsearch resume` and `hpsearch worker` run as commands.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from hpsearch.runtime.worker import IDLE_POLL_S
from tests.fleet import (
    FINISHED,
    GRACE_S,
    Db,
    Snapshot,
    Workers,
    assert_budget_never_exceeded,
    assert_clean_exits,
    assert_each_retried_once,
    assert_finished_exactly,
    assert_resumed_whole,
    cli,
    crash_spec,
    kill_while_running,
    load_trials,
    original_of,
    running_checkpointed,
    submit,
    summary,
    wait_for,
    watch_until_exit,
)
from tests.pg_private import private_postgres

pytestmark = pytest.mark.system  # worker processes, killed with SIGKILL

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
    orphaned = kill_while_running(db, workers, postgres_url, name, 2)
    # Usually both; one may have finished between the wait and the kill on a loaded machine.
    assert len(orphaned) >= 1, (orphaned, db.snapshot())

    resumed = cli("resume", name, "--db", postgres_url, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    freed = re.search(r"(\d+) lost trial\(s\) freed for retry", resumed.stdout)
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
    assert "study sigterm: trial 0 checkpointed and handed back" in workers.stderr(first)
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
    assert "study sigterm: trial 1 retries trial 0" in workers.stderr(second)
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
