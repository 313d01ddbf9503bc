"""What the command line shows people: Rich tables of studies, trials and leaderboards, and
the progress bar of `hpsearch run`. Each function builds something to print; the commands
print it, or print JSON instead (`--json`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # the views need pydantic; rendering is imported by `--help` too
    from hpsearch.runtime.embedded import StudyProgress
    from hpsearch.service.views import (
        LeaderboardEntry,
        Page,
        ParamImportances,
        ResumedStudy,
        StudyDetail,
        StudySummary,
        TokenView,
        TrialDetail,
    )
    from hpsearch.spec import StudySpec


@contextmanager
def progress_bar(
    name: str, total: int, console: Console
) -> Iterator[Callable[[StudyProgress], None]]:
    """A Rich progress bar (finished / budget, running, best so far) and its update function."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("running {task.fields[running]}"),
        TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(name, total=total, running=0, best="-")

        def update(progress: StudyProgress) -> None:
            best = "-" if progress.best is None else f"{progress.best:.4g}"
            bar.update(task, completed=progress.finished, running=progress.running, best=best)

        yield update


def leaderboard(rows: list[LeaderboardEntry], spec: StudySpec, complete: int) -> Group | str:
    """The `rows` ranked out of the study's `complete` trials, and what the columns mean."""
    if not rows:
        return "no completed trials yet"
    test_metric = "test_" + spec.objective.metric.removeprefix("val_")
    legend = (
        f"trial: its number (details: hpsearch trial {spec.name} N); {test_metric}: on the "
        "held-out test rows, with the weights of its best epoch; epochs: epochs trained; "
        "seconds: training time; diagnosis: how the training went"
    )
    return Group(leaderboard_table(rows, spec, complete), escape(legend))


def leaderboard_table(rows: list[LeaderboardEntry], spec: StudySpec, complete: int) -> Table:
    metric = spec.objective.metric
    param_names = list(spec.search_space.dimensions())
    test_metric = "test_" + metric.removeprefix("val_")
    table = Table(
        title=f"{spec.name}: top {len(rows)} of {complete} complete trials by {metric} "
        f"({better(spec.objective.direction)})",
        box=box.SIMPLE_HEAD,
    )
    headers = ["rank", "trial", metric, test_metric, *param_names, "epochs", "seconds"]
    headers.append("diagnosis")
    for header in headers:
        table.add_column(header, justify="left" if header == "diagnosis" else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            str(row.rank),
            str(row.number),
            f"{row.value:.4f}",
            fmt(row.metrics.get(test_metric)),
            *(fmt(row.params.get(name)) for name in param_names),
            fmt(row.epochs),
            fmt(row.seconds),
            row.diagnosis or "",
        )
    return table


def tokens_table(tokens: list[TokenView]) -> Table:
    table = Table("id", "name", "created", "last used", "revoked", box=box.SIMPLE_HEAD)
    for view in tokens:
        table.add_row(
            str(view.id),
            view.name,
            when(view.created_at),
            when(view.last_used_at),
            when(view.revoked_at),
        )
    return table


STUDY_COLUMNS = (
    "finished/budget: complete and pruned trials out of the budget; pruned: stopped early by "
    "the pruner; failed: the training raised an error; handed back: checkpointed by a "
    "stopping worker, to be resumed; lost: its worker died, retried; best: the objective's "
    "best value so far"
)


def studies_table(page: Page[StudySummary]) -> Group:
    return Group(_studies_table(page), escape(STUDY_COLUMNS))


def _studies_table(page: Page[StudySummary]) -> Table:
    table = Table(title=f"{page.total} studies", box=box.SIMPLE_HEAD)
    for header in (
        "id",
        "name",
        "state",
        "finished/budget",
        "running",
        "pruned",
        "failed",
        "handed back",
        "lost",
        "best",
        "metric",
        "sampler",
    ):
        table.add_column(
            header, justify="left" if header in ("name", "state", "metric", "sampler") else "right"
        )
    for study in page.items:
        p = study.progress
        table.add_row(
            str(study.id),
            study.name,
            study.state,
            f"{p.finished}/{p.budget}",
            str(p.running),
            str(p.pruned),
            str(p.failed),
            str(p.handed_back),
            str(p.lost),
            fmt(study.best_value),
            study.metric,
            study.sampler,
        )
    return table


