"""Trials written in bulk (`hpsearch.storage.bulk`, through `hpsearch.runtime.trials`) are
indistinguishable to Optuna from trials written through its own `RDBStorage`.

* A real worker (packs of 4, successive halving) runs 8 digits trials, which end COMPLETE
  and PRUNED with params, values, reports, user attributes (history, metrics), system
  attributes (holder, rungs), heartbeats and datetimes. The same content is replayed through
  Optuna's public API (`ask`, `suggest_*`, `record_heartbeat`, `set_trial_system_attr`,
  `report`, `set_user_attr`, `tell`) into a second study of the same database, as a worker
  on plain Optuna would write it, and both are read back with `optuna.load_study`: field by
  field, row by row (ids aside), and as optuna-dashboard serialises them. Then a popped
  retry (of a trial failed and retried as a worker hands one back) and a new trial, claimed
  in bulk or asked, are compared while running, and Optuna's heartbeat check finds both
  studies' running trials fresh, then stale. On SQLite and PostgreSQL, in a local time zone
  far from UTC: Optuna 5 stores naive UTC datetimes and reads them back as naive local ones.
* Infinite and NaN reports and values are stored with Optuna's types and states.
* Bulk-written datetimes read back as the local times at which they were written.
* Every sampler of the spec claims packs on a bulk-written study.
* optuna-dashboard lists a bulk-written study's trials.

Nothing waits a fixed time.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import optuna_dashboard
import pytest
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from hpsearch.runtime.trials import (
    Claim,
    TrialContext,
    TrialWriter,
    claim_trials,
    open_study,
    write_down,
)
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.search.pruning import StudyPruning
from hpsearch.search.space import distributions, suggest_params
from hpsearch.service.studies import StudyState, enqueue, submit_study
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store, optuna_internals
from hpsearch.storage.history import TrialHistory
from hpsearch.training.progress import EpochRecord
from hpsearch.training.train import TrainResult
from tests.test_pruning import spec_dict

HOLDER = "hpsearch:holder"
PACK = 4
# A float on a log scale, an integer with a step, a stepped float and a categorical: every
# kind of distribution, none of which splits a fused pack.
SPACE = {
    "learning_rate": {"low": 1e-4, "high": 1.0, "log": True},
    "batch_size": {"low": 32, "high": 128, "step": 32},
    "dropout": {"low": 0.0, "high": 0.3, "step": 0.1},
    "grad_clip_norm": {"choices": [1.0, 5.0]},
}
GRID_SPACE = {
    "learning_rate": {"choices": [0.001, 0.01, 0.1]},
    "batch_size": {"choices": [32, 64]},
}
# A POSIX zone 5 h 30 east of UTC (no tzdata needed): naive UTC would be told from naive
# local time at once.
FAR_FROM_UTC = "XST-5:30"
Window = tuple[datetime, datetime]  # local times between which something was written


def bulk_spec(name: str, **sections: Any) -> StudySpec:
    return parse_spec(
        spec_dict(
            name,
            dataset={"source": "builtin", "name": "digits"},
            **{"model": {"hidden": [16]}, "search_space": SPACE} | sections,
        )
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'bulk.db'}"


@pytest.fixture
def far_from_utc() -> Iterator[None]:
    """The process's local time 5 h 30 east of UTC while the test runs."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = FAR_FROM_UTC
    time.tzset()
    try:
        offset = datetime.now() - datetime.now(UTC).replace(tzinfo=None)
        assert abs(offset.total_seconds() - 5.5 * 3600) < 60, offset
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


# --- writing ---------------------------------------------------------------------------


def submitted(url: str, spec: StudySpec) -> tuple[Store, StudyState, optuna.Study]:
    store = Store.open(url)
    state = submit_study(store, spec)
    return store, state, open_study(state, store)


