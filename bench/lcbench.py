"""hpsearch's samplers and pruners on LCBench: search quality on a public benchmark.

`bench/samplers.py` compares samplers on test functions and `bench/search_quality.py` trains
small networks; neither says how hpsearch searches the space of a real MLP study. LCBench
(Zimmer et al., 2021) trained 2,000 funnel-shaped MLPs with SGD for 52 epochs on each of 35
OpenML tasks; YAHPO Gym's surrogate of it (`model.onnx`, in bench/data/lcbench, or
$LCBENCH_DIR) predicts a configuration's validation accuracy at every
epoch on 34 of them, so a search with pruning runs in seconds instead of days.

Each search is what a worker does, with the surrogate standing in for training: the sampler
is `make_sampler` on a parsed spec, each trial's params come from `suggest_params`, every
epoch's val_accuracy is reported to the trial and the worker's own pruning decision
(`hpsearch.search.pruning.StudyPruning`, Optuna's pruner of the spec) says whether it stops
there. The study is in memory: this measures search quality, not the service.

The surrogate's input (see `Surrogate`): one int32 column, the task's code from
`encoding.json`, and eight float32 columns in YAHPO's `cont_names` order, epoch, batch_size,
learning_rate, momentum, weight_decay, num_layers, max_units, max_dropout, each on its
natural scale, as yahpo-gym passes them (`BenchmarkSet._config_to_xs`): the graph holds its
own Log and Exp nodes for the log-scaled inputs and the outputs. Its six outputs, on their
natural scales, are YAHPO's `y_names`: time, val_accuracy (percent), val_cross_entropy,
val_balanced_accuracy, test_cross_entropy, test_balanced_accuracy. tests/test_lcbench.py
checks that a sensible configuration's curve rises within 0..100 and differs across tasks.

Regret on a task: (best of a large random search at epoch 52 - best complete trial of the
method) / (that best - the median of the random search); 0 is as good as REFERENCE_SIZE
random configurations trained to the end, 1 as good as a median one. A pruner is judged at
equal cost: a pruned search runs on past its trial budget until it has trained EPOCH_SHARE
(40%) of the epochs of the budget's trials trained to the end, and its regret there is set
against no pruning's after the whole budget. The section ends with the goals, each checked.

Run: .venv/bin/python bench/lcbench.py [--tasks ...] [--seeds N] [--budget N]
     [--methods tpe:median ...] [--quick] [--final] [--section NAME] [--write]
     [--json PATH]
`--write` rewrites the section "## Search quality on LCBench" of BENCHMARKS.md and draws
bench/plots/lcbench.png; the JSON summary is printed last. `--final` runs the final check
instead: the 22 tasks held out from development, in a section and plot of their own.
`--section NAME` writes a run that is not the full table (gp's rows at 30 trials, say) to a
section "## Search quality on LCBench: NAME" and a plot of its own, keeping the table.
On 2 cores a 100-trial search takes about 0.2 s with random or cmaes, 1.3 s with tpe, 8-10 s
with bayes and 30 s with gp (5 s for 30 trials); the 12 methods without gp (20 seeds x 12
tasks) take about an hour, nine tenths of it bayes', and gp's three would add hours. Without
gp and bayes, under 10 minutes. Pass fewer --seeds or --methods to fit a budget.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import optuna
from optuna.trial import TrialState

from hpsearch.search.pruning import StudyPruning
from hpsearch.search.space import make_sampler, suggest_params
from hpsearch.spec import SamplerSpec, StudySpec, parse_spec
from hpsearch.storage import optuna_internals
from hpsearch.storage.store import Store

SECTION = "## Search quality on LCBench"
# The final check: the tasks the defaults were not chosen on, with the sampler goals' methods
# and gp, the best of the samplers at 30 trials.
FINAL_SECTION = "## Search quality on LCBench: the held-out tasks"
FINAL_METHODS = ("random:none", "tpe:none", "bayes:none", "gp:none")
COMMAND = ".venv/bin/python bench/lcbench.py"
BENCH = Path(__file__).resolve().parent
PLOTS = BENCH / "plots"
# YAHPO Gym's lcbench folder (slds-lmu/yahpo_data 1.0.2, Apache 2.0), kept in the repository.
DATA = Path(os.environ.get("LCBENCH_DIR", BENCH / "data" / "lcbench"))
REFERENCE_FILE = BENCH / "lcbench_reference.json"
REFERENCE_SIZE = 100_000  # random configurations per task, at the last epoch
REFERENCE_SEED = 0

EPOCHS = 52
# The pruners' goal: the regret of no pruning with at most this share of its epochs. A pruned
# search runs on past its trial budget until it has trained this share of the budget's full
# epochs, so that its regret there ("regret @ 40% epochs") can be set against no pruning's.
EPOCH_SHARE = 0.4
DEV_TASKS = (3945, 7593, 34539, 126025, 126026, 126029, 146212, 167104, 167149, 167152)
DEV_TASKS += (167161, 167168)
SAMPLERS = ("random", "tpe", "bayes", "gp", "cmaes")
PRUNERS = ("none", "median", "hyperband")
CHECKPOINTS = (10, 30, 100)
QUICK = {"tasks": (3945, 34539, 167168), "seeds": 3, "budget": 30}
GOAL_TRIALS = 30  # the goals' sampler comparisons are at this many trials
DEFAULT_SAMPLER = SamplerSpec().name  # what a study gets when its spec names none
# Enough for every goal's line, at a CI's cost: gp is the slowest, about 5 s a 30-trial search.
QUICK_METHODS = (
    "random:none",
    "tpe:none",
    "bayes:none",
    "gp:none",
    "gp:median",
    "random:hyperband",
)

# The spec's keys, with LCBench's ranges. `dropout` stops below 1 (the spec refuses 1).
SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"low": 16, "high": 512, "log": True},
    "dropout": {"low": 0.0, "high": 0.99},
    "weight_decay": {"low": 1e-5, "high": 1e-1, "log": True},
    "momentum": {"low": 0.1, "high": 0.99},
    "n_layers": {"low": 1, "high": 5},
    "hidden_units": {"low": 64, "high": 1024, "log": True},
}
# The surrogate's continuous inputs after the epoch, in its order, and the spec key of each.
# hpsearch's MLP has n_layers layers of hidden_units units with one dropout; LCBench's funnel
# starts at max_units and narrows, its dropout rising to max_dropout: the spec's width and
# dropout stand for the funnel's first width and last dropout.
INPUTS = {
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "num_layers": "n_layers",
    "max_units": "hidden_units",
    "max_dropout": "dropout",
}
VAL_ACCURACY = 1  # the output column

Params = dict[str, Any]


class Surrogate:
    """YAHPO Gym's LCBench surrogate, read with onnxruntime (yahpo-gym pins an old numpy)."""

    def __init__(self, folder: Path = DATA) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        encoding = json.loads((folder / "encoding.json").read_text())
        self.codes: dict[str, int] = encoding["OpenML_task_id"]

    def val_accuracy(self, task: int, rows: np.ndarray) -> np.ndarray:
        """val_accuracy (percent) for rows of (epoch, *INPUTS) on the natural scale."""
        codes = np.full((len(rows), 1), self.codes[str(task)], dtype=np.int32)
        feed = {"x_cat": codes, "x_cont": rows.astype(np.float32)}
        return self.session.run(None, feed)[0][:, VAL_ACCURACY]

    def curve(self, task: int, params: Params) -> np.ndarray:
        """val_accuracy (percent) at epochs 1..52 of one configuration, in one call."""
        config = [float(params[key]) for key in INPUTS.values()]
        rows = np.array([[epoch, *config] for epoch in range(1, EPOCHS + 1)])
        return self.val_accuracy(task, rows)


