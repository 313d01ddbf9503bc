"""Recovering the trials of dead workers quickly and for sure: a claim that reaps the trials of
an exited process at once, `hpsearch resume` right after a crash, idle workers that wait for
silent trials, and `--free-running`, which never takes a trial from a live worker. Real
worker processes killed with SIGKILL, on PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.runtime.trials import claim_trial, open_study
from hpsearch.service import holders
from hpsearch.service.holders import HOLDER_ATTR
from hpsearch.service.recovery import recover
from hpsearch.service.studies import StudyState, submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store
from tests.fleet import (
    Db,
    Workers,
    assert_budget_never_exceeded,
    assert_each_retried_once,
    assert_finished_exactly,
    cli,
    crash_spec,
    kill_while_running,
    load_trials,
    submit,
    summary,
    wait_for,
    watch_until_exit,
)

# Heartbeats as slow as the defaults' scale: they are still fresh when `resume` runs.
SLOW_BEATS = {"HPSEARCH_HEARTBEAT_S": "10", "HPSEARCH_GRACE_PERIOD_S": "60"}
ELSEWHERE = json.dumps("another-host/another-boot/pid:[1]/4242/1")  # a holder nobody can check


def held_elsewhere(db: Db, study: str, numbers: list[int]) -> None:
    """Make these running trials look held by a process on another machine, whose death
    nobody here can prove: only their heartbeats tell."""
    for number in numbers:
        db.execute(
            "UPDATE trial_system_attributes SET value_json = :holder WHERE key = :key AND "
            "trial_id = (SELECT t.trial_id FROM trials t JOIN studies s "
            "ON s.study_id = t.study_id WHERE s.study_name = :study AND t.number = :number)",
            holder=ELSEWHERE,
            key=HOLDER_ATTR,
            study=study,
            number=number,
        )


def freed(output: str) -> int:
    found = re.search(r"(\d+) lost trial\(s\) freed for retry", output)
    assert found is not None, output
    return int(found.group(1))


@pytest.mark.postgres
@pytest.mark.system
def test_resume_right_after_every_worker_was_killed_finishes_the_study(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    """Their heartbeats are fresh, but their processes are certainly gone: `resume` frees
    every trial at once, and new workers finish the study with its exact budget."""
    name, n_trials, max_epochs = "killed-all", 6, 60
    submit(postgres_url, tmp_path, crash_spec(name, n_trials, max_epochs=max_epochs))
    db = Db(postgres_url)
    orphaned = kill_while_running(db, workers, postgres_url, name, 3, env=SLOW_BEATS)
    running = db.snapshot().count(name, "RUNNING")

    resumed = cli("resume", name, "--db", postgres_url, cwd=tmp_path, env=SLOW_BEATS)
    assert resumed.returncode == 0, resumed.stderr
    assert freed(resumed.stdout) == running >= 3, resumed.stdout
    assert "left running" not in resumed.stdout
    assert db.snapshot().count(name, "RUNNING") == 0

    fresh = [workers.start(postgres_url, "--idle-exit", "2", env=SLOW_BEATS) for _ in range(2)]
    snapshots = watch_until_exit(db, workers)
    assert [p.returncode for p in fresh] == [0, 0], workers.report()
    assert_budget_never_exceeded(snapshots, name, n_trials)
    trials = assert_finished_exactly(postgres_url, name, n_trials)
    assert_each_retried_once(trials, orphaned, max_epochs)


@pytest.mark.postgres
@pytest.mark.system
def test_idle_workers_wait_for_silent_trials_and_train_their_retries(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    """Trials of workers on another machine (nothing certain here): a new worker with
    nothing to claim does not exit idle while their heartbeats are silent; it waits out the
    grace period, then trains their retries from their checkpoints."""
    # Silent after two beats (2 s), lost after 30 s: the new worker, started at once, finds
    # them silent and not yet lost, however slowly it starts on a loaded machine.
    beats = {"HPSEARCH_HEARTBEAT_S": "1", "HPSEARCH_GRACE_PERIOD_S": "30"}
    name, n_trials, max_epochs = "silent", 2, 80
    submit(postgres_url, tmp_path, crash_spec(name, n_trials, max_epochs=max_epochs))
    db = Db(postgres_url)
    orphaned = kill_while_running(db, workers, postgres_url, name, 2, env=beats)
    held_elsewhere(db, name, list(orphaned))

    fresh = workers.start(postgres_url, "--idle-exit", "1", env=beats)
    snapshots = watch_until_exit(db, workers)
    assert fresh.returncode == 0, workers.report()
    assert "waiting for trial(s)" in workers.stderr(fresh), workers.report()
    assert_budget_never_exceeded(snapshots, name, n_trials)
    trials = assert_finished_exactly(postgres_url, name, n_trials)
    assert_each_retried_once(trials, orphaned, max_epochs)


@pytest.mark.postgres
@pytest.mark.system
def test_free_running_frees_a_dead_workers_trial_and_spares_a_live_ones(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    beats = {"HPSEARCH_HEARTBEAT_S": "1", "HPSEARCH_GRACE_PERIOD_S": "600"}
    name = "free-running"
    submit(postgres_url, tmp_path, crash_spec(name, 2, max_epochs=2000))
    db = Db(postgres_url)
    first, second = (workers.start(postgres_url, env=beats) for _ in range(2))

    def two_holders() -> dict[int, str] | None:
        holders = db.holders(name)
        return holders if len(holders) == 2 else None

    pids = {
        n: int(holder.split("/")[3]) for n, holder in wait_for("two", two_holders, workers).items()
    }
    dead = next(n for n, pid in pids.items() if pid == first.pid)
    live = next(n for n, pid in pids.items() if pid == second.pid)
    workers.kill(first)
    held_elsewhere(db, name, [dead])

    plain = cli("resume", name, "--db", postgres_url, cwd=tmp_path, env=beats)
    assert plain.returncode == 0, plain.stderr
    assert f"hpsearch resume {name} --free-running" in plain.stdout, plain.stdout

    resumed = cli("resume", name, "--db", postgres_url, "--free-running", cwd=tmp_path, env=beats)
    assert resumed.returncode == 0, resumed.stderr
    assert freed(plain.stdout) + freed(resumed.stdout) == 1, plain.stdout + resumed.stdout
    assert f"1 trial(s) left running ({live}): their workers are alive" in resumed.stdout
    trials = {t.number: t for t in load_trials(postgres_url, name)}
    states = {n: t.state.name for n, t in trials.items()}
    assert states[dead] == "FAIL" and states[live] == "RUNNING", summary(list(trials.values()))
    assert list(states.values()).count("WAITING") == 1, states  # the dead one's retry
    assert second.poll() is None  # the live worker goes on with its trial
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0, workers.report()
    assert "Traceback" not in workers.stderr(second)


# --- in one process --------------------------------------------------------------------


def exited_process() -> holders.Holder:
    """A holder on this machine whose process has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    me = holders.this_process()
    assert me is not None  # these tests need Linux's /proc
    started = holders._stat(child.pid)
    child.wait()
    return dataclasses.replace(me, pid=child.pid, started=started[1] if started else "0")