def replay(
    storage: optuna.storages.RDBStorage, name: str, spec: StudySpec, bulk: FrozenTrial
) -> None:
    """Write `bulk`'s content as a new trial of study `name`, through Optuna's public API
    in the order a worker on plain Optuna writes it: ask (a waiting trial is popped first),
    the first heartbeat, the holder (and any other system attribute), the params suggested
    from the spec, the reports, the user attributes, and tell. A running trial stays so."""
    fixed = optuna.samplers.PartialFixedSampler(bulk.params, optuna.samplers.RandomSampler(0))
    study = optuna.load_study(study_name=name, storage=storage, sampler=fixed)
    trial = study.ask()
    trial_id = optuna_internals.trial_id(trial)
    storage.record_heartbeat(trial_id)
    for key, value in bulk.system_attrs.items():
        optuna_internals.study_storage(study).set_trial_system_attr(trial_id, key, value)
    assert suggest_params(trial, spec) == bulk.params
    for step, value in sorted(bulk.intermediate_values.items()):
        trial.report(value, step)
    for key, value in bulk.user_attrs.items():
        trial.set_user_attr(key, value)
    if bulk.state == TrialState.COMPLETE:
        study.tell(trial, bulk.value)
    elif bulk.state in (TrialState.PRUNED, TrialState.FAIL):
        study.tell(trial, state=bulk.state)  # a pruned trial's value is Optuna's to derive
    else:
        assert bulk.state == TrialState.RUNNING, bulk


def reference_of(
    url: str, spec: StudySpec, bulk: list[FrozenTrial]
) -> tuple[optuna.storages.RDBStorage, Window]:
    """A study "reference" beside the bulk-written one, with `bulk`'s trials replayed into
    it through Optuna (`replay`); its storage, and the local-time window of the replay."""
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=60)
    reference = optuna.create_study(
        study_name="reference", storage=storage, direction=spec.objective.direction
    )
    reference.set_metric_names([spec.objective.metric])  # as hpsearch names its studies
    began = datetime.now()
    for trial in bulk:
        replay(storage, "reference", spec, trial)
    return storage, (began, datetime.now())


def queue_retry(study: optuna.Study, failed: FrozenTrial) -> None:
    """Queue a failed trial's retry, as a worker that hands a trial back does."""
    assert failed.state == TrialState.FAIL
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, failed)


def fake_result(history: list[EpochRecord], value: float, pruned: bool) -> TrainResult:
    return TrainResult(
        value=value,
        best_epoch=len(history),
        epochs_run=len(history),
        stopped_early=False,
        diverged=False,
        pruned=pruned,
        val_metrics={"val_accuracy": value},
        test_metrics={},
        seconds=0.01,
        history=history,
    )


def finish(
    store: Store,
    state: StudyState,
    study: optuna.Study,
    claims: list[Claim],
    curves: list[dict[int, float]],
    pruned: set[int],
) -> dict[int, TrialState]:
    """Claimed trials report `curves` and end (pruned: the indexes in `pruned`; else
    complete with their curve's last value), written and told together in one
    `write_down`, as a worker writes a pack's epoch; the states told, by trial id."""
    context = TrialContext(store, state.id, StudyPruning(store, study, state.spec))
    writers = [TrialWriter(c.trial, context) for c in claims]
    ended = {}
    for i, (writer, curve) in enumerate(zip(writers, curves, strict=True)):
        history = [EpochRecord(e, 1.0, 1.0, v, 0.01) for e, v in sorted(curve.items())]
        for record in history:
            writer.report(record.value, record.epoch)
        ended[writer.trial_id] = fake_result(history, history[-1].value, i in pruned)
    told, lost = write_down(study, context, writers, ended)
    assert lost == set()
    return told


def score(params: dict[str, Any]) -> float:
    """A made-up objective, best at a learning rate of 0.01."""
    return 1.0 / (1.0 + abs(math.log10(params["learning_rate"]) + 2.0))


def curves_of(claims: list[Claim]) -> list[dict[int, float]]:
    return [{e: score(c.trial.params) * e / 3 for e in (1, 2, 3)} for c in claims]


# --- reading ---------------------------------------------------------------------------


READERS: dict[str, optuna.storages.RDBStorage] = {}


def load(url: str, name: str) -> optuna.Study:
    """The study as `optuna.load_study` reads it afresh (one engine per database, so that
    reading holds one connection, closed at the end of the test)."""
    if url not in READERS:
        READERS[url] = optuna.storages.RDBStorage(url)
    return optuna.load_study(study_name=name, storage=READERS[url])


