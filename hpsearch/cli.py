"""The `hpsearch` command line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import optuna
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hpsearch.data import load_dataset
from hpsearch.embedded import StudyProgress, read_progress, run_workers
from hpsearch.errors import HpsearchError, SpecError
from hpsearch.service import (
    RUNNABLE_STATES,
    StudyState,
    change_state,
    resume_study,
    submit_study,
)
from hpsearch.spec import StudySpec, load_spec
from hpsearch.study import LeaderboardRow, leaderboard
from hpsearch.worker import WorkerOptions, resolve_devices, run_worker_processes
from storage import StorageError, default_url, optuna_storage, safe_url

app = typer.Typer(
    help="Hyperparameter search for BP networks (multi-layer perceptrons).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Tables wider than 80 columns stay whole when the output is a file or a pipe (CI logs).
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

F = TypeVar("F", bound=Callable[..., Any])
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", help="Database URL [default: $HPSEARCH_DATABASE_URL or sqlite:///hpsearch.db]"
    ),
]


def user_errors(command: F) -> F:
    """Print an error a user can act on as one clear line (no traceback) and exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpecError as exc:
            errors.print("[red]error:[/] invalid study spec")
            for path, reason in exc.errors:
                errors.print(f"  {path or '(spec)'}: {reason}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        except (HpsearchError, StorageError) as exc:
            errors.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main() -> None:
    """Describe a study in YAML, run it, read the leaderboard."""


@app.command()
@user_errors
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec (YAML or JSON)")],
    db: DbOption = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Local worker processes")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    top: Annotated[int, typer.Option(min=1, help="Rows of the leaderboard")] = 10,
) -> None:
    """Run a study here until its budget is spent; running it again resumes it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = db or default_url()
    spec = load_spec(spec_path)
    devices = resolve_devices(device, jobs)
    spec = spec.with_task(load_dataset(spec).task)  # fails early, naming the column or file
    state = submit_study(url, spec)
    study = optuna.load_study(study_name=spec.name, storage=optuna_storage(url))
    if state.state not in RUNNABLE_STATES:
        _print_leaderboard(study, spec, top)
        hint = _HINTS.get(state.state, "").format(name=spec.name)
        console.print(f"study {spec.name} is {state.state}" + (f"; {hint}" if hint else ""))
        return
    console.print(
        f"study [bold]{spec.name}[/] on {escape(safe_url(url))}: {jobs} worker(s) on {devices[0]}"
    )
    try:
        with progress_bar(spec) as update:
            codes = run_workers(state, url, jobs, devices, update)
    except KeyboardInterrupt:
        _print_leaderboard(study, spec, top)
        errors.print("interrupted: run the same command again to resume")
        raise typer.Exit(130) from None
    _print_leaderboard(study, spec, top)
    left = read_progress(study)
    if left.finished < spec.budget.n_trials and left.running:
        errors.print(
            f"{left.running} trial(s) still running elsewhere or left by a crashed process; "
            f"if nothing else runs this study, free them with: hpsearch resume {spec.name}"
        )
    if any(code != 0 for code in codes):
        errors.print(
            f"[red]error:[/] {sum(c != 0 for c in codes)} worker(s) stopped early: "
            f"{_last_failure(study)}"
        )
        raise typer.Exit(1)


_HINTS = {
    "paused": "continue it with: hpsearch resume {name}",
    "completed": "raise its budget in the spec, or: hpsearch extend {name} --n-trials K",
}


@app.command()
@user_errors
def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec (YAML or JSON)")],
    db: DbOption = None,
) -> None:
    """Queue a study in the database for `hpsearch worker` processes to run."""
    state = submit_study(db or default_url(), load_spec(spec_path))
    _report(state)


StudyArgument = Annotated[str, typer.Argument(metavar="STUDY", help="Study name or id")]


@app.command()
@user_errors
def pause(study: StudyArgument, db: DbOption = None) -> None:
    """Stop starting new trials of a study (running ones finish)."""
    _report(change_state(db or default_url(), study, "pause"))


@app.command()
@user_errors
def resume(study: StudyArgument, db: DbOption = None) -> None:
    """Set a study running again and free its stale trials at once.

    No waiting for the grace period: the trials of crashed workers are retried from their
    checkpoints by workers or `hpsearch run`.
    """
    state, freed = resume_study(db or default_url(), study)
    _report(state)
    console.print(f"{freed} stale trial(s) freed for retry")


@app.command()
@user_errors
def worker(
    db: DbOption = None,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda, cuda:N or all (one per GPU)")
    ] = "auto",
    study: Annotated[
        list[str] | None, typer.Option("--study", help="Serve only this study (repeatable)")
    ] = None,
    max_trials: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many trials")
    ] = None,
    idle_exit: Annotated[
        float | None, typer.Option(min=0, help="Stop after this many seconds with nothing to do")
    ] = None,
) -> None:
    """Claim and train trials of the runnable studies in the database until stopped.

    SIGTERM or Ctrl-C checkpoints the running trial, hands it back, and exits 0.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = db or default_url()
    devices = resolve_devices(device)
    options = WorkerOptions(
        url, studies=tuple(study or ()), max_trials=max_trials, idle_exit_s=idle_exit
    )
    raise typer.Exit(run_worker_processes(options, devices))


@app.command()
@user_errors
def cancel(study: StudyArgument, db: DbOption = None) -> None:
    """Stop a study for good: no new trials; its results stay."""
    _report(change_state(db or default_url(), study, "cancel"))


@app.command()
@user_errors
def extend(
    study: StudyArgument,
    n_trials: Annotated[int, typer.Option("--n-trials", min=1, help="Trials to add")],
    db: DbOption = None,
) -> None:
    """Add trials to a study's budget; a completed study runs again."""
    _report(change_state(db or default_url(), study, "extend", n_trials))


def _report(state: StudyState) -> None:
    console.print(f"study {state.name}: {state.state}, budget {state.n_trials} trials")


@contextmanager
def progress_bar(spec: StudySpec) -> Iterator[Callable[[StudyProgress], None]]:
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
        task = bar.add_task(spec.name, total=spec.budget.n_trials, running=0, best="-")

        def update(progress: StudyProgress) -> None:
            best = "-" if progress.best is None else f"{progress.best:.4g}"
            bar.update(task, completed=progress.finished, running=progress.running, best=best)

        yield update


def _print_leaderboard(study: optuna.Study, spec: StudySpec, top: int) -> None:
    rows = leaderboard(study, top)
    if not rows:
        console.print("no completed trials yet")
        return
    console.print(leaderboard_table(rows, spec))


def leaderboard_table(rows: list[LeaderboardRow], spec: StudySpec) -> Table:
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
            _fmt(row.metrics.get(test_metric)),
            *(_fmt(row.params.get(name)) for name in param_names),
            _fmt(row.epochs),
            _fmt(row.seconds),
            row.diagnosis or "",
        )
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _last_failure(study: optuna.Study) -> str:
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    return (
        failed[-1].user_attrs.get("error", "unknown error") if failed else "see the messages above"
    )


if __name__ == "__main__":
    app()
