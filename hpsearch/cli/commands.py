"""The `hpsearch` command line.

Each command imports what it needs when it runs: `--help` and the client commands (status,
leaderboard, ...) must answer at once, and only the commands that train load torch and
scikit-learn (a test keeps it so).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from hpsearch.cli import render
from hpsearch.errors import HpsearchError, Interrupted, SpecError

if TYPE_CHECKING:
    from hpsearch.client.backends import Backend
    from hpsearch.spec import StudySpec
    from hpsearch.storage import Store
    from hpsearch.training.modelfile import TrainedModel

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


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


PackOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Trials trained together as one fused network [default: on a GPU as many as "
        "its free memory holds, at most 64 and a quarter of the budget; 1 on a CPU]",
    ),
]


CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="Compile a pack's training step with torch.compile (fused kernels); pays on a "
        "GPU for long studies: the first pack of each shape and update rule waits for the "
        "compiler",
    ),
]


def user_errors(command: F) -> F:
    """Print an error a user can act on as one clear line (no traceback) and exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpecError as exc:
            errors.print(f"[red]error:[/] invalid {exc.what}")
            for path, reason in exc.errors:
                errors.print(f"  {path or '(spec)'}: {reason}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        except HpsearchError as exc:
            errors.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            message = _database_failure(exc)
            if message is None:
                raise
            errors.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _database_failure(exc: Exception) -> str | None:
    """The line to show for a database error, or None for any other error (a bug, whose
    traceback must be seen). Storage is imported only now: `--help` never needs it."""
    from hpsearch.storage import DATABASE_ERRORS, StorageError
    from hpsearch.storage.engine import driver_reason

    if isinstance(exc, StorageError):
        return str(exc)
    if isinstance(exc, DATABASE_ERRORS):
        return f"the database failed: {driver_reason(exc)}"
    return None


def _backend(api: str | None, db: str | None) -> Backend:
    from hpsearch.client.backends import connect

    return connect(api, db)


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
    pack: PackOption = None,
) -> None:
    """Run a study here until its budget is spent; running it again resumes it."""
    from hpsearch.logs import LogSettings
    from hpsearch.service import results
    from hpsearch.service.studies import RUNNABLE_STATES, effective_budget, submit_study
    from hpsearch.spec import load_spec
    from hpsearch.storage import Store, default_url

    LogSettings("warning").apply()  # the progress bar tells the rest
    spec = load_spec(spec_path)  # a spec that does not parse leaves no database behind
    store = Store.open(db or default_url())
    state = submit_study(store, spec)  # refused at once if it cannot run
    spec = state.spec
    if state.state not in RUNNABLE_STATES:
        _print_leaderboard(store, spec, top)
        hint = _HINTS.get(state.state, "").format(name=spec.name)
        console.print(f"study {spec.name} is {state.state}" + (f"; {hint}" if hint else ""))
        return
    from hpsearch.runtime.embedded import read_progress, run_workers  # training: torch from here on
    from hpsearch.runtime.worker import resolve_devices

    devices = resolve_devices(device, jobs)
    console.print(
        f"study [bold]{spec.name}[/] on {escape(str(store))}: {jobs} worker(s) on {devices[0]}"
    )
    total = effective_budget(spec, spec.budget.n_trials)  # a grid's size at most
    try:
        with render.progress_bar(spec.name, total, console) as update:
            codes = run_workers(state, store, jobs, devices, update, pack=pack)
    except Interrupted as stop:
        _print_leaderboard(store, spec, top)
        errors.print("interrupted: run the same command again to resume")
        raise typer.Exit(stop.exit_code) from None
    _print_leaderboard(store, spec, top)
    ended = results.study_summary(store, state.id)
    if ended.state == "failed":
        errors.print(f"[red]error:[/] study {spec.name} failed: {escape(ended.reason or '')}")
        raise typer.Exit(1)
    maximize = spec.objective.direction == "maximize"
    left = read_progress(store, state.optuna_study_id, maximize)
    if left.finished < spec.budget.n_trials and left.running:
        errors.print(
            f"{left.running} trial(s) still running elsewhere or left by a crashed process; "
            f"if their workers are dead, free them with: hpsearch resume {spec.name} "
            "--free-running"
        )
    if any(code != 0 for code in codes):
        errors.print(
            f"[red]error:[/] {sum(c != 0 for c in codes)} worker(s) stopped early: "
            f"{_last_failure(store, spec.name)}"
        )
        raise typer.Exit(1)


def _print_leaderboard(store: Store, spec: StudySpec, top: int) -> None:
    from hpsearch.service import results

    rows = results.leaderboard(store, spec.name, top)
    complete = results.study_summary(store, spec.name).progress.complete
    console.print(render.leaderboard(rows, spec, complete))