@pytest.fixture(autouse=True)
def close_readers() -> Iterator[None]:
    yield
    while READERS:
        READERS.popitem()[1].engine.dispose()


def canonical(value: Any) -> str:
    """For comparing: NaN equals NaN, distributions compare by their fields."""
    return json.dumps(value, sort_keys=True, default=repr)


FIELDS = (
    "number",
    "state",
    "params",
    "distributions",
    "value",
    "values",
    "intermediate_values",
    "last_step",
    "user_attrs",
    "system_attrs",
)


def differences(bulk: FrozenTrial, ref: FrozenTrial) -> list[str]:
    """How Optuna's reading of a bulk-written trial differs from an RDBStorage-written one
    (their datetimes are other instants: see `time_problems`)."""
    found = []
    for name in FIELDS:
        ours, optunas = getattr(bulk, name), getattr(ref, name)
        if ours != optunas and canonical(ours) != canonical(optunas):
            found.append(f"trial {bulk.number} {name}: bulk {ours!r}, Optuna {optunas!r}")
    for trial, who in ((bulk, "bulk"), (ref, "Optuna")):
        start, complete = trial.datetime_start, trial.datetime_complete
        if trial.state == TrialState.WAITING and start is None:
            pass  # not started yet
        elif type(start) is not datetime or start.tzinfo is not None:
            found.append(f"trial {trial.number} ({who}) datetime_start {start!r}")
        if trial.state.is_finished() != (complete is not None):
            found.append(f"trial {trial.number} ({who}) {trial.state} complete {complete!r}")
        elif complete is not None and (type(complete) is not datetime or complete.tzinfo):
            found.append(f"trial {trial.number} ({who}) datetime_complete {complete!r}")
    return found


def assert_alike(bulk: list[FrozenTrial], ref: list[FrozenTrial]) -> None:
    assert [t.number for t in bulk] == [t.number for t in ref] == list(range(len(ref)))
    found = [d for b, r in zip(bulk, ref, strict=True) for d in differences(b, r)]
    if found:
        pytest.fail("bulk-written trials differ from Optuna's:\n" + "\n".join(found))


DATETIME_MISMATCH = (
    "Optuna reads these trials' datetimes back other than the local times at which they were "
    "written. Optuna 5 stores datetime_start and datetime_complete as naive UTC and reads "
    "them back as naive local time, so bulk writes must store UTC (storage.bulk.stored_time); "
    "otherwise, where local time is not UTC, they read back shifted by the UTC offset, and a "
    "trial started in bulk and ended by Optuna can complete before it starts."
)


def time_problems(
    trials: list[FrozenTrial],
    starts: dict[int, Window],
    completes: dict[int, Window],
    who: str,
) -> list[str]:
    """The trials' datetimes as Optuna reads them that fall outside the local-time windows
    (by trial number) in which they were written."""
    found = []
    for trial in trials:
        for name, windows in (("datetime_start", starts), ("datetime_complete", completes)):
            if trial.number in windows:
                low, high = windows[trial.number]
                value = getattr(trial, name)
                if value is None or not low <= value <= high:
                    found.append(
                        f"{who} trial {trial.number}: {name} read back as {value}, written "
                        f"between {low} and {high} (local time)"
                    )
    return found


def assert_written_times(problems: list[str]) -> None:
    if problems:
        pytest.fail(DATETIME_MISMATCH + "\n" + "\n".join(problems), pytrace=False)


# Each table's columns but the row and trial ids: for heartbeats, that a row exists (their
# times are the database's clock at the beat).
ROWS = {
    "trial_params": "x.param_name, x.param_value, x.distribution_json",
    "trial_values": "x.objective, x.value, x.value_type",
    "trial_intermediate_values": "x.step, x.intermediate_value, x.intermediate_value_type",
    "trial_user_attributes": "x.key, x.value_json",
    "trial_system_attributes": "x.key, x.value_json",
    "trial_heartbeats": "1",
}


