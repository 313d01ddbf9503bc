"""Samplers on cheap test functions: how fast each finds a known optimum, what an ask costs,
and what bayes' bounded fit (the best 80 and newest 20 finished trials) costs in quality.

Training networks would make a sampler comparison take hours and drown it in training noise,
so the objectives here are deterministic functions of a spec's search space with a known
minimum. Every sampler is built exactly as the project builds it (`make_sampler` on a parsed
spec, `suggest_params` to sample), so this measures what `hpsearch run` would do.

Run: .venv/bin/python bench/samplers.py   (or `make bench`); it rewrites the section
"## Samplers on test functions" of BENCHMARKS.md and prints the same Markdown.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
import optuna
from optuna.trial import TrialState
from report import environment, markdown_table, write_section

import hpsearch.search.bayes
from hpsearch.search.space import make_sampler, suggest_params
from hpsearch.spec import StudySpec, parse_spec

SAMPLERS = ("random", "tpe", "bayes", "gp")
TIMED_SAMPLERS = ("tpe", "bayes", "gp")
SEEDS = tuple(range(20))  # 5 left bayes and random within noise of each other on mixed-5d
LONG_SEEDS = tuple(range(5))  # the 200-trial searches cost far more
N_TRIALS = 30
CHECKPOINTS = (10, 20, 30)
ASK_SIZES = (30, 200, 1000)  # finished trials in the study when the asks are timed
N_TIMED_ASKS = 5
# Long bayes searches, past the 100 finished trials from which its GP sees only a subset.
LONG_TRIALS = 200
LONG_CHECKPOINTS = (100, 150, 200)
LAST_ASKS = 20  # the asks at the end of a long search, where the study is largest
FITS = (
    f"best {hpsearch.search.bayes._MAX_BEST} + newest {hpsearch.search.bayes._MAX_RECENT}",
    "every finished trial",
)

SECTION = "## Samplers on test functions"
COMMAND = ".venv/bin/python bench/samplers.py"

Params = dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """A test function over a search space, with its known minimum (to measure regret)."""

    name: str
    description: str
    search_space: dict[str, Any]
    evaluate: Callable[[StudySpec, Params], float]
    optimum: float


def unit(spec: StudySpec, key: str, value: float) -> float:
    """`value` mapped to [0, 1] on the dimension's own scale (log or linear).

    Distances on this scale are what a sampler sees, so every dimension weighs the same.
    """
    dim = spec.search_space.dimensions()[key]
    if dim.log:
        return math.log(value / dim.low) / math.log(dim.high / dim.low)
    return (value - dim.low) / (dim.high - dim.low)


def sq(spec: StudySpec, params: Params, key: str, target: float) -> float:
    """Squared distance, on the unit scale, from a param to its best value."""
    return (unit(spec, key, params[key]) - unit(spec, key, target)) ** 2


def bowl(spec: StudySpec, params: Params) -> float:
    """Smooth, separable, minimum 0 at lr 3e-3, dropout 0.25, batch 64 (all inside the box).

    The learning rate weighs most, as it does when training networks.
    """
    return (
        4 * sq(spec, params, "learning_rate", 3e-3)
        + sq(spec, params, "dropout", 0.25)
        + sq(spec, params, "batch_size", 64)
    )


BEST_LR = {"adam": 3e-3, "rmsprop": 1e-3, "sgd": 3e-2}
OPTIMIZER_PENALTY = {"adam": 0.0, "rmsprop": 0.02, "sgd": 0.05}


def mixed(spec: StudySpec, params: Params) -> float:
    """Five mixed dimensions with interactions, minimum 0 at adam, 3 layers, lr 3e-3,
    dropout 0.4, batch 64.

    The best learning rate depends on the optimizer and the best dropout on the depth, so a
    sampler that models each dimension alone is misled; each optimizer is a local optimum.
    """
    optimizer, n_layers = params["optimizer"], params["n_layers"]
    return (
        4 * sq(spec, params, "learning_rate", BEST_LR[optimizer])
        + sq(spec, params, "dropout", 0.1 + 0.1 * n_layers)
        + sq(spec, params, "batch_size", 64)
        + 0.05 * (n_layers - 3) ** 2
        + OPTIMIZER_PENALTY[optimizer]
    )


BOWL_SPACE = {
    "learning_rate": {"low": 1e-5, "high": 1e-1, "log": True},
    "dropout": {"low": 0.0, "high": 0.7},
    "batch_size": {"low": 16, "high": 512, "log": True},
}
PROBLEMS = (
    Problem("bowl-3d", "smooth 3-d bowl (lr, dropout, batch size)", BOWL_SPACE, bowl, 0.0),
    Problem(
        "mixed-5d",
        "bowl + n_layers (int 1..4) + optimizer (adam/sgd/rmsprop), with interactions",
        {
            **BOWL_SPACE,
            "n_layers": {"low": 1, "high": 4},
            "optimizer": {"choices": ["adam", "sgd", "rmsprop"]},
        },
        mixed,
        0.0,
    ),
)


def make_spec(problem: Problem, sampler: str, seed: int) -> StudySpec:
    """A valid study spec for the problem's space; only its search space and sampler matter."""
    return parse_spec(
        {
            "name": f"bench-{problem.name}",
            "dataset": {"source": "builtin", "name": "digits"},
            "search_space": problem.search_space,
            "objective": {"metric": "val_loss"},  # minimised, like the test functions
            "sampler": {"name": sampler, "seed": seed},  # the spec's start-up trials
            "budget": {"n_trials": N_TRIALS},
        }
    )


