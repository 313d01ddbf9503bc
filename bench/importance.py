"""Hyperparameter importance: what `GET /studies/{study}/importance` (and `hpsearch
importance`) costs on studies of 100 to 10,000 complete trials, and Optuna's three
evaluators side by side on the same trials.

    python bench/importance.py [--sizes 100,1000,10000] [--postgres URL] [--write]

Each study has four searched params (learning rate, batch size, dropout, optimizer) and a
planted objective: the learning rate matters most, then the dropout, then the optimizer,
the batch size not at all, plus noise. Its trials are written in bulk into Optuna's tables,
as a worker leaves them (params and value; reports and attributes do not change what
importance reads). The API is timed in process (FastAPI's test client), median of 5 calls
after one that loads the code. `--write` rewrites the "Hyperparameter importance" section of
BENCHMARKS.md. PostgreSQL (`--postgres`, default $HPSEARCH_BENCH_POSTGRES_URL) is measured
beside SQLite when given.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.distributions import distribution_to_json
from optuna.importance import (
    FanovaImportanceEvaluator,
    MeanDecreaseImpurityImportanceEvaluator,
    PedAnovaImportanceEvaluator,
    get_param_importances,
)
from optuna.trial import TrialState, create_trial
from report import environment, markdown_table, scratch_database, write_section

from hpsearch.api import Settings, create_app
from hpsearch.search.space import distributions
from hpsearch.service.importance import MAX_TRIALS, evenly_spaced, top_quantile
from hpsearch.service.studies import submit_study
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store
from hpsearch.storage.db import make_engine
from hpsearch.storage.optuna_internals import TrialModel, TrialParamModel, TrialValueModel
from hpsearch.storage.queries import ScoredTrial

PLANTED = ["learning_rate", "dropout", "optimizer", "batch_size"]  # most important first
EVALUATOR_LIMIT = 1_000  # fANOVA on more trials takes minutes


def bench_spec(name: str, n_trials: int) -> StudySpec:
    return parse_spec(
        {
            "name": name,
            "dataset": {"source": "builtin", "name": "digits"},
            "search_space": {
                "learning_rate": {"low": 1e-5, "high": 1e-1, "log": True},
                "batch_size": {"low": 16, "high": 256, "log": True},
                "dropout": {"low": 0.0, "high": 0.7},
                "optimizer": {"choices": ["adam", "sgd", "rmsprop"]},
            },
            "budget": {"n_trials": n_trials},
        }
    )


def planted_trials(spec: StudySpec, n: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    rng = np.random.default_rng(seed)
    dists = distributions(spec)
    trials = []
    for _ in range(n):
        params = {
            "learning_rate": float(10 ** rng.uniform(-5, -1)),
            "batch_size": round(float(2 ** rng.uniform(4, 8))),
            "dropout": float(rng.uniform(0, 0.7)),
            "optimizer": str(rng.choice(["adam", "sgd", "rmsprop"])),
        }
        value = (
            0.95
            - 0.1 * (math.log10(params["learning_rate"]) + 3) ** 2
            - 0.1 * params["dropout"]
            + 0.03 * (params["optimizer"] == "adam")
            + rng.normal(0, 0.01)
        )
        trials.append(create_trial(params=params, distributions=dists, value=value))
    return trials


def prefill(url: str, study_id: int, trials: list[optuna.trial.FrozenTrial]) -> None:
    """The trials, complete, in Optuna's tables, as a worker's bulk writes leave them."""
    start = datetime(2026, 1, 1)
    with make_engine(url).begin() as connection:
        connection.execute(
            sqlalchemy.insert(TrialModel.__table__),
            [
                {
                    "number": number,
                    "study_id": study_id,
                    "state": TrialState.COMPLETE,
                    "datetime_start": start + timedelta(seconds=30 * number),
                    "datetime_complete": start + timedelta(seconds=30 * number + 25),
                }
                for number in range(len(trials))
            ],
        )
        table = TrialModel.__table__
        ids = dict(
            connection.execute(
                sqlalchemy.select(table.c.number, table.c.trial_id).where(
                    table.c.study_id == study_id
                )
            ).all()
        )
        params, values = [], []
        for number, trial in enumerate(trials):
            for name, dist in trial.distributions.items():
                params.append(
                    {
                        "trial_id": ids[number],
                        "param_name": name,
                        "param_value": dist.to_internal_repr(trial.params[name]),
                        "distribution_json": distribution_to_json(dist),
                    }
                )
            values.append(
                {
                    "trial_id": ids[number],
                    "objective": 0,
                    "value": trial.value,
                    "value_type": TrialValueModel.TrialValueType.FINITE,
                }
            )
        connection.execute(sqlalchemy.insert(TrialParamModel.__table__), params)
        connection.execute(sqlalchemy.insert(TrialValueModel.__table__), values)
        connection.exec_driver_sql("ANALYZE")


def timed(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median seconds, last answer) of `repeats` calls."""
    seconds, answer = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        answer = call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), answer


def measure_api(kind: str, postgres: str | None, n: int) -> list[str]:
    from fastapi.testclient import TestClient

    with scratch_database(kind, postgres, "importance") as url:
        store = Store.open(url)
        spec = bench_spec(f"planted-{n}", n)
        state = submit_study(store, spec)
        assert state.optuna_study_id is not None
        prefill(url, state.optuna_study_id, planted_trials(spec, n))
        client = TestClient(create_app(Settings(database_url=url)))
        path = f"/api/v1/studies/{spec.name}/importance"
        client.get(path)  # loads the evaluator's code once
        seconds, response = timed(lambda: client.get(path), 5)
    body = response.json()
    ranked = [entry["param"] for entry in body["importances"]]
    return [
        kind,
        f"{n:,}",
        f"{body['trials_used']:,}",
        f"{seconds * 1000:.0f}",
        ", ".join(f"{e['param']} {e['importance']:.2f}" for e in body["importances"]),
        "yes" if ranked == PLANTED else "no",
    ]