def shape(value: Any) -> Any:
    """A stored datetime without its instant: SQLite's text with digits blanked, or the
    driver's type and time zone."""
    if isinstance(value, str):
        return re.sub(r"\d", "9", value)
    if isinstance(value, datetime):
        return f"datetime tzinfo={value.tzinfo}"
    return value


def stored_rows(url: str, name: str) -> dict[int, dict[str, list[tuple[Any, ...]]]]:
    """Every row of the study's trials in Optuna's tables, by trial number and table."""
    engine = sqlalchemy.create_engine(url)
    rows: dict[int, dict[str, list[tuple[Any, ...]]]] = defaultdict(lambda: defaultdict(list))
    try:
        with engine.connect() as connection:
            study_id = connection.execute(
                sqlalchemy.text("SELECT study_id FROM studies WHERE study_name = :name"),
                {"name": name},
            ).scalar_one()
            trials = connection.execute(
                sqlalchemy.text(
                    "SELECT number, state, datetime_start, datetime_complete FROM trials "
                    "WHERE study_id = :study"
                ),
                {"study": study_id},
            )
            for number, state, start, complete in trials:
                rows[number]["trials"].append((str(state), shape(start), shape(complete)))
            for table, columns in ROWS.items():
                selected = connection.execute(
                    sqlalchemy.text(
                        f"SELECT t.number, {columns} FROM {table} x "
                        "JOIN trials t ON t.trial_id = x.trial_id WHERE t.study_id = :study"
                    ),
                    {"study": study_id},
                )
                for number, *values in selected:
                    rows[number][table].append(tuple(str(v) for v in values))
    finally:
        engine.dispose()
    return {n: {t: sorted(r) for t, r in tables.items()} for n, tables in rows.items()}


def assert_same_rows(url: str, bulk_name: str, ref_name: str) -> None:
    bulk, ref = stored_rows(url, bulk_name), stored_rows(url, ref_name)
    assert sorted(bulk) == sorted(ref)
    found = [
        f"trial {number} {table}: bulk {bulk[number].get(table)}, Optuna {ref[number].get(table)}"
        for number in sorted(ref)
        for table in sorted({*bulk[number], *ref[number]})
        if bulk[number].get(table) != ref[number].get(table)
    ]
    if found:
        pytest.fail("bulk-written rows differ from Optuna's:\n" + "\n".join(found))


def dashboard_get(app: Any, path: str) -> Any:
    """GET from optuna-dashboard's WSGI app, in process (no socket)."""
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    status: list[str] = []
    body = b"".join(app(environ, lambda s, _headers, _exc=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:500])
    return json.loads(body)


def dashboard_study(app: Any, name: str) -> dict[str, Any]:
    listed = dashboard_get(app, "/api/studies")["study_summaries"]
    (study_id,) = [s["study_id"] for s in listed if s["study_name"] == name]
    return dashboard_get(app, f"/api/studies/{study_id}")


IDS_AND_TIMES = {"trial_id", "study_id", "datetime_start", "datetime_complete"}


def without_ids_and_times(value: Any) -> Any:
    """A dashboard document without ids and times, its attributes and params sorted by name
    (Optuna's own order is that in which the database returns rows, which PostgreSQL does
    not keep)."""
    if isinstance(value, dict):
        return {k: without_ids_and_times(v) for k, v in value.items() if k not in IDS_AND_TIMES}
    if isinstance(value, list):
        items = [without_ids_and_times(v) for v in value]
        if items and all(isinstance(v, dict) and ("key" in v or "name" in v) for v in items):
            items.sort(key=lambda v: str(v.get("key", v.get("name"))))
        return items
    return value