def new_study(spec: StudySpec, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """An in-memory study: storage costs are not what is compared here."""
    return optuna.create_study(direction=spec.objective.direction, sampler=sampler)


def best_trace(problem: Problem, sampler: str, seed: int) -> list[float]:
    """The best value after each of N_TRIALS trials of one seeded search."""
    spec = make_spec(problem, sampler, seed)
    study = new_study(spec, make_sampler(spec))
    study.optimize(lambda trial: problem.evaluate(spec, suggest_params(trial, spec)), N_TRIALS)
    return np.minimum.accumulate([trial.value for trial in study.trials]).tolist()


def ask_seconds(problem: Problem, sampler: str, n_finished: int) -> float:
    """Median time of an ask (sampling every param) in a study of `n_finished` random trials.

    Each timed trial is told FAIL, which every sampler ignores, so all asks see the same
    `n_finished` trials.
    """
    spec = make_spec(problem, sampler, seed=0)
    history = new_study(spec, optuna.samplers.RandomSampler(seed=0))
    history.optimize(lambda trial: problem.evaluate(spec, suggest_params(trial, spec)), n_finished)
    study = new_study(spec, make_sampler(spec))
    study.add_trials(history.trials)
    seconds = []
    for _ in range(N_TIMED_ASKS):
        start = time.perf_counter()
        trial = study.ask()
        suggest_params(trial, spec)
        seconds.append(time.perf_counter() - start)
        study.tell(trial, state=TrialState.FAIL)
    return statistics.median(seconds)


@dataclass(frozen=True)
class LongSearch:
    """A long bayes search: the best value after each trial and the seconds of each ask."""

    best: list[float]
    ask_seconds: list[float]


def long_bayes_search(problem: Problem, seed: int, fit_all: bool) -> LongSearch:
    """bayes as shipped, or (`fit_all`) with its GP fitted on every finished trial: the
    difference is what the bounded fit costs in quality and saves in time."""
    spec = make_spec(problem, "bayes", seed)
    study = new_study(spec, make_sampler(spec))
    values, seconds = [], []
    fit = mock.patch.object(hpsearch.search.bayes, "_MAX_BEST", LONG_TRIALS)
    with fit if fit_all else contextlib.nullcontext():
        for _ in range(LONG_TRIALS):
            start = time.perf_counter()
            trial = study.ask()
            params = suggest_params(trial, spec)
            seconds.append(time.perf_counter() - start)
            values.append(problem.evaluate(spec, params))
            study.tell(trial, values[-1])
    return LongSearch(np.minimum.accumulate(values).tolist(), seconds)


def subset_table(searches: dict[tuple[str, str], list[LongSearch]]) -> str:
    """Per problem, the bounded fit against the fit on every trial: best values (mean ± std
    over seeds), the difference at the end with its noise, and the seconds per ask."""
    header = [
        "problem",
        "GP fitted on",
        *(f"best @ {n}" for n in LONG_CHECKPOINTS),
        f"s per ask, last {LAST_ASKS}",
        "s per search",
    ]
    rows = []
    for (problem, fit), runs in searches.items():
        best = np.array([run.best for run in runs])
        last = [statistics.mean(run.ask_seconds[-LAST_ASKS:]) for run in runs]
        total = [sum(run.ask_seconds) for run in runs]
        rows.append(
            [
                problem,
                fit,
                *(mean_std(best[:, n - 1]) for n in LONG_CHECKPOINTS),
                f"{statistics.mean(last):.3f}",
                f"{statistics.mean(total):.1f}",
            ]
        )
    return markdown_table(header, rows)


def subset_verdict(searches: dict[tuple[str, str], list[LongSearch]]) -> list[str]:
    """The bounded fit against the fit on every trial, per problem, at the end of the search."""
    lines = []
    for problem in PROBLEMS:
        bounded, full = (
            np.array([run.best[-1] for run in searches[problem.name, fit]]) for fit in FITS
        )
        difference = bounded.mean() - full.mean()  # minimised: below 0, the bounded fit is better
        noise = 2 * math.sqrt(bounded.var(ddof=1) / len(bounded) + full.var(ddof=1) / len(full))
        verdict = "better" if difference < 0 else "worse"
        if abs(difference) <= noise:
            verdict = "within noise"
        lines.append(
            f"- `{problem.name}`: best @ {LONG_TRIALS} of the bounded fit minus the full fit's: "
            f"{difference:+.3g} (2·SE {noise:.2g}, lower is better): {verdict}"
        )
    return lines


def quality_table(problem: Problem, traces: dict[str, np.ndarray]) -> str:
    """Best value after 10/20/30 trials (mean ± sample std over seeds) and the regret ratio."""
    header = ["sampler", *(f"best @ {n}" for n in CHECKPOINTS), "random regret / regret @ 30"]
    random_regret = traces["random"][:, -1].mean() - problem.optimum
    rows = []
    for sampler, trace in traces.items():
        cells = [mean_std(trace[:, n - 1]) for n in CHECKPOINTS]
        regret = trace[:, -1].mean() - problem.optimum
        ratio = random_regret / regret if regret > 0 else math.inf
        rows.append([sampler, *cells, f"{ratio:.2f}"])
    return markdown_table(header, rows)


def mean_std(values: np.ndarray) -> str:
    """Mean ± sample std in significant digits: the best values span several decades."""
    return f"{values.mean():.3g} ± {values.std(ddof=1):.2g}"


def timing_table(seconds: dict[tuple[str, int], float]) -> str:
    """Median seconds per ask, one row per sampler, one column per study size."""
    header = ["sampler", *(f"ask @ {n} trials (s)" for n in ASK_SIZES)]
    rows = [
        [sampler, *(f"{seconds[sampler, n]:.3f}" for n in ASK_SIZES)] for sampler in TIMED_SAMPLERS
    ]
    return markdown_table(header, rows)


def startup_line() -> str:
    """Each model-based sampler's random start-up trials, as the spec's defaults set them."""
    counts = {name: make_spec(PROBLEMS[0], name, 0).sampler.n_startup_trials for name in SAMPLERS}
    return ", ".join(f"{n} trials of `{name}`" for name, n in counts.items() if name != "random")


def environment_lines() -> str:
    """Machine, date and versions.

    greenlet is listed because without it Optuna's GPSampler optimises its acquisition
    function sequentially, which makes `gp` asks about twice as slow.
    """
    return environment(COMMAND, ("optuna", "scikit-optimize", "torch", "greenlet"))


def section(quality: list[str], timing: str, subset: str, run_seconds: float, load: float) -> str:
    """The whole Markdown section: what was run, on what, and the tables."""
    problems = "\n".join(f"- `{p.name}`: {p.description}; optimum {p.optimum}" for p in PROBLEMS)
    tables = "\n\n".join(
        f"### {p.name}\n\n{table}" for p, table in zip(PROBLEMS, quality, strict=True)
    )
    return f"""{SECTION}

{environment_lines()}
- Run time: {run_seconds:.0f} s; load average {load:.1f} when it started (other processes
  on the machine slow every sampler, `gp` and `bayes` most)

Each sampler is built by `make_sampler` from a parsed spec (its default `n_startup_trials`)
and samples with `suggest_params`, in an in-memory study, on deterministic test functions
(see `bench/samplers.py`) minimised in {len(SEEDS)} seeds x {N_TRIALS} trials:

{problems}

"best @ n" is the best value after n trials, mean ± sample std over the seeds; the first
{startup_line()} are start-up trials, the points of a Latin hypercube drawn from the seed
(`hpsearch/search/startup.py`). The last column is random's mean regret
over the sampler's at {N_TRIALS} trials (regret = best found - optimum; higher is better, random
is 1 by definition).

{tables}

### Time per ask

Median over {N_TIMED_ASKS} asks (an ask samples every param) on `mixed-5d`, in a study
already holding that many finished random trials.

{timing}

### bayes at {LONG_TRIALS} trials: what fitting a subset costs

The `bayes` sampler fits its GP on at most the {FITS[0]} finished trials, so an ask
stops growing past that many trials (`hpsearch/bayes.py`). Here it searches both problems
for {LONG_TRIALS} trials, {len(LONG_SEEDS)} seeds, as shipped and with the GP fitted on every
finished trial instead; "s per ask, last {LAST_ASKS}" is the mean over the last {LAST_ASKS}
asks of a search, where the study is largest.

{subset}
"""


def main() -> None:
    """Run every problem, sampler and seed, time the asks, then print and record the tables."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load, start = os.getloadavg()[0], time.perf_counter()
    quality = []
    for problem in PROBLEMS:
        traces = {
            sampler: np.array([best_trace(problem, sampler, seed) for seed in SEEDS])
            for sampler in SAMPLERS
        }
        quality.append(quality_table(problem, traces))
        print(f"### {problem.name}\n\n{quality[-1]}\n", flush=True)
    seconds = {
        (sampler, n): ask_seconds(PROBLEMS[-1], sampler, n)
        for sampler in TIMED_SAMPLERS
        for n in ASK_SIZES
    }
    print(f"### Time per ask\n\n{timing_table(seconds)}\n")
    searches = {
        (problem.name, fit): [long_bayes_search(problem, seed, fit_all) for seed in LONG_SEEDS]
        for problem in PROBLEMS
        for fit, fit_all in zip(FITS, (False, True), strict=True)
    }
    subset = "\n".join([subset_table(searches), "", *subset_verdict(searches)])
    print(f"### bayes at {LONG_TRIALS} trials\n\n{subset}\n")
    run_seconds = time.perf_counter() - start
    print(f"Run time: {run_seconds:.0f} s")
    write_section(SECTION, section(quality, timing_table(seconds), subset, run_seconds, load))


if __name__ == "__main__":
    main()