_HINTS = {
    "paused": "continue it with: hpsearch resume {name}",
    "completed": "raise its budget in the spec, or: hpsearch extend {name} --n-trials K",
    "failed": "see why with: hpsearch status {name}; run it again with: hpsearch resume {name}",
}


ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api", help="API URL [default: $HPSEARCH_API_URL]; token from $HPSEARCH_API_TOKEN"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the answer as JSON, for scripts")]
StudyArgument = Annotated[str, typer.Argument(metavar="STUDY", help="Study name or id")]


@app.command()
@user_errors
def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec (YAML or JSON)")],
    api: ApiOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue a study for `hpsearch worker` processes to run."""
    from hpsearch.spec import load_spec

    spec = load_spec(spec_path)  # checked before the database is opened (or created)
    answer = _backend(api, db).submit(spec)
    _show(answer, as_json, render.study_line)


@app.command()
@user_errors
def studies(
    api: ApiOption = None,
    db: DbOption = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Studies to list")] = 100,
    as_json: JsonOption = False,
) -> None:
    """List the studies with their progress, newest first."""
    _show(_backend(api, db).studies(limit, 0), as_json, render.studies_table)


@app.command()
@user_errors
def status(
    study: StudyArgument, api: ApiOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """A study's state, progress, best trial, and which hyperparameters mattered."""
    backend = _backend(api, db)
    answer = backend.study(study)
    if as_json:
        _print_json(answer)
        return
    try:
        mattered: Any = backend.importance(study)
    except HpsearchError as exc:  # e.g. a server from before the importance route
        mattered = f"not available: {exc}"
    console.print(render.status_view(answer, mattered))


@app.command()
@user_errors
def importance(
    study: StudyArgument, api: ApiOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Which hyperparameters mattered: each one's share of the importance.

    Optuna's PED-ANOVA over the complete trials (at least 10): how differently each
    hyperparameter's values are spread among the best trials than among all of them.
    """
    _show(_backend(api, db).importance(study), as_json, render.importance_view)


@app.command(name="leaderboard")
@user_errors
def leaderboard_command(
    study: StudyArgument,
    api: ApiOption = None,
    db: DbOption = None,
    top: Annotated[int, typer.Option(min=1, max=1000, help="Rows")] = 10,
    as_json: JsonOption = False,
) -> None:
    """The best complete trials of a study, best first."""
    backend = _backend(api, db)
    rows = backend.leaderboard(study, top)
    if as_json:
        _print_json(rows)
        return
    detail = backend.study(study)
    console.print(render.leaderboard(rows, detail.spec, detail.progress.complete))


@app.command()
@user_errors
def trial(
    study: StudyArgument,
    number: Annotated[int, typer.Argument(metavar="N", min=0, help="Trial number")],
    api: ApiOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One trial: params, metrics and its learning curve."""
    _show(_backend(api, db).trial(study, number), as_json, render.trial_view)


@app.command()
@user_errors
def pause(study: StudyArgument, api: ApiOption = None, db: DbOption = None) -> None:
    """Stop starting new trials of a study (running ones finish)."""
    console.print(render.study_line(_backend(api, db).change(study, "pause")))


@app.command()
@user_errors
def resume(
    study: StudyArgument,
    api: ApiOption = None,
    db: DbOption = None,
    free_running: Annotated[
        bool,
        typer.Option(
            "--free-running",
            help="Their workers are dead: free the running trials unless a worker beats "
            "within two heartbeats",
        ),
    ] = False,
) -> None:
    """Set a study running again and free the trials of crashed workers at once.

    A trial whose worker is certainly dead (a process of this machine that exited) or
    silent for two heartbeats is retried from its checkpoint by workers or `hpsearch run`,
    without waiting for the grace period.
    """
    answer = _backend(api, db).resume(study, free_running=free_running)
    console.print(render.study_line(answer))
    console.print(f"{answer.freed_trials} lost trial(s) freed for retry from their checkpoints")
    for line in render.still_running(answer, free_running):
        console.print(line)


@app.command()
@user_errors
def cancel(study: StudyArgument, api: ApiOption = None, db: DbOption = None) -> None:
    """Stop a study for good: no new trials; its results stay."""
    console.print(render.study_line(_backend(api, db).change(study, "cancel")))


@app.command()
@user_errors
def extend(
    study: StudyArgument,
    n_trials: Annotated[int, typer.Option("--n-trials", min=1, help="Trials to add")],
    api: ApiOption = None,
    db: DbOption = None,
) -> None:
    """Add trials to a study's budget; a completed study runs again."""
    console.print(render.study_line(_backend(api, db).change(study, "extend", n_trials)))


@app.command()
@user_errors
def enqueue(
    study: StudyArgument,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            metavar="NAME=VALUE",
            help="One param of one configuration (repeatable); VALUE is read as JSON "
            "(0.01, 64, true), else as text (adam)",
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="A YAML or JSON file holding a list of configurations"),
    ] = None,
    api: ApiOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Enqueue configurations to train before the sampler's own points.

    They count in the budget, which stays as it is. A configuration may leave searched
    params out: the sampler draws those.
    """
    configs = _configs(params or [], file)
    try:
        answer = _backend(api, db).enqueue(study, configs)
    except SpecError as exc:
        raise SpecError(exc.errors, what="configuration") from None
    if as_json:
        _print_json(answer)
        return
    numbers = ", ".join(str(t.number) for t in answer)
    console.print(
        f"study {escape(study)}: {len(answer)} configuration(s) enqueued as trial(s) {numbers}, "
        "to train before the sampler's own"
    )


def _configs(params: list[str], file: Path | None) -> list[Any]:
    """The configurations of `enqueue`: one made of the --param options, or the list in
    --file."""
    if bool(params) == (file is not None):
        raise HpsearchError("give --param NAME=VALUE (repeatable) or --file, one of the two")
    if file is None:
        config: dict[str, Any] = {}
        for param in params:
            name, equals, text = param.partition("=")
            if not equals or not name:
                raise HpsearchError(f"--param {param!r}: write it as NAME=VALUE")
            config[name.strip()] = _value(text.strip())
        return [config]
    import json

    import yaml

    try:
        text = file.read_text()
        configs = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise HpsearchError(f"cannot read {file}: {exc.strerror}") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise HpsearchError(f"{file} cannot be parsed: {exc}") from None
    if not isinstance(configs, list):
        raise HpsearchError(
            f"{file} must hold a list of configurations (mappings of param names to values)"
        )
    return configs


def _value(text: str) -> Any:
    """A --param value: JSON where it parses (numbers, true, false), else the text."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