def json_differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two JSON documents differ, by path."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [
            d
            for key in sorted({*ours, *theirs}, key=str)
            for d in json_differences(ours.get(key), theirs.get(key), f"{path}.{key}")
        ]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [
            d
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for d in json_differences(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [f"{path}: bulk {ours!r}, Optuna {theirs!r}"]


# --- the tests -------------------------------------------------------------------------


@pytest.mark.integration  # a whole study trained by a worker, on SQLite and PostgreSQL
@pytest.mark.timeout(240)
def test_trials_written_in_bulk_read_as_trials_written_by_optunas_storage(
    url: str, far_from_utc: None
) -> None:
    spec = bulk_spec(
        "bulk",
        training={"max_epochs": 6, "early_stopping_patience": None},
        pruner={"name": "sha", "min_resource": 1, "reduction_factor": 2},
        budget={"n_trials": 10},  # 8 trained, 1 failed, then its retry and a new one
    )
    store, state, bulk_study = submitted(url, spec)
    windows: dict[str, tuple[dict[int, Window], dict[int, Window]]] = {
        "bulk": ({}, {}),
        "reference": ({}, {}),
    }
    began = datetime.now()
    options = WorkerOptions(store, studies=("bulk",), max_trials=8, pack=PACK, idle_exit_s=0)
    assert Worker(options).run() == 0
    trained = datetime.now()
    for number in range(8):
        windows["bulk"][0][number] = windows["bulk"][1][number] = (began, trained)
    bulk = load(url, "bulk").trials
    states = Counter(t.state for t in bulk)
    assert states[TrialState.COMPLETE] > 0 and states[TrialState.PRUNED] > 0, states
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 8, states
    for trial in bulk:  # what the comparison covers really is there
        assert trial.params.keys() == SPACE.keys()
        assert {"history", "val_accuracy", "worker"} <= trial.user_attrs.keys()
        assert trial.system_attrs[HOLDER]
    assert any("completed_rung_0" in t.system_attrs for t in bulk)
    assert any(t.state == TrialState.PRUNED and t.intermediate_values for t in bulk)

    storage, replayed = reference_of(url, spec, bulk)
    for number in range(8):
        windows["reference"][0][number] = windows["reference"][1][number] = replayed
    assert_alike(bulk, load(url, "reference").trials)
    assert_same_rows(url, "bulk", "reference")

    # A trial failed and retried as a worker hands one back; then the retry popped and a
    # new trial started together, claimed in bulk or asked, compared while they run.
    before = datetime.now()
    (failing,) = claim_trials(bulk_study, state, store, 1)
    windows["bulk"][0][8] = (before, datetime.now())
    before = datetime.now()
    queue_retry(bulk_study, bulk_study.tell(failing.trial, state=TrialState.FAIL))
    windows["bulk"][1][8] = (before, datetime.now())
    before = datetime.now()
    claims = claim_trials(bulk_study, state, store, 2)
    windows["bulk"][0].update(dict.fromkeys((9, 10), (before, datetime.now())))
    assert [c.trial.number for c in claims] == [9, 10]
    bulk = load(url, "bulk").trials
    assert [t.state for t in bulk[8:]] == [TrialState.FAIL] + [TrialState.RUNNING] * 2
    assert bulk[9].params == bulk[8].params and bulk[9].system_attrs["failed_trial"] == 8

    before = datetime.now()
    replay(storage, "reference", spec, bulk[8])  # told FAIL
    reference = optuna.load_study(study_name="reference", storage=storage)
    queue_retry(reference, reference.trials[8])
    replay(storage, "reference", spec, bulk[9])  # pops the retry
    replay(storage, "reference", spec, bulk[10])
    windows["reference"][0].update(dict.fromkeys((8, 9, 10), (before, datetime.now())))
    windows["reference"][1][8] = (before, datetime.now())
    assert_alike(load(url, "bulk").trials, load(url, "reference").trials)
    assert_same_rows(url, "bulk", "reference")

    # Optuna's heartbeat check finds both studies' running trials fresh, then stale.
    checking = optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=120)
    for name in ("bulk", "reference"):
        optuna.storages.fail_stale_trials(optuna.load_study(study_name=name, storage=checking))
        assert [t.state for t in load(url, name).trials[9:]] == [TrialState.RUNNING] * 2
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        aged = connection.execute(
            sqlalchemy.text(
                "UPDATE trial_heartbeats SET heartbeat = :old WHERE trial_id IN "
                "(SELECT trial_id FROM trials WHERE state = 'RUNNING')"
            ),
            {"old": datetime(2000, 1, 1)},
        )
        assert aged.rowcount == 4  # each running trial of each study has its heartbeat row
    engine.dispose()
    before = datetime.now()
    for name in ("bulk", "reference"):
        optuna.storages.fail_stale_trials(optuna.load_study(study_name=name, storage=checking))
        assert [t.state for t in load(url, name).trials[9:]] == [TrialState.FAIL] * 2
    for name in ("bulk", "reference"):
        windows[name][1].update(dict.fromkeys((9, 10), (before, datetime.now())))

    bulk_loaded, ref_loaded = load(url, "bulk"), load(url, "reference")
    assert_alike(bulk_loaded.trials, ref_loaded.trials)
    assert_same_rows(url, "bulk", "reference")
    assert bulk_loaded.best_trial.number == ref_loaded.best_trial.number
    assert bulk_loaded.best_value == ref_loaded.best_value
    for s in TrialState:
        assert len(bulk_loaded.get_trials(states=(s,))) == len(ref_loaded.get_trials(states=(s,)))
    times = ["datetime_start", "datetime_complete", "duration"]
    frames = [s.trials_dataframe().drop(columns=times) for s in (bulk_loaded, ref_loaded)]
    assert frames[0].equals(frames[1]), (frames[0], frames[1])

    app = optuna_dashboard.wsgi(optuna.storages.RDBStorage(url))
    bulk_shown, ref_shown = dashboard_study(app, "bulk"), dashboard_study(app, "reference")
    assert len(bulk_shown["trials"]) == 11
    assert bulk_shown["best_trials"][0]["values"] == [bulk_loaded.best_value]
    del bulk_shown["name"], ref_shown["name"]
    shown_differently = json_differences(
        without_ids_and_times(bulk_shown), without_ids_and_times(ref_shown)
    )
    if shown_differently:
        pytest.fail(
            "optuna-dashboard shows the bulk-written study differently:\n"
            + "\n".join(shown_differently)
        )

    # The times last: each read back within the local-time window it was written in.
    loaded = {"bulk": bulk_loaded.trials, "reference": ref_loaded.trials}
    assert_written_times(
        [
            p
            for name, (starts, completes) in windows.items()
            for p in time_problems(loaded[name], starts, completes, name)
        ]
    )


def test_bulk_written_datetimes_read_back_as_the_local_times_they_were_written(
    tmp_path: Path, far_from_utc: None
) -> None:
    url = f"sqlite:///{tmp_path / 'times.db'}"
    spec = bulk_spec("times", sampler={"name": "random"}, budget={"n_trials": 2})
    store, state, study = submitted(url, spec)
    before = datetime.now()
    claims = claim_trials(study, state, store, 2)
    claimed = datetime.now()
    finish(store, state, study, claims, curves_of(claims), pruned={1})
    ended = datetime.now()
    bulk = load(url, "times").trials

    _, replayed = reference_of(url, spec, bulk)
    ref = load(url, "reference").trials
    assert_alike(bulk, ref)
    everything = dict.fromkeys((0, 1), replayed)
    assert_written_times(
        time_problems(ref, everything, everything, "reference")
        + time_problems(
            bulk,
            dict.fromkeys((0, 1), (before, claimed)),
            dict.fromkeys((0, 1), (claimed, ended)),
            "bulk",
        )
    )


def test_infinite_and_nan_reports_and_values_are_stored_as_optuna_stores_them(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    spec = bulk_spec("odd", sampler={"name": "random"}, budget={"n_trials": 4})
    store, state, study = submitted(url, spec)
    claims = claim_trials(study, state, store, 4)
    curves = [
        {1: 0.5, 2: math.inf},  # pruned: its value is its last report, infinite
        {1: 0.3, 2: math.nan},  # pruned: a NaN last report leaves it without a value
        {1: -math.inf, 2: math.nan},  # a NaN value fails it
        {1: 0.2, 2: -math.inf},  # complete, its value minus infinity
    ]
    told = finish(store, state, study, claims, curves, pruned={0, 1})
    expected = [TrialState.PRUNED, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    assert list(told.values()) == expected
    bulk = load(url, "odd").trials
    assert [t.state for t in bulk] == expected
    assert [t.value for t in bulk] == [math.inf, None, None, -math.inf]
    assert bulk[2].user_attrs["error"] == "ValueError: the objective is NaN"  # not "lost"

    reference_of(url, spec, bulk)
    assert_alike(bulk, load(url, "reference").trials)
    assert_same_rows(url, "odd", "reference")


def test_enqueued_configurations_are_the_waiting_trials_optunas_enqueue_trial_makes(
    url: str,
) -> None:
    """`hpsearch.service.studies.enqueue` writes (`bulk.enqueue_trials`, in one
    transaction) the rows `study.enqueue_trial` writes one trial at a time, and a claim
    pops them first, drawing only the params they leave out, as Optuna's `ask` does."""
    spec = bulk_spec("enqueued", sampler={"name": "random"}, budget={"n_trials": 4})
    store, state, study = submitted(url, spec)
    configs = [{"learning_rate": 0.01, "batch_size": 64}, {"grad_clip_norm": 5.0}]
    enqueue(store, "enqueued", configs)
    storage = optuna.storages.RDBStorage(url)
    try:
        reference = optuna.create_study(
            study_name="reference", storage=storage, direction=spec.objective.direction
        )
        for config in configs:
            reference.enqueue_trial(config)
        assert_alike(load(url, "enqueued").trials, load(url, "reference").trials)
        assert_same_rows(url, "enqueued", "reference")

        claims = claim_trials(study, state, store, 3)
        asked = [reference.ask() for _ in range(3)]
        for mine, optunas, fixed in zip(claims, asked, [*configs, {}], strict=True):
            assert mine.trial.number == optunas.number
            drawn = suggest_params(optunas, spec)
            assert {k: mine.trial.params[k] for k in fixed} == fixed
            assert {k: drawn[k] for k in fixed} == fixed
            assert mine.trial.params.keys() == drawn.keys() == SPACE.keys()
            assert in_space(spec, mine.trial.params)
        bulk = load(url, "enqueued").trials
        assert [t.state for t in bulk] == [TrialState.RUNNING] * 3
        assert [t.system_attrs.get("fixed_params") for t in bulk] == [*configs, None]
    finally:
        storage.engine.dispose()


SAMPLERS = ["tpe", "bayes", "gp", "cmaes", "random", "grid"]


def in_space(spec: StudySpec, params: dict[str, Any]) -> bool:
    dists = distributions(spec)
    return params.keys() == dists.keys() and all(
        d._contains(d.to_internal_repr(params[k])) for k, d in dists.items()
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_claims_packs_on_a_bulk_written_study(tmp_path: Path, sampler: str) -> None:
    """A pack drawn at random (start-up), written and told in bulk, then a pack drawn by
    the sampler's model from those trials, COMPLETE and PRUNED."""
    grid = sampler == "grid"
    spec = bulk_spec(
        sampler,
        search_space=GRID_SPACE if grid else SPACE,
        sampler={"name": sampler, "n_startup_trials": 2},
        budget={"n_trials": 6 if grid else 2 * PACK},
    )
    url = f"sqlite:///{tmp_path / 'samplers.db'}"
    store, state, study = submitted(url, spec)
    packs = []
    for pruned in ({1}, {0}):
        claims = claim_trials(study, state, store, PACK)
        points = [tuple(c.trial.params.values()) for c in claims]
        assert all(in_space(spec, c.trial.params) for c in claims), points
        assert len(set(points)) == len(points), points  # the pack's points differ
        told = finish(store, state, study, claims, curves_of(claims), pruned)
        assert [told[optuna_internals.trial_id(c.trial)] for c in claims] == [
            TrialState.PRUNED if i in pruned else TrialState.COMPLETE for i in range(len(claims))
        ]
        packs.append(claims)
    assert [len(p) for p in packs] == ([PACK, 2] if grid else [PACK, PACK])
    assert claim_trials(study, state, store, PACK) == []  # the budget is spent
    trials = load(url, sampler).trials
    claimed = [c.trial for p in packs for c in p]
    assert [t.number for t in trials] == [t.number for t in claimed]
    assert [t.params for t in trials] == [t.params for t in claimed]  # as they were drawn
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    if grid:  # every point of the grid once
        assert len({tuple(t.params.values()) for t in trials}) == 6
        assert sorted(t.system_attrs["grid_id"] for t in trials) == list(range(6))


def test_optuna_dashboard_lists_a_bulk_written_study(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dashboard.db'}"
    spec = bulk_spec("shown", sampler={"name": "random"}, budget={"n_trials": PACK})
    store, state, study = submitted(url, spec)
    claims = claim_trials(study, state, store, PACK)
    finish(store, state, study, claims, curves_of(claims), pruned={2})
    loaded = load(url, "shown")

    shown = dashboard_study(optuna_dashboard.wsgi(optuna.storages.RDBStorage(url)), "shown")
    assert [t["number"] for t in shown["trials"]] == [0, 1, 2, 3]
    assert [t["state"] for t in shown["trials"]] == ["Complete", "Complete", "Pruned", "Complete"]
    assert [t["values"] for t in shown["trials"]] == [[t.value] for t in loaded.trials]
    assert shown["best_trials"][0]["number"] == loaded.best_trial.number
    third = shown["trials"][2]
    assert {p["name"]: p["param_external_value"] for p in third["params"]} == {
        k: str(v) for k, v in loaded.trials[2].params.items()
    }
    assert [v["step"] for v in third["intermediate_values"]] == [1, 2, 3]
    assert {a["key"] for a in third["user_attrs"]} >= {"history", "val_accuracy", "diagnosis"}
    assert shown["has_intermediate_values"] is True


def test_a_pack_does_not_call_its_finished_members_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Members told (or handed back) leave the pack's writes: the writes of later epochs
    neither check their leases nor warn that they were taken away."""
    store = Store.open(f"sqlite:///{tmp_path / 'told.db'}")
    spec = bulk_spec(
        "told",
        training={"max_epochs": 6, "early_stopping_patience": None},
        pruner={"name": "sha", "min_resource": 1, "reduction_factor": 2},
        budget={"n_trials": 8},
    )
    submit_study(store, spec)
    options = WorkerOptions(store, studies=("told",), max_trials=8, pack=4, idle_exit_s=0)
    with caplog.at_level("WARNING"):
        assert Worker(options).run() == 0
    states = Counter(t.state for t in load(store.url, "told").trials)
    assert states[TrialState.PRUNED] > 0  # members left their packs at different epochs
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert "failed as stale" not in caplog.text


def test_the_samplers_history_reads_what_changed_since_its_last_read(tmp_path: Path) -> None:
    """`TrialHistory` holds what samplers read (params, values, system attributes, the last
    report), and a trial that was running at one read is read again once it finished."""
    url = f"sqlite:///{tmp_path / 'history.db'}"
    study = optuna.create_study(study_name="seen", storage=optuna.storages.RDBStorage(url))
    done = study.ask()
    done.suggest_float("x", 0.0, 1.0)
    done.report(0.7, 1)
    done.report(0.4, 2)
    study._storage.set_trial_system_attr(done._trial_id, "grid_id", 3)
    done.set_user_attr("history", [[1, 0.7], [2, 0.4]])
    study.tell(done, 0.4)
    running = study.ask()
    running.suggest_float("x", 0.0, 1.0)
    history = TrialHistory(url, optuna_internals.study_id(study))

    first = history.trials()
    assert [t.state for t in first] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert first[0].params == done.params and first[0].value == 0.4
    assert first[0].intermediate_values == {2: 0.4}  # the last report: what samplers read
    assert first[0].system_attrs == {"grid_id": 3} and first[0].user_attrs == {}
    assert first[0].datetime_start == load(url, "seen").trials[0].datetime_start

    study.tell(running, 0.9)
    added = study.ask()
    then = history.trials(states=(TrialState.COMPLETE, TrialState.RUNNING))
    assert [(t.number, t.state) for t in then] == [
        (0, TrialState.COMPLETE),
        (1, TrialState.COMPLETE),
        (2, TrialState.RUNNING),
    ]
    assert then[1].value == 0.9 and then[2]._trial_id == added._trial_id