def status_view(study: StudyDetail, mattered: ParamImportances | str | None = None) -> Group:
    """The study's state and progress, what its sampler and pruner do, its advice, which
    hyperparameters mattered (`mattered`, or why that is not known), and its best trial."""
    p = study.progress
    lines = [
        study_line(study),
        f"progress: {p.finished} of {p.budget} trials finished ({p.complete} complete, "
        f"{p.pruned} pruned: stopped early), {p.running} running, {p.waiting} waiting to "
        f"resume, {p.failed} failed"
        + (f", {p.handed_back} handed back by stopping workers" if p.handed_back else "")
        + (f", {p.lost} lost with their workers" if p.lost else ""),
        f"objective: {study.metric}, {better(study.direction)}; "
        f"sampler {study.sampler} (chooses each trial's hyperparameters), "
        f"pruner {study.pruner} (stops unpromising trials early)",
    ]
    if study.reason:
        lines.append(f"reason: {study.reason}")
    lines += [f"advice: {sentence}" for sentence in study.advice]
    if mattered is not None:
        lines.append(mattered if isinstance(mattered, str) else importance_line(mattered))
    best = study.best_trial
    if best is None:
        lines.append("no completed trial yet")
        return Group(*(escape(line) for line in lines))
    lines.append(f"best: trial {best.number}, {study.metric} = {fmt(best.value)}")
    params = Table("hyperparameter", "value", box=box.SIMPLE_HEAD)
    for name, value in best.params.items():
        params.add_row(name, fmt(value))
    metrics = Table("metric of its best epoch's weights", "value", box=box.SIMPLE_HEAD)
    for name, value in best.metrics.items():
        metrics.add_row(name, fmt(value))
    return Group(*(escape(line) for line in lines), params, metrics)


def importance_line(answer: ParamImportances) -> str:
    """One line of `hpsearch status`: the hyperparameters by their share of the importance."""
    if answer.reason is not None:
        return f"mattered most: not known yet: {answer.reason}"
    shares = ", ".join(f"{entry.param} {percent(entry.importance)}" for entry in answer.importances)
    return (
        f"mattered most: {shares} ({answer.evaluator} over {answer.trials_used} complete "
        f"trials; see hpsearch importance {answer.study})"
    )


def importance_view(answer: ParamImportances) -> Group | str:
    """`hpsearch importance`: each hyperparameter's share, most important first."""
    constant = (
        [f"constant (a single possible value, so it cannot matter): {', '.join(answer.constant)}"]
        if answer.constant
        else []
    )
    if answer.reason is not None:
        return "\n".join(escape(line) for line in [f"{answer.study}: {answer.reason}", *constant])
    sampled = (
        f"{answer.trials_used} of its {answer.trials_complete} (evenly spaced)"
        if answer.trials_used < answer.trials_complete
        else f"its {answer.trials_used}"
    )
    heading = f"{answer.study}: which hyperparameters mattered for {answer.metric}"
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("rank", justify="right")
    table.add_column("hyperparameter")
    table.add_column("share", justify="right")
    table.add_column("")
    for rank, entry in enumerate(answer.importances, start=1):
        bar = "█" * round(entry.importance * 20)
        table.add_row(str(rank), entry.param, percent(entry.importance), bar)
    legend = (
        f"share: how differently each hyperparameter's values are spread among the best "
        f"{answer.top_quantile or 0:.0%} of {sampled} complete trials than among all of them "
        f"({answer.evaluator}, Optuna's importance evaluator); the shares add up to 100%"
    )
    return Group(escape(heading), table, escape(legend), *(escape(line) for line in constant))


def percent(share: float) -> str:
    """A share as a whole percentage; one that rounds to 0 but is not 0 as "<1%"."""
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


def trial_view(trial: TrialDetail) -> Group:
    head = (
        f"trial {trial.number}: {trial.state.replace('_', ' ')}, objective {fmt(trial.value)}, "
        f"diagnosis {trial.diagnosis or '-'}"
    )
    facts = Table("", "", box=None, show_header=False)
    for name, value in {**trial.params, **trial.metrics}.items():
        facts.add_row(name, fmt(value))
    for name in ("epochs", "seconds", "worker", "device", "resumed_from_epoch", "error"):
        if getattr(trial, name) is not None:
            facts.add_row(name, fmt(getattr(trial, name)))
    curve = Table(
        "epoch",
        "objective",
        "train loss",
        "val loss",
        "learning rate",
        "gradient norm per layer (first layer first)",
        title="learning curve",
        box=box.SIMPLE_HEAD,
    )
    for point in trial.curve:
        curve.add_row(
            str(point.epoch),
            fmt(point.value),
            fmt(point.train_loss),
            fmt(point.val_loss),
            fmt(point.learning_rate),
            " ".join(f"{norm:.2g}" for norm in point.grad_norms or []),
        )
    return Group(escape(head), facts, curve)


def study_line(study: StudySummary) -> str:
    p = study.progress
    best = "" if study.best_value is None else f", best {study.metric} {fmt(study.best_value)}"
    return (
        f"study {study.name} (id {study.id}): {study.state}, {p.finished}/{p.budget} trials{best}"
    )


def better(direction: str) -> str:
    """The objective's direction in plain words."""
    return "higher is better" if direction == "maximize" else "lower is better"


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def still_running(answer: ResumedStudy, free_running: bool) -> list[str]:
    """What `resume` left running, when it counts as lost, and how to free it now."""
    running = answer.running_trials
    if not running:
        return []
    numbers = ", ".join(map(str, running))
    if free_running:
        return [f"{len(running)} trial(s) left running ({numbers}): their workers are alive"]
    return [
        f"{len(running)} trial(s) left running ({numbers}): their workers beat recently. If "
        f"they are dead, the trials count as lost within {answer.lost_after_s or 0:.0f} s and "
        "any worker resumes them then.",
        f"If you know those workers are dead: hpsearch resume {answer.name} --free-running",
    ]