def measure_evaluators(n: int) -> list[list[str]]:
    """Optuna's evaluators on the same in-memory trials (no database)."""
    spec = bench_spec("evaluators", n)
    trials = evenly_spaced(
        [ScoredTrial(i, i, 0.0) for i in range(n)], MAX_TRIALS
    )  # the trials the API would use
    frozen = [planted_trials(spec, n)[t.number] for t in trials]
    study = optuna.create_study(direction="maximize")
    study.add_trials(frozen)
    quantile = top_quantile(len(frozen))
    evaluators: list[tuple[str, Any]] = [
        (
            f"PED-ANOVA (target quantile {quantile:g})",
            PedAnovaImportanceEvaluator(target_quantile=quantile),
        ),
        ("mean decrease impurity (seed 0)", MeanDecreaseImpurityImportanceEvaluator(seed=0)),
        ("fANOVA (seed 0, Optuna's default)", FanovaImportanceEvaluator(seed=0)),
    ]
    rows = []
    for name, evaluator in evaluators:
        repeats = 1 if isinstance(evaluator, FanovaImportanceEvaluator) else 3
        seconds, shares = timed(
            lambda e=evaluator: get_param_importances(study, evaluator=e), repeats
        )
        again = get_param_importances(study, evaluator=evaluator)
        rows.append(
            [
                name,
                f"{len(frozen):,}",
                f"{seconds:.3f}",
                ", ".join(f"{k} {v:.2f}" for k, v in shares.items()),
                "yes" if list(shares) == PLANTED else "no",
                "yes" if again == shares else "no",
            ]
        )
    return rows


def few_trials(sizes: tuple[int, ...] = (10, 15, 20, 30, 50), studies: int = 40) -> list[list[str]]:
    """How often each evaluator ranks the learning rate first, on `studies` planted studies
    of each size (seeds 0, 1, ...): whether an answer on few trials means anything."""
    rows = []
    for n in sizes:
        counts = {"hpsearch": 0, "ped-0.1": 0, "mdi": 0, "fanova": 0}
        for seed in range(studies):
            study = optuna.create_study(direction="maximize")
            study.add_trials(planted_trials(bench_spec("few", n), n, seed))
            evaluators = {
                "hpsearch": PedAnovaImportanceEvaluator(target_quantile=top_quantile(n)),
                "ped-0.1": PedAnovaImportanceEvaluator(),
                "mdi": MeanDecreaseImpurityImportanceEvaluator(seed=0),
                "fanova": FanovaImportanceEvaluator(seed=0),
            }
            for key, evaluator in evaluators.items():
                shares = get_param_importances(study, evaluator=evaluator)
                counts[key] += next(iter(shares)) == "learning_rate"
        rows.append([str(n), f"{top_quantile(n):.2g}", *(f"{counts[k]}/{studies}" for k in counts)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--postgres", default=os.environ.get("HPSEARCH_BENCH_POSTGRES_URL"))
    parser.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md's section")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    sizes = [int(size) for size in args.sizes.split(",")]
    kinds = ["sqlite", *(["postgresql"] if args.postgres else [])]
    api = [measure_api(kind, args.postgres, n) for kind in kinds for n in sizes]
    api_table = markdown_table(
        [
            "database",
            "complete trials",
            "trials used",
            "ms per request",
            "importances",
            "planted order",
        ],
        api,
    )
    print(api_table)
    evaluator_table = markdown_table(
        ["evaluator", "trials", "seconds", "importances", "planted order", "same answer twice"],
        measure_evaluators(EVALUATOR_LIMIT),
    )
    print(evaluator_table)
    few_table = markdown_table(
        [
            "complete trials",
            "hpsearch's quantile",
            "PED-ANOVA as hpsearch runs it",
            "PED-ANOVA, quantile 0.1 (Optuna's default)",
            "mean decrease impurity",
            "fANOVA",
        ],
        few_trials(),
    )
    print(few_table)
    if not args.write:
        return
    command = f"python bench/importance.py --sizes {args.sizes}" + (
        " --postgres URL" if args.postgres else ""
    )
    write_section(
        "## Hyperparameter importance",
        "## Hyperparameter importance\n\n"
        f"{environment(command, ('optuna', 'scikit-learn', 'sqlalchemy'))}\n\n"
        "`GET /api/v1/studies/{study}/importance` on studies of complete trials with four "
        "searched params and a planted objective (learning rate first, then dropout, then "
        "optimizer; batch size does not matter), in process, median of 5 requests. Above "
        f"{MAX_TRIALS:,} complete trials an evenly spaced sample of {MAX_TRIALS:,} is "
        "evaluated.\n\n"
        f"{api_table}\n\n"
        f"Optuna's three evaluators on the same {EVALUATOR_LIMIT:,} trials, in memory "
        "(`optuna.importance.get_param_importances`; PED-ANOVA is what hpsearch uses):\n\n"
        f"{evaluator_table}\n\n"
        "With few trials: in how many of 40 planted studies (seeds 0 to 39) each evaluator "
        "ranks the learning rate first. hpsearch asks for at least 10 complete trials and "
        "counts the best tenth of them, or the best 10 where a tenth holds fewer (at most "
        "half):\n\n"
        f"{few_table}\n",
    )


if __name__ == "__main__":
    main()