def random_configs(n: int, seed: int) -> np.ndarray:
    """n configurations uniform on each key's scale (log or linear), as INPUTS columns."""
    rng = np.random.default_rng(seed)
    columns = []
    for key in INPUTS.values():
        dim = SEARCH_SPACE[key]
        low, high = dim["low"], dim["high"]
        if dim.get("log"):
            values = np.exp(rng.uniform(math.log(low), math.log(high), n))
        else:
            values = rng.uniform(low, high + (1 if key == "n_layers" else 0), n)
        columns.append(np.floor(values) if key == "n_layers" else values)
    return np.column_stack(columns)


@dataclass(frozen=True)
class Reference:
    """A task's large random search at the last epoch: its best and median val_accuracy."""

    best: float
    median: float


def compute_reference(surrogate: Surrogate, task: int) -> Reference:
    configs = random_configs(REFERENCE_SIZE, REFERENCE_SEED)
    rows = np.column_stack([np.full(len(configs), EPOCHS), configs])
    accuracy = surrogate.val_accuracy(task, rows) / 100
    return Reference(float(accuracy.max()), float(np.median(accuracy)))


def references(surrogate: Surrogate, tasks: Sequence[int]) -> dict[int, Reference]:
    """Each task's reference, from REFERENCE_FILE, computing (and caching) missing tasks."""
    cached: dict[str, Any] = {}
    if REFERENCE_FILE.exists():
        cached = json.loads(REFERENCE_FILE.read_text())
    key = f"{REFERENCE_SIZE} random configurations, seed {REFERENCE_SEED}, epoch {EPOCHS}"
    table = cached.get("tasks", {}) if cached.get("reference") == key else {}
    missing = [task for task in tasks if str(task) not in table]
    for task in missing:
        table[str(task)] = asdict(compute_reference(surrogate, task))
    if missing:
        REFERENCE_FILE.write_text(json.dumps({"reference": key, "tasks": table}, indent=1) + "\n")
    return {task: Reference(**table[str(task)]) for task in tasks}