def claimed_study(tmp_path: Path) -> tuple[str, StudyState, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    store = Store.open(url)
    state = submit_study(store, parse_spec(crash_spec("claims", 3, max_epochs=2)))
    return url, state, open_study(state, store)


@pytest.mark.integration
def test_a_claim_reaps_the_trials_of_an_exited_process_at_once(tmp_path: Path) -> None:
    url, state, study = claimed_study(tmp_path)
    store = Store.open(url)
    assert claim_trial(study, state, store) is not None  # this process's own, alive
    orphan = claim_trial(study, state, store).trial
    study._storage.set_trial_system_attr(
        orphan._trial_id, holders.HOLDER_ATTR, exited_process().as_attr()
    )
    retry = claim_trial(study, state, store)  # its heartbeat is fresh: only the holder tells
    assert retry is not None
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.RUNNING]
    assert trials[2].system_attrs["failed_trial"] == orphan.number
    assert trials[2].params == trials[1].params


@pytest.mark.integration
def test_a_retry_does_not_inherit_the_dead_holder_of_the_trial_it_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claimant that cannot name itself (no /proc) must not leave the retried trial's dead
    holder on its live retry: the next claim would fail it as lost."""
    url, state, study = claimed_study(tmp_path)
    store = Store.open(url)
    orphan = claim_trial(study, state, store).trial
    study._storage.set_trial_system_attr(
        orphan._trial_id, holders.HOLDER_ATTR, exited_process().as_attr()
    )
    assert recover(store, study, state.id).freed == 1  # its retry inherits the dead holder
    with monkeypatch.context() as patch:
        patch.setattr(holders, "this_process", lambda: None)
        retry = claim_trial(study, state, store).trial
    assert retry.number == 1
    assert study.get_trials(deepcopy=False)[1].system_attrs["failed_trial"] == orphan.number
    assert claim_trial(study, state, store) is not None  # another claim, another reap
    assert study.get_trials(deepcopy=False)[retry.number].state == TrialState.RUNNING
