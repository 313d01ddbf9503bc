"""Deleting a study: hpsearch's `delete_study` (bulk statements, one transaction) against
`optuna.delete_study` (the ORM, row by row) on two identical studies of N finished trials,
each with params, five reported epochs and user attributes, in one PostgreSQL database.

    python bench/delete.py [--trials 4000] [--url postgresql://...]

The database is made and dropped by the script on the server of `--url` (default
$HPSEARCH_BENCH_POSTGRES_URL, else the test server). Writes the "Deleting a study" section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Callable

import optuna
import sqlalchemy
from report import environment, markdown_table, write_section

from hpsearch.search.space import suggest_params
from hpsearch.service.studies import change_state, delete_study, submit_study
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store, optuna_storage

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
EPOCHS = 5


def bench_spec(name: str, n_trials: int) -> StudySpec:
    return parse_spec(
        {
            "name": name,
            "dataset": {"source": "builtin", "name": "iris"},
            "search_space": {
                "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
                "dropout": {"low": 0.0, "high": 0.5},
            },
            "sampler": {"name": "random"},
            "budget": {"n_trials": n_trials},
        }
    )


def fill(url: str, name: str, n_trials: int) -> int:
    """A submitted study with `n_trials` finished trials; returns its hpsearch id."""
    spec = bench_spec(name, n_trials)
    store = Store.open(url)
    state = submit_study(store, spec)
    study = optuna.load_study(
        study_name=name, storage=optuna_storage(url), sampler=optuna.samplers.RandomSampler(0)
    )
    for _ in range(n_trials):
        trial = study.ask()
        suggest_params(trial, spec)
        for epoch in range(1, EPOCHS + 1):
            trial.report(0.1 * epoch, epoch)
        trial.set_user_attr("epochs", EPOCHS)
        trial.set_user_attr("history", [[e, 0.5, 0.5, 0.5, 0.01] for e in range(1, EPOCHS + 1)])
        study.tell(trial, 0.5)
    return state.id


def timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--url", default=os.environ.get("HPSEARCH_BENCH_POSTGRES_URL", DEFAULT_URL))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    server = sqlalchemy.make_url(args.url).set(drivername="postgresql+psycopg")
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    database = f"hpsearch_bench_delete_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    try:
        url = server.set(database=database).render_as_string(hide_password=False)
        ours = fill(url, "ours", args.trials)
        fill(url, "optunas", args.trials)
        store = Store.open(url)
        change_state(store, ours, "cancel")
        ours_s = timed(lambda: delete_study(store, "ours"))
        storage = optuna_storage(url)
        optunas_s = timed(lambda: optuna.delete_study(study_name="optunas", storage=storage))
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE "{database}" WITH (FORCE)'))
    table = markdown_table(
        ["deletion", f"seconds for {args.trials:,} trials", "vs hpsearch"],
        [
            ["hpsearch `delete_study` (bulk, one transaction)", f"{ours_s:.2f}", "1.0x"],
            ["`optuna.delete_study` (ORM)", f"{optunas_s:.2f}", f"{optunas_s / ours_s:.1f}x"],
        ],
    )
    command = f"python bench/delete.py --trials {args.trials}"
    write_section(
        "## Deleting a study",
        "## Deleting a study\n\n"
        f"{environment(command, ('optuna', 'sqlalchemy', 'psycopg'))}\n\n"
        f"Two identical studies of {args.trials:,} finished trials (params, {EPOCHS} "
        "reported epochs and user attributes each) in one PostgreSQL database; each is "
        "deleted once. hpsearch deletes the rows of every Optuna table with one statement per "
        "table, in the transaction that deletes its own record, so a server killed half-way "
        "leaves the study whole.\n\n"
        f"{table}\n",
    )
    print(f"hpsearch {ours_s:.2f} s, optuna {optunas_s:.2f} s ({optunas_s / ours_s:.1f}x)")


if __name__ == "__main__":
    main()