def held_out_tasks(folder: Path = DATA) -> list[int]:
    """YAHPO's 34 LCBench tasks that are not development tasks: for the final check only.
    (encoding.json codes one task more, 167083, which YAHPO's configuration space leaves out.)"""
    space = json.loads((folder / "config_space.json").read_text())
    (tasks,) = [p["choices"] for p in space["hyperparameters"] if p["name"] == "OpenML_task_id"]
    return sorted(int(task) for task in tasks if int(task) not in DEV_TASKS)


def make_spec(method: str, seed: int, budget: int) -> StudySpec:
    """The study a user would write for LCBench's space with the method ("sampler:pruner")."""
    sampler, pruner = method.split(":")
    return parse_spec(
        {
            "name": f"lcbench-{sampler}-{pruner}",
            "dataset": {"source": "builtin", "name": "digits"},  # unused: the surrogate trains
            "search_space": SEARCH_SPACE,
            "training": {"max_epochs": EPOCHS, "optimizer": "sgd"},
            "objective": {"metric": "val_accuracy"},
            "sampler": {"name": sampler, "seed": seed},
            "pruner": {"name": pruner},
            "budget": {"n_trials": budget},
        }
    )


class LocalPruning(StudyPruning):
    """A worker's pruning for a study that only this process runs.

    `StudyPruning` catches up with other workers' trials in the database; here every trial
    is this process's, and its view is complete without reading: completed curves come from
    `completed_here` and rungs from its own decisions. So the catch-up is a no-op and no
    database is needed; the decisions are the worker's."""

    def __init__(self, study: optuna.Study, spec: StudySpec) -> None:
        super().__init__(cast(Store, None), study, spec)

    def _catch_up_for(self, trial: optuna.trial.FrozenTrial) -> None:
        """Nothing to read: no other process adds trials."""


@dataclass(frozen=True)
class Search:
    """One search: per trial, its value at the last epoch (NaN if pruned) and epochs run."""

    task: int
    method: str
    seed: int
    values: list[float]
    epochs: list[int]
    seconds: float


def run_trial(
    study: optuna.Study, trial: optuna.Trial, pruning: LocalPruning, curve: np.ndarray
) -> tuple[float, int]:
    """Reveal the curve epoch by epoch as training would report it; stop where pruned.
    Returns the value at the last epoch (NaN if pruned) and the epochs run.

    Report and decision are `TrialWriter`'s with a worker's context, except that Optuna
    keeps the report at once (a worker writes it with the trial's next write), so samplers
    see pruned trials' curves as they would in the database."""
    asked = optuna_internals.as_asked(trial)
    for epoch, value in enumerate(curve.tolist(), start=1):
        trial.report(value, epoch)
        decision = pruning.decide(asked)
        asked.system_attrs.update(decision.system_attrs)
        if decision.prune:
            study.tell(trial, state=TrialState.PRUNED)
            return math.nan, epoch
    study.tell(trial, float(curve[-1]))
    reported = dict(enumerate(curve.tolist(), start=1))
    pruning.completed_here(optuna_internals.trial_id(trial), reported)
    return float(curve[-1]), EPOCHS


def least_epochs(budget: int) -> int:
    """The epochs at which a search's regret is set against no pruning's: EPOCH_SHARE of
    `budget` trials trained to the last epoch."""
    return math.ceil(EPOCH_SHARE * budget * EPOCHS)