@app.command()
@user_errors
def delete(study: StudyArgument, api: ApiOption = None, db: DbOption = None) -> None:
    """Delete a paused, cancelled, completed or failed study with all its trials."""
    _backend(api, db).delete(study)
    console.print(f"study {escape(study)} deleted")


TrialOption = Annotated[
    int | None,
    typer.Option(
        "--trial", min=0, help="Trial number [default: the best trial whose model is kept]"
    ),
]


@app.command()
@user_errors
def predict(
    study: StudyArgument,
    data_path: Annotated[
        Path,
        typer.Argument(
            metavar="DATA",
            help="Rows to predict on (CSV, Parquet or NPZ) with the training table's columns",
        ),
    ],
    trial: TrialOption = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the predictions to this CSV [default: stdout]"),
    ] = None,
    api: ApiOption = None,
    db: DbOption = None,
) -> None:
    """Predict with a trial's kept model: one CSV row per row of DATA.

    Classification: `prediction` (the label) and `proba_<label>` per class; multilabel:
    0/1 per label column and `proba_<label>`; regression: `prediction`.
    """
    from hpsearch.data.tables import read_rows

    rows = read_rows(data_path)  # a bad file fails before anything is downloaded
    model = _kept_model(_backend(api, db), study, trial)
    table = model.prediction_table(rows)
    if output is None:
        typer.echo(table.to_csv(index=False), nl=False)
        return
    table.to_csv(output, index=False)
    console.print(
        f"{len(table)} predictions of trial {model.trial} of {escape(model.study)} written to "
        f"{escape(str(output))}"
    )


@app.command()
@user_errors
def export(
    study: StudyArgument,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The TorchScript file; its JSON goes beside it (.json)"
        ),
    ],
    trial: TrialOption = None,
    api: ApiOption = None,
    db: DbOption = None,
) -> None:
    """Export a trial's kept model to serve with torch alone (`torch.jit.load`).

    The module takes raw rows (categorical values as their index in the JSON's
    `categories`) and returns probabilities, or values for regression.
    """
    if output.suffix.lower() == ".json":
        raise HpsearchError(f"{output} would be overwritten by its own JSON: name it *.pt")
    model = _kept_model(_backend(api, db), study, trial)
    scripted, described = model.export(output)
    console.print(
        f"trial {model.trial} of {escape(model.study)}: {escape(str(scripted))} (TorchScript) "
        f"and {escape(str(described))}"
    )


