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


def leaderboard(rows: list[LeaderboardEntry], spec: StudySpec) -> Table | str:
    return leaderboard_table(rows, spec) if rows else "no completed trials yet"


def leaderboard_table(rows: list[LeaderboardEntry], spec: StudySpec) -> Table:
    metric = spec.objective.metric
    param_names = list(spec.search_space.dimensions())
    test_metric = "test_" + metric.removeprefix("val_")
    table = Table(
        title=f"{spec.name}: best {len(rows)} by {metric} ({spec.objective.direction})",
        box=box.SIMPLE_HEAD,
    )
    headers = ["#", "trial", metric, test_metric, *param_names, "epochs", "seconds", "diagnosis"]
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


def studies_table(page: Page[StudySummary]) -> Table:
    table = Table(title=f"{page.total} studies", box=box.SIMPLE_HEAD)
    for header in (
        "id",
        "name",
        "state",
        "finished",
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


def status_view(study: StudyDetail) -> Group:
    p = study.progress
    lines = [
        study_line(study),
        f"progress: {p.finished}/{p.budget} finished ({p.complete} complete, {p.pruned} pruned), "
        f"{p.running} running, {p.waiting} waiting to resume, {p.failed} failed"
        + (f", {p.handed_back} handed back by stopping workers" if p.handed_back else "")
        + (f", {p.lost} lost with their workers" if p.lost else ""),
        f"objective: {study.metric} ({study.direction}); "
        f"sampler {study.sampler}, pruner {study.pruner}",
    ]
    if study.reason:
        lines.append(f"reason: {study.reason}")
    lines += [f"advice: {sentence}" for sentence in study.advice]
    best = study.best_trial
    if best is None:
        lines.append("no completed trial yet")
        return Group(*(escape(line) for line in lines))
    lines.append(f"best: trial {best.number}, {study.metric} = {fmt(best.value)}")
    table = Table("param", "value", box=box.SIMPLE_HEAD)
    for name, value in {**best.params, **best.metrics}.items():
        table.add_row(name, fmt(value))
    return Group(*(escape(line) for line in lines), table)


def trial_view(trial: TrialDetail) -> Group:
    head = (
        f"trial {trial.number}: {trial.state.replace('_', ' ')}, value {fmt(trial.value)}, "
        f"{trial.diagnosis or '-'}"
    )
    facts = Table("", "", box=None, show_header=False)
    for name, value in {**trial.params, **trial.metrics}.items():
        facts.add_row(name, fmt(value))
    for name in ("epochs", "seconds", "worker", "device", "resumed_from_epoch", "error"):
        if getattr(trial, name) is not None:
            facts.add_row(name, fmt(getattr(trial, name)))
    curve = Table(
        "epoch",
        "value",
        "train loss",
        "val loss",
        "lr",
        "grad norm per layer",
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