def search(surrogate: Surrogate, task: int, method: str, seed: int, budget: int) -> Search:
    """One seeded search on a task, in an in-memory study: `budget` trials, and for a
    pruned search as many more as it takes to train `least_epochs(budget)` epochs."""
    spec = make_spec(method, seed, budget)
    study = optuna.create_study(
        study_name=spec.name, direction=spec.objective.direction, sampler=make_sampler(spec)
    )
    pruning = LocalPruning(study, spec)
    values: list[float] = []
    epochs: list[int] = []
    start = time.perf_counter()
    while len(values) < budget or sum(epochs) < least_epochs(budget):
        trial = study.ask()
        params = suggest_params(trial, spec)
        curve = surrogate.curve(task, params) / 100  # hpsearch's val_accuracy is a fraction
        value, run = run_trial(study, trial, pruning, curve)
        values.append(value)
        epochs.append(run)
    return Search(task, method, seed, values, epochs, time.perf_counter() - start)


# --- running many searches -------------------------------------------------------------

_SURROGATE: Surrogate | None = None


def _init_worker() -> None:
    """Each process loads the surrogate once, keeps Optuna quiet and computes on one
    thread: the searches run in parallel processes instead (gp's torch and bayes' BLAS
    would otherwise fight over the cores)."""
    global _SURROGATE
    import threadpoolctl
    import torch

    threadpoolctl.threadpool_limits(1)
    torch.set_num_threads(1)
    _SURROGATE = Surrogate()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _run_job(job: tuple[int, str, int, int]) -> Search:
    assert _SURROGATE is not None
    return search(_SURROGATE, *job)


def cost_rank(method: str) -> int:
    """Slow samplers first, so that the pool's processes end together."""
    order = ("gp", "bayes", "cmaes", "tpe", "random")
    sampler = method.split(":")[0]
    return order.index(sampler) if sampler in order else len(order)


def run_all(
    tasks: Sequence[int], methods: Sequence[str], seeds: int, budget: int, jobs: int
) -> list[Search]:
    """Every (task, method, seed) search, over `jobs` processes, printing progress."""
    todo = [(t, m, s, budget) for m in methods for t in tasks for s in range(seeds)]
    todo.sort(key=lambda job: cost_rank(job[1]))
    if jobs == 1:  # in this process, as it is (a test's threads stay as they were)
        surrogate = Surrogate()
        return [_progress(i, len(todo), search(surrogate, *job)) for i, job in enumerate(todo, 1)]
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker) as pool:
        results = pool.imap_unordered(_run_job, todo)
        return [_progress(i, len(todo), result) for i, result in enumerate(results, 1)]