def _kept_model(backend: Backend, study: str, trial: int | None) -> TrainedModel:
    """The model of trial `trial`, or of the best trial whose model is kept."""
    from hpsearch import load_model  # torch, from here on
    from hpsearch.client import kept_model

    return load_model(kept_model(backend, study, trial))


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
    pack: PackOption = None,
    compile_step: CompileOption = False,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for training [default: one per core; with several workers on "
            "one host, give each cores / workers]",
        ),
    ] = None,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Log this level and above to stderr")
    ] = LogLevel.info,
    log_format: Annotated[
        LogFormat, typer.Option(case_sensitive=False, help="text, or json for log collectors")
    ] = LogFormat.text,
) -> None:
    """Claim and train trials of the runnable studies in the database until stopped.

    SIGTERM or Ctrl-C checkpoints the running trial, hands it back, and exits 0. The log
    (stderr) tells claims, trial ends, pruning, hand-backs, retries and database waits.
    """
    from hpsearch.logs import LogSettings
    from hpsearch.runtime.worker import WorkerOptions, resolve_devices, run_worker_processes
    from hpsearch.storage import Store, default_url

    logs = LogSettings(log_level.value, log_format.value)
    logs.apply()
    devices = resolve_devices(device)
    options = WorkerOptions(
        Store(db or default_url()),  # each worker brings its schema to head as it starts
        studies=tuple(study or ()),
        max_trials=max_trials,
        idle_exit_s=idle_exit,
        pack=pack,
        compiled=compile_step,
        threads=threads,
        logs=logs,
    )
    raise typer.Exit(run_worker_processes(options, devices))


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port")] = 8000,
    db: DbOption = None,
) -> None:
    """Run the REST API, the dashboard (/dashboard) and /metrics.

    With no API token configured the server is open, so it listens on 127.0.0.1 only.
    """
    import uvicorn

    from hpsearch.api import (  # the API sits above the engine; load it on demand
        Settings,
        create_app,
    )
    from hpsearch.api.auth import configured_hashes
    from hpsearch.logs import quiet_optuna
    from hpsearch.storage import safe_url

    quiet_optuna()
    settings = Settings.from_env(db)
    # Optuna's tables and hpsearch's, before any request; an unreachable database is one
    # line now, not one per request.
    settings.store.migrate()
    if not configured_hashes(settings)[1] and host not in LOOPBACK:
        errors.print(
            "[yellow]no API token configured:[/] listening on 127.0.0.1 only; create one with "
            "`hpsearch token create NAME` or set HPSEARCH_API_TOKENS"
        )
        host = "127.0.0.1"
    console.print(
        f"hpsearch API on http://{host}:{port} (database {escape(safe_url(settings.database_url))})"
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
@user_errors
def migrate(db: DbOption = None) -> None:
    """Create or upgrade the database's tables (Optuna's and hpsearch's); safe to repeat."""
    from hpsearch.storage import default_url, safe_url, upgrade
    from hpsearch.storage.engine import upgrade_optuna

    url = db or default_url()
    upgrade_optuna(url)  # first: `upgrade` refuses Optuna's tables of an older Optuna
    upgrade(url)
    console.print(f"database {escape(safe_url(url))} is up to date")


token_app = typer.Typer(help="API tokens: create (shown once), list, revoke.", no_args_is_help=True)
app.add_typer(token_app, name="token")
TokenName = Annotated[str, typer.Argument(metavar="NAME", help="Who or what uses the token")]


@token_app.command("create")
@user_errors
def token_create(name: TokenName, db: DbOption = None) -> None:
    """Create a token; it is printed once and stored only as a hash."""
    from hpsearch.service.tokens import create_token
    from hpsearch.storage import Store, default_url

    view, token = create_token(Store.open(db or default_url()), name)
    errors.print(f"token {escape(view.name)} created; it is shown only this once:")
    typer.echo(token)


@token_app.command("list")
@user_errors
def token_list(db: DbOption = None) -> None:
    """The tokens, with when each was last used and whether it was revoked."""
    from hpsearch.service.tokens import list_tokens
    from hpsearch.storage import Store, default_url

    console.print(render.tokens_table(list_tokens(Store.open(db or default_url()))))


@token_app.command("revoke")
@user_errors
def token_revoke(name: TokenName, db: DbOption = None) -> None:
    """Revoke a token at once: the next request with it gets a 401."""
    from hpsearch.service.tokens import revoke_token
    from hpsearch.storage import Store, default_url

    view = revoke_token(Store.open(db or default_url()), name)
    console.print(f"token {escape(view.name)} revoked")


def _show(answer: Any, as_json: bool, render: Callable[[Any], Any]) -> None:
    """The answer as JSON for scripts, else rendered for people."""
    if as_json:
        _print_json(answer)
    else:
        console.print(render(answer))


def _print_json(answer: Any) -> None:
    from hpsearch.client.backends import dump_json

    typer.echo(dump_json(answer))


def _last_failure(store: Store, name: str) -> str:
    import optuna

    study = optuna.load_study(study_name=name, storage=store.optuna())
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    return (
        failed[-1].user_attrs.get("error", "unknown error") if failed else "see the messages above"
    )
