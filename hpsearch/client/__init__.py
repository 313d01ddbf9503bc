"""hpsearch from Python: submit a study, follow it, read its results, take its best model.

    import hpsearch

    client = hpsearch.Client("http://hpsearch.example:8000", token="...")  # the REST API
    client = hpsearch.Client("sqlite:///hpsearch.db")  # or the database itself (embedded)
    study = client.submit("examples/digits.yaml")  # a YAML path, a dict or a StudySpec
    study.wait(progress=True)
    study.leaderboard_frame()

Both ways have the same methods and answers (`hpsearch.service.views`), and raise the same
typed errors (`hpsearch.errors`): `SpecError` with each (field, reason), `NotFound`,
`Conflict`, and `ApiError` when the server cannot be reached or refuses the token.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpsearch.client.backends import ApiBackend, Backend, DatabaseBackend, connect
from hpsearch.errors import NotFound
from hpsearch.service.views import (
    LeaderboardEntry,
    ParamImportances,
    StudyDetail,
    StudySummary,
    TrialDetail,
    TrialSummary,
)
from hpsearch.spec import StudySpec, load_spec, parse_spec

if TYPE_CHECKING:
    import pandas

    from hpsearch.training.modelfile import TrainedModel

SpecLike = StudySpec | Mapping[str, Any] | str | os.PathLike[str]
# A study in one of these states starts no new trial until someone acts: waiting ends there.
SETTLED_STATES = ("completed", "cancelled", "failed", "paused")
PAGE = 1000  # the API's largest page
# Models are kept for a study's best 5 trials; a tie at the fifth place can leave a model out,
# so the best kept one is looked for a little further down the leaderboard.
LEADERS_WITH_MODELS = 10


class Client:
    """A handle on an hpsearch service: the REST API at an http(s) URL, or a database URL
    (SQLite or PostgreSQL) worked on in this process. With no URL: $HPSEARCH_API_URL, else
    the default database, as the CLI does. `token` defaults to $HPSEARCH_API_TOKEN."""

    def __init__(self, url: str | None = None, *, token: str | None = None) -> None:
        self.backend: Backend = _backend(url, token)

    def submit(self, spec: SpecLike) -> Study:
        """Create the study (or return it, if one of that name has the same spec)."""
        return Study(self, self.backend.submit(_spec(spec)).name)

    def study(self, name: str) -> Study:
        """The study of that name; NotFound if there is none."""
        return Study(self, self.backend.study(name).name)

    def studies(self) -> list[StudySummary]:
        """Every study, newest first."""
        return list(_all_pages(lambda limit, offset: self.backend.studies(limit, offset)))


class Study:
    """One study of a `Client`; every method asks the service afresh."""

    def __init__(self, client: Client, name: str) -> None:
        self.client, self.name = client, name

    def __repr__(self) -> str:
        return f"Study({self.name!r})"

    @property
    def _backend(self) -> Backend:
        return self.client.backend

    def status(self) -> StudyDetail:
        """State, progress against the budget, best trial, spec and advice."""
        return self._backend.study(self.name)

    def wait(
        self, timeout_s: float | None = None, *, poll_s: float = 2.0, progress: bool = False
    ) -> StudyDetail:
        """Block until the study is completed, cancelled, failed or paused, and return its
        status. `progress` shows a bar of finished trials against the budget. TimeoutError
        after `timeout_s` seconds."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with _progress_bar(self.name, progress) as show:
            while True:
                detail = self.status()
                show(detail)
                if detail.state in SETTLED_STATES:
                    return detail
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"study {self.name} is still {detail.state} after {timeout_s:g} s "
                        f"({detail.progress.finished} of {detail.progress.budget} trials)"
                    )
                time.sleep(poll_s)

    def leaderboard(self, top: int = 10) -> list[LeaderboardEntry]:
        """The best complete trials, best first."""
        return self._backend.leaderboard(self.name, top)

    def leaderboard_frame(self, top: int = 10) -> pandas.DataFrame:
        """The leaderboard as a DataFrame indexed by rank: number, value, one column per
        param and per metric, epochs, seconds and diagnosis."""
        return _frame([_flat(entry) for entry in self.leaderboard(top)], "rank")

    def trials(self, state: str | None = None) -> list[TrialSummary]:
        """Every trial by number, or those of one state ("complete", "pruned", ...)."""
        return list(
            _all_pages(lambda limit, offset: self._backend.trials(self.name, state, limit, offset))
        )

    def trial(self, number: int) -> TrialDetail:
        """One trial with its learning curve."""
        return self._backend.trial(self.name, number)

    def importance(self) -> ParamImportances:
        """Which hyperparameters mattered, by Optuna's PED-ANOVA over the complete trials;
        with too few trials, `importances` is empty and `reason` says why."""
        return self._backend.importance(self.name)

    def curves(self, numbers: Iterable[int] | None = None) -> pandas.DataFrame:
        """Learning curves, one row per trial and epoch (value, losses, learning rate), of the
        trials `numbers`, else of every complete or pruned trial. Over REST it asks once per
        trial."""
        if numbers is None:
            numbers = [t.number for t in self.trials() if t.state in ("complete", "pruned")]
        rows = [
            {"trial": number, **point.model_dump(exclude={"grad_norms"})}
            for number in numbers
            for point in self.trial(number).curve
        ]
        return _frame(rows, None, columns=["trial", "epoch", "value", "train_loss", "val_loss"])

    def enqueue(self, *configs: Mapping[str, Any]) -> list[TrialSummary]:
        """Configurations to train before the sampler's own points, within the budget; a
        configuration may name some params only (the sampler draws the others)."""
        return self._backend.enqueue(self.name, [dict(config) for config in configs])

    def best_model(self) -> TrainedModel:
        """The model of the best trial whose model is kept (a study keeps its best 5): it
        predicts on raw rows (`predict`, `predict_proba`) and holds the torch `module`."""
        return _loaded(kept_model(self._backend, self.name))

    def model(self, number: int) -> TrainedModel:
        """The kept model of trial `number`; NotFound if its model is not kept."""
        return _loaded(self._backend.model(self.name, number))

    def pause(self) -> StudySummary:
        return self._backend.change(self.name, "pause")

    def resume(self) -> StudySummary:
        """Let a paused or cancelled study run again; lost trials are retried."""
        return self._backend.resume(self.name)

    def cancel(self) -> StudySummary:
        return self._backend.change(self.name, "cancel")

    def extend(self, n_trials: int) -> StudySummary:
        """Raise the budget by `n_trials`; a completed study runs again."""
        return self._backend.change(self.name, "extend", n_trials)

    def delete(self) -> None:
        """Delete the study with all its trials (not while it is queued or running)."""
        self._backend.delete(self.name)