def _progress(done: int, total: int, result: Search) -> Search:
    """Print how many searches are done, every 5%, on stderr (stdout ends with the JSON)."""
    if done % max(total // 20, 1) == 0 or done == total:
        print(f"{done}/{total} searches", file=sys.stderr, flush=True)
    return result


# --- regret and summaries --------------------------------------------------------------


def regret_trace(result: Search, reference: Reference) -> np.ndarray:
    """Regret after each trial: from the best complete trial so far. The first trial of a
    search always completes (no pruner stops a study's first trial), so it is defined."""
    best = np.fmax.accumulate(np.array(result.values, dtype=float))
    return (reference.best - best) / (reference.best - reference.median)


@dataclass(frozen=True)
class MethodSummary:
    """A method over tasks and seeds: mean regret (and its standard error) at each
    checkpoint, and the epochs and seconds of a search."""

    method: str
    runs: int
    regret: dict[int, float]
    regret_se: dict[int, float]
    epochs: float  # mean over searches of the epochs the budget's trials trained
    epoch_share: float  # of what the same trials trained to the last epoch would cost
    seconds: float  # mean wall time of one search (sampler, pruner and surrogate)
    regret_at_share: float  # mean regret once a search has trained least_epochs(budget)
    regret_at_share_se: float
    regret_by_task: dict[int, dict[int, float]]  # task -> checkpoint -> mean over seeds
    regret_curve: list[float]  # mean regret after each of the budget's trials
    epochs_curve: list[float]  # mean epochs trained after each of the budget's trials


def summarize(
    results: list[Search], refs: dict[int, Reference], checkpoints: Sequence[int]
) -> dict[str, MethodSummary]:
    by_method: dict[str, list[Search]] = {}
    for result in results:
        by_method.setdefault(result.method, []).append(result)
    budget = max(checkpoints)
    summaries = {}
    for method, runs in by_method.items():
        traces = [regret_trace(r, refs[r.task]) for r in runs]
        regrets = np.array([trace[:budget] for trace in traces])
        epochs = np.array([np.cumsum(r.epochs[:budget]) for r in runs])
        at_share = np.array(
            [
                regret_at_epochs(r, t, least_epochs(budget))
                for r, t in zip(runs, traces, strict=True)
            ]
        )
        summaries[method] = MethodSummary(
            method=method,
            runs=len(runs),
            regret={n: float(regrets[:, n - 1].mean()) for n in checkpoints},
            regret_se={n: standard_error(regrets[:, n - 1]) for n in checkpoints},
            epochs=float(epochs[:, -1].mean()),
            epoch_share=float(epochs[:, -1].mean() / (budget * EPOCHS)),
            seconds=statistics.mean(r.seconds for r in runs),
            regret_at_share=float(at_share.mean()),
            regret_at_share_se=standard_error(at_share),
            regret_by_task=by_task(runs, regrets, checkpoints),
            regret_curve=regrets.mean(axis=0).tolist(),
            epochs_curve=epochs.mean(axis=0).tolist(),
        )
    return summaries


def regret_at_epochs(result: Search, trace: np.ndarray, epochs: int) -> float:
    """The regret of a search once it had trained `epochs` epochs, its trials in order."""
    reached = int(np.searchsorted(np.cumsum(result.epochs), epochs))
    return float(trace[min(reached, len(trace) - 1)])


def by_task(
    runs: list[Search], regrets: np.ndarray, checkpoints: Sequence[int]
) -> dict[int, dict[int, float]]:
    """Mean regret over each task's seeds at each checkpoint."""
    tasks = sorted({r.task for r in runs})
    rows = {t: [i for i, r in enumerate(runs) if r.task == t] for t in tasks}
    return {t: {n: float(regrets[rows[t], n - 1].mean()) for n in checkpoints} for t in tasks}


def standard_error(values: np.ndarray) -> float:
    """Of the mean, treating every (task, seed) search as one sample."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


# --- output ----------------------------------------------------------------------------


def results_table(summaries: dict[str, MethodSummary], checkpoints: Sequence[int]) -> str:
    from report import markdown_table

    header = [
        "sampler",
        "pruner",
        *(f"regret @ {n}" for n in checkpoints),
        f"regret @ {EPOCH_SHARE:.0%} epochs",
        "epochs trained",
        "share of no pruning",
        "s per search",
    ]
    rows = []
    for method, s in summaries.items():
        sampler, pruner = method.split(":")
        cells = [f"{s.regret[n]:.3f} ± {s.regret_se[n]:.3f}" for n in checkpoints]
        cells.append(f"{s.regret_at_share:.3f} ± {s.regret_at_share_se:.3f}")
        share = f"{s.epoch_share:.0%}"
        rows.append([sampler, pruner, *cells, f"{s.epochs:.0f}", share, f"{s.seconds:.2f}"])
    return markdown_table(header, rows)


def goal_lines(summaries: dict[str, MethodSummary], checkpoints: Sequence[int]) -> list[str]:
    """The goals, each checked where the run holds the methods it needs."""
    n = GOAL_TRIALS if GOAL_TRIALS in checkpoints else min(checkpoints)
    lines = []
    if "random:none" in summaries:
        lines += sampler_goals(summaries, n)
    lines += pruner_goal(summaries, max(checkpoints))
    return [f"- {line}" for line in lines]


def sampler_goals(summaries: dict[str, MethodSummary], n: int) -> list[str]:
    """At n trials: tpe and bayes at most half of random's mean regret, the best method at
    most a quarter of it (judged only where the default sampler ran), and bayes and the
    default sampler no worse than random on any task."""
    random, default = summaries["random:none"], f"{DEFAULT_SAMPLER}:none"
    lines = []
    for method in ("tpe:none", "bayes:none"):
        if method in summaries:
            ratio = summaries[method].regret[n] / random.regret[n]
            lines.append(
                f"{method} @ {n}: {ratio:.2f}x random's regret (goal ≤ 0.5x): {met(ratio <= 0.5)}"
            )
    if default in summaries:  # without the best sampler, no verdict
        best = min(summaries.values(), key=lambda s: s.regret[n])
        ratio = best.regret[n] / random.regret[n]
        lines.append(
            f"best @ {n}, {best.method}: {ratio:.2f}x random's regret (goal ≤ 0.25x): "
            + met(ratio <= 0.25)
        )
    for method in dict.fromkeys(("bayes:none", default)):
        if method in summaries:
            lines.append(no_worse_on_each_task(summaries[method], random, n))
    return lines


def no_worse_on_each_task(method: MethodSummary, random: MethodSummary, n: int) -> str:
    by_task = method.regret_by_task
    worse = [t for t in by_task if by_task[t][n] > random.regret_by_task[t][n]]
    which = f" (worse on {', '.join(map(str, worse))})" if worse else ""
    return (
        f"{method.method} @ {n} no worse than random on {len(by_task) - len(worse)} of "
        f"{len(by_task)} tasks{which}: {met(not worse)}"
    )


def pruner_goal(summaries: dict[str, MethodSummary], budget: int) -> list[str]:
    """Each pruner of the default sampler, once it has trained EPOCH_SHARE of the budget's
    epochs, within one standard error of that sampler without pruning after the budget."""
    full = summaries.get(f"{DEFAULT_SAMPLER}:none")
    if full is None:
        return []
    lines = []
    for pruner in PRUNERS[1:]:
        pruned = summaries.get(f"{DEFAULT_SAMPLER}:{pruner}")
        if pruned is None:
            continue
        within = pruned.regret_at_share - full.regret[budget] <= full.regret_se[budget]
        lines.append(
            f"{pruned.method} at {EPOCH_SHARE:.0%} of the epochs: {pruned.regret_at_share:.3f} ± "
            f"{pruned.regret_at_share_se:.3f}, against {full.method} @ {budget}: "
            f"{full.regret[budget]:.3f} ± {full.regret_se[budget]:.3f} (goal: within one "
            f"standard error): {met(within)}"
        )
    return lines


def met(value: bool) -> str:
    return "met" if value else "**not met**"


def plot(summaries: dict[str, MethodSummary], path: Path) -> None:
    """Mean regret against trials and against epochs trained: colour the sampler, line
    style the pruner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(SAMPLERS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    styles = {"none": "-", "median": "--", "hyperband": ":"}
    fig, (by_trial, by_epoch) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, s in summaries.items():
        sampler, pruner = method.split(":")
        style = {"color": colours.get(sampler), "linestyle": styles.get(pruner, "-.")}
        trials = np.arange(1, len(s.regret_curve) + 1)
        by_trial.plot(trials, s.regret_curve, label=method, **style)
        by_epoch.plot(s.epochs_curve, s.regret_curve, label=method, **style)
    for ax, xlabel in ((by_trial, "trials"), (by_epoch, "epochs trained (all trials)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean regret (0: best of the random search, 1: its median)")
        ax.grid(alpha=0.3, which="both")
    by_trial.legend(fontsize=7, ncol=3)
    fig.suptitle("LCBench (YAHPO surrogate): mean regret over tasks and seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class Config:
    tasks: tuple[int, ...]
    methods: tuple[str, ...]
    seeds: int
    budget: int
    jobs: int
    final: bool = False  # the held-out tasks: not one the defaults were chosen on
    section_name: str | None = None  # a named run, in a section of its own (--section)

    @property
    def title(self) -> str:
        """The heading of the BENCHMARKS.md section this run writes."""
        if self.final:
            return FINAL_SECTION
        return f"{SECTION}: {self.section_name}" if self.section_name else SECTION

    @property
    def plot_name(self) -> str:
        if self.final:
            return "lcbench-final.png"
        if self.section_name:
            words = "".join(c if c.isalnum() else " " for c in self.section_name).split()
            slug = "-".join(words)
            return f"lcbench-{slug.lower()}.png"
        return "lcbench.png"

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(sorted({n for n in CHECKPOINTS if n < self.budget} | {self.budget}))


def section(
    config: Config, table: str, goals: str, timing: str, run_seconds: float, command: str
) -> str:
    """The Markdown section: what was run, on what, the table and how to read it."""
    from report import environment

    packages = ("optuna", "scikit-optimize", "onnxruntime", "torch")
    tasks = ", ".join(map(str, config.tasks))
    kind = "held out: no default was chosen on them" if config.final else "development"
    return f"""{config.title}

{environment(command, packages)}
- Run time: {run_seconds:.0f} s with {config.jobs} processes; {config.seeds} seeds x
  {len(config.tasks)} tasks x {len(config.methods)} methods x {config.budget} trials\
{reduced_line(config)}

YAHPO Gym's LCBench surrogate (`model.onnx`, YAHPO data 1.0.2) stands in for training: a
trial's val_accuracy at epochs 1..{EPOCHS} comes from one call, and is reported epoch by epoch
to the worker's pruning (`StudyPruning`), which stops the trial where the spec's pruner would.
Samplers and pruners are built from a parsed spec as a worker builds them, with their
defaults, in an in-memory study (see `bench/lcbench.py`). Tasks ({kind}): {tasks}.

The spec searches `learning_rate` 1e-4..1e-1 (log), `batch_size` 16..512 (log),
`weight_decay` 1e-5..1e-1 (log; LCBench draws it uniformly), `momentum` 0.1..0.99,
`n_layers` 1..5 (LCBench's num_layers), `hidden_units` 64..1024 (log; the funnel's first
width, max_units) and `dropout` 0..0.99 (the funnel's last dropout, max_dropout; the spec
refuses a dropout of 1). hpsearch's own MLP has n_layers equal layers and one dropout, so the
spec's keys stand for LCBench's funnel: a search space, not a model, is what is compared.
The random search of the reference draws from these same distributions.

Regret on a task = (best val_accuracy of {REFERENCE_SIZE:,} random configurations at epoch
{EPOCHS} - best complete trial of the search) / (that best - their median): 0 is as good as
that random search, 1 as good as a median configuration, below 0 better than it. "regret @ n"
is its mean over tasks and seeds after n trials, ± the standard error of that mean (each
search one sample). "regret @ {EPOCH_SHARE:.0%} epochs" is the regret once a search has
trained {EPOCH_SHARE:.0%} of the epochs of {config.budget} full trials (a pruned search runs
on past {config.budget} trials until it has): pruners are compared with no pruning at equal
cost there. "epochs trained" is the mean over searches of the epochs of the first
{config.budget} trials, complete and pruned; "share of no pruning" divides it by {EPOCHS}
epochs per trial. "s per search" is the wall time of one search: the sampler's asks, the
pruner and the surrogate.

{table}

{goals}

{timing}

![mean regret against trials and against epochs trained](bench/plots/{config.plot_name})
"""


def timing_lines(summaries: dict[str, MethodSummary], config: Config) -> str:
    """Where the time goes (each sampler's share); for the development table, also what
    the full table (20 seeds x the 12 development tasks x 100 trials) would take for the
    methods run here, extrapolated from their seconds per search, and which default methods
    were not run (a final check or a named section is not that table)."""
    by_sampler: dict[str, float] = {}
    for method, s in summaries.items():
        sampler = method.split(":")[0]
        by_sampler[sampler] = by_sampler.get(sampler, 0.0) + s.seconds * s.runs
    total = sum(by_sampler.values())
    ranked = sorted(by_sampler.items(), key=lambda kv: -kv[1])
    shares = ", ".join(f"{sampler} {seconds / total:.0%}" for sampler, seconds in ranked)
    lines = [f"- Share of the searches' time by sampler: {shares}."]
    if config.final or config.section_name:
        return "\n".join(lines)
    budget = len(next(iter(summaries.values())).regret_curve)
    per_trial = sum(s.seconds for s in summaries.values()) / budget
    full = per_trial * 100 * 20 * len(DEV_TASKS) / config.jobs
    scaled = "" if budget == 100 else f" (scaled from {budget} trials: too low for the GPs)"
    lines.append(
        f"- Extrapolated from these seconds per search{scaled}, the full table for these"
        f" {len(summaries)} methods (20 seeds x {len(DEV_TASKS)} tasks x 100 trials) would"
        f" take about {full / 60:.0f} minutes with {config.jobs} processes."
    )
    left_out = [f"{s}:{p}" for s in SAMPLERS for p in PRUNERS if f"{s}:{p}" not in summaries]
    if left_out:
        lines.append(f"- Not run here: {', '.join(left_out)}.")
    return "\n".join(lines)


def reduced_line(config: Config) -> str:
    """Says how the run is smaller than the full table, so that its numbers are read so."""
    default_methods = len(SAMPLERS) * len(PRUNERS)
    all_tasks = config.final or set(DEV_TASKS) <= set(config.tasks)
    smaller = [
        f"{config.seeds} seeds, not 20 (wider standard errors)" if config.seeds < 20 else "",
        "not every development task" if not all_tasks else "",
        f"{config.budget} trials, not 100" if config.budget < 100 else "",
        f"{len(config.methods)} of the {default_methods} default methods"
        if len(set(config.methods)) < default_methods and not config.final
        else "",
    ]
    smaller = [part for part in smaller if part]
    if not smaller:
        return ""
    return f"\n- A reduced run: {'; '.join(smaller)}."


def summary_json(
    config: Config, summaries: dict[str, MethodSummary], run_seconds: float
) -> dict[str, Any]:
    return {
        "benchmark": "lcbench",
        "tasks": list(config.tasks),
        "seeds": config.seeds,
        "budget": config.budget,
        "checkpoints": list(config.checkpoints),
        "reference": f"best and median of {REFERENCE_SIZE} random configurations at epoch 52",
        "run_seconds": round(run_seconds, 1),
        "epoch_share": EPOCH_SHARE,
        "goals": [line.removeprefix("- ") for line in goal_lines(summaries, config.checkpoints)],
        "methods": {
            method: {
                "runs": s.runs,
                "regret": {str(n): round(v, 4) for n, v in s.regret.items()},
                "regret_se": {str(n): round(v, 4) for n, v in s.regret_se.items()},
                "epochs": round(s.epochs, 1),
                "epoch_share": round(s.epoch_share, 4),
                "seconds_per_search": round(s.seconds, 3),
                "regret_at_epoch_share": round(s.regret_at_share, 4),
                "regret_at_epoch_share_se": round(s.regret_at_share_se, 4),
            }
            for method, s in summaries.items()
        },
    }


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=list(DEV_TASKS))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget", type=int, default=100, help="trials per search")
    default_methods = [f"{s}:{p}" for s in SAMPLERS for p in PRUNERS]
    parser.add_argument("--methods", nargs="+", default=default_methods, help="sampler:pruner")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--final", action="store_true", help="the final check: the tasks not developed on"
    )
    parser.add_argument(
        "--section",
        metavar="NAME",
        help="write to the section 'Search quality on LCBench: NAME' and a plot of its own",
    )
    parser.add_argument("--write", action="store_true", help="BENCHMARKS.md and the plot")
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if args.section is not None:
        if args.final or f"{SECTION}: {args.section}" == FINAL_SECTION:
            parser.error("--final writes the held-out tasks' section: pass --section without it")
        if "\n" in args.section or not any(c.isalnum() for c in args.section):
            parser.error("--section needs a one-line name with a letter or a digit")
    if args.quick:
        args.tasks, args.seeds, args.budget = QUICK["tasks"], QUICK["seeds"], QUICK["budget"]
        if args.methods == default_methods:
            args.methods = list(QUICK_METHODS)
    if args.final:
        args.tasks = held_out_tasks()
        if args.methods == default_methods:
            args.methods = list(FINAL_METHODS)
    for method in args.methods:
        make_spec(method, 0, 1)  # an unknown sampler or pruner fails here, not in the pool
    config = Config(
        tuple(args.tasks),
        tuple(args.methods),
        args.seeds,
        args.budget,
        args.jobs,
        args.final,
        args.section,
    )
    return config, args


def run(config: Config) -> tuple[dict[str, MethodSummary], float]:
    """The searches and their summaries, with the run's wall time."""
    refs = references(Surrogate(), config.tasks)
    start = time.perf_counter()
    results = run_all(config.tasks, config.methods, config.seeds, config.budget, config.jobs)
    run_seconds = time.perf_counter() - start
    summaries = summarize(results, refs, config.checkpoints)
    return {m: summaries[m] for m in config.methods}, run_seconds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summaries, run_seconds = run(config)
    table = results_table(summaries, config.checkpoints)
    print(table, *goal_lines(summaries, config.checkpoints), sep="\n", flush=True)
    if args.write:
        from report import write_section

        PLOTS.mkdir(exist_ok=True)
        plot(summaries, PLOTS / config.plot_name)
        arguments = shlex.join(argv if argv is not None else sys.argv[1:])
        command = f"{COMMAND} {arguments}".rstrip()
        timing = timing_lines(summaries, config)
        goals = (
            "\n".join(goal_lines(summaries, config.checkpoints)) or "- No goal's methods were run."
        )
        write_section(config.title, section(config, table, goals, timing, run_seconds, command))
    summary = summary_json(config, summaries, run_seconds)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