def kept_model(backend: Backend, study: str, trial: int | None = None) -> bytes:
    """The model file of trial `trial`, or of the best trial whose model is kept."""
    if trial is not None:
        return backend.model(study, trial)
    for entry in backend.leaderboard(study, LEADERS_WITH_MODELS):
        try:
            return backend.model(study, entry.number)
        except NotFound:
            continue  # not kept: tied at the fifth place, say
    raise NotFound(
        f"no trial of study {study!r} has a kept model yet: models are kept when trials complete"
    )


def _loaded(payload: bytes) -> TrainedModel:
    from hpsearch.training.modelfile import load_model  # torch, from here on

    return load_model(payload)


def _backend(url: str | None, token: str | None) -> Backend:
    if url is None:
        return connect(None, None)
    if url.startswith(("http://", "https://")):
        return ApiBackend(url, token or os.environ.get("HPSEARCH_API_TOKEN"))
    return DatabaseBackend(url)


def _spec(spec: SpecLike) -> StudySpec:
    if isinstance(spec, StudySpec):
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(dict(spec))
    return load_spec(Path(spec))


def _all_pages(page: Any) -> Iterator[Any]:
    offset = 0
    while True:
        answer = page(PAGE, offset)
        yield from answer.items
        offset += len(answer.items)
        if not answer.items or offset >= answer.total:
            return


def _flat(entry: LeaderboardEntry) -> dict[str, Any]:
    """A leaderboard row with params and metrics as columns of their own."""
    row = entry.model_dump(exclude={"params", "metrics", "state"})
    return {**row, **entry.params, **entry.metrics}


def _frame(rows: list[dict[str, Any]], index: str | None, columns: list[str] | None = None) -> Any:
    import pandas  # a dependency of hpsearch; imported here, only where a frame is asked for

    frame = pandas.DataFrame(rows, columns=None if rows else columns)
    return frame.set_index(index) if index and rows else frame


@contextlib.contextmanager
def _progress_bar(name: str, enabled: bool) -> Iterator[Callable[[StudyDetail], None]]:
    """What `wait` shows of each status: nothing, or a Rich bar of finished trials."""
    if not enabled:
        yield lambda _: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(f"study {name}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("trials", total=None)

        def show(detail: StudyDetail) -> None:
            bar.update(task, completed=detail.progress.finished, total=detail.progress.budget)

        yield show


__all__ = ["Client", "Study"]
