"""The two ways to a study: straight to the database (`--db`, the embedded mode) or through
the REST API (`--api`). Both answer with the same views, so `hpsearch.Client` and the CLI,
which use them, behave the same either way; `ApiBackend` is the one HTTP client in the code.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, TypeAdapter

from hpsearch.errors import Conflict, HpsearchError, NotFound, SpecError
from hpsearch.service import results
from hpsearch.service.importance import param_importance
from hpsearch.service.studies import (
    change_state,
    delete_study,
    enqueue,
    resume_study,
    submit_study,
)
from hpsearch.service.views import (
    LeaderboardEntry,
    Page,
    ParamImportances,
    ResumedStudy,
    StudyDetail,
    StudySummary,
    TrialDetail,
    TrialSummary,
)
from hpsearch.spec import StudySpec
from hpsearch.storage import Store, default_url

if TYPE_CHECKING:
    import httpx

API_TIMEOUT_S = 30.0


class ApiError(HpsearchError):
    """The API could not be reached, refused the token, or answered with an error."""


class Backend(Protocol):
    """What the client commands need; `DatabaseBackend` and `ApiBackend` implement it."""

    def submit(self, spec: StudySpec) -> StudyDetail: ...
    def studies(self, limit: int, offset: int) -> Page[StudySummary]: ...
    def study(self, study: str) -> StudyDetail: ...
    def leaderboard(self, study: str, top: int) -> list[LeaderboardEntry]: ...
    def trials(
        self, study: str, state: str | None, limit: int, offset: int
    ) -> Page[TrialSummary]: ...
    def trial(self, study: str, number: int) -> TrialDetail: ...
    def importance(self, study: str) -> ParamImportances: ...
    def change(self, study: str, change: str, n_trials: int = 0) -> StudySummary: ...
    def resume(self, study: str, free_running: bool = False) -> ResumedStudy: ...
    def delete(self, study: str) -> None: ...
    def enqueue(self, study: str, configs: list[Any]) -> list[TrialSummary]: ...
    def model(self, study: str, number: int) -> bytes: ...


def connect(api: str | None, db: str | None) -> Backend:
    """`--api` wins, then `--db`, then $HPSEARCH_API_URL, then the default database."""
    if api:
        return ApiBackend(api, os.environ.get("HPSEARCH_API_TOKEN"))
    if db:
        return DatabaseBackend(db)
    if os.environ.get("HPSEARCH_API_URL"):
        return ApiBackend(os.environ["HPSEARCH_API_URL"], os.environ.get("HPSEARCH_API_TOKEN"))
    return DatabaseBackend(default_url())


class DatabaseBackend:
    """The service layer, called in this process."""

    def __init__(self, url: str) -> None:
        from hpsearch.logs import quiet_optuna

        quiet_optuna()  # its INFO lines ("A new study created ...") repeat what hpsearch says
        self.store = Store.open(url)  # the schema checked once, as the command starts

    def submit(self, spec: StudySpec) -> StudyDetail:
        return results.study_detail(self.store, submit_study(self.store, spec).id)

    def studies(self, limit: int, offset: int) -> Page[StudySummary]:
        return results.list_studies(self.store, limit, offset)

    def study(self, study: str) -> StudyDetail:
        return results.study_detail(self.store, study)

    def leaderboard(self, study: str, top: int) -> list[LeaderboardEntry]:
        return results.leaderboard(self.store, study, top)

    def trials(self, study: str, state: str | None, limit: int, offset: int) -> Page[TrialSummary]:
        return results.list_trials(self.store, study, state, limit, offset)

    def trial(self, study: str, number: int) -> TrialDetail:
        return results.trial_detail(self.store, study, number)

    def importance(self, study: str) -> ParamImportances:
        return param_importance(self.store, study)

    def change(self, study: str, change: str, n_trials: int = 0) -> StudySummary:
        state = change_state(self.store, study, change, n_trials)
        return results.study_summary(self.store, state.id)

    def resume(self, study: str, free_running: bool = False) -> ResumedStudy:
        state, recovery = resume_study(self.store, study, free_running=free_running)
        return results.resumed_study(self.store, state.id, recovery)

    def delete(self, study: str) -> None:
        delete_study(self.store, study)

    def enqueue(self, study: str, configs: list[Any]) -> list[TrialSummary]:
        return enqueue(self.store, study, configs)

    def model(self, study: str, number: int) -> bytes:
        return results.model_weights(self.store, study, number)


class ApiBackend:
    """The REST API over HTTP; every failure becomes one ApiError line."""

    def __init__(self, base_url: str, token: str | None) -> None:
        import httpx  # here: the --db path never needs it

        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=f"{self.base_url}/api/v1", headers=headers, timeout=API_TIMEOUT_S
        )

    def submit(self, spec: StudySpec) -> StudyDetail:
        return self._call(StudyDetail, "POST", "/studies", json=spec.model_dump(mode="json"))

    def studies(self, limit: int, offset: int) -> Page[StudySummary]:
        params = {"limit": limit, "offset": offset}
        return self._call(Page[StudySummary], "GET", "/studies", params=params)

    def study(self, study: str) -> StudyDetail:
        return self._call(StudyDetail, "GET", f"/studies/{study}")

    def leaderboard(self, study: str, top: int) -> list[LeaderboardEntry]:
        path = f"/studies/{study}/leaderboard"
        return self._call(list[LeaderboardEntry], "GET", path, params={"top": top})

    def trials(self, study: str, state: str | None, limit: int, offset: int) -> Page[TrialSummary]:
        params = {"limit": limit, "offset": offset} | ({"state": state} if state else {})
        return self._call(Page[TrialSummary], "GET", f"/studies/{study}/trials", params=params)

    def trial(self, study: str, number: int) -> TrialDetail:
        return self._call(TrialDetail, "GET", f"/studies/{study}/trials/{number}")

    def importance(self, study: str) -> ParamImportances:
        return self._call(ParamImportances, "GET", f"/studies/{study}/importance")

    def change(self, study: str, change: str, n_trials: int = 0) -> StudySummary:
        body = {"n_trials": n_trials} if change == "extend" else None
        return self._call(StudySummary, "POST", f"/studies/{study}/{change}", json=body)

    def resume(self, study: str, free_running: bool = False) -> ResumedStudy:
        params = {"free_running": "true"} if free_running else None
        return self._call(ResumedStudy, "POST", f"/studies/{study}/resume", params=params)

    def delete(self, study: str) -> None:
        self._request("DELETE", f"/studies/{study}")

    def enqueue(self, study: str, configs: list[Any]) -> list[TrialSummary]:
        path = f"/studies/{study}/trials"
        return self._call(list[TrialSummary], "POST", path, json={"configs": configs})

    def model(self, study: str, number: int) -> bytes:
        return self._request("GET", f"/studies/{study}/trials/{number}/model").content

    def _call(self, answer: Any, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return TypeAdapter(answer).validate_python(response.json())
        except ValueError as exc:
            raise ApiError(
                f"{self.base_url} answered something that is not hpsearch's API"
            ) from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the API at {self.base_url}: {_reason(exc)}") from None
        if response.is_success:
            return response
        raise _error(response, self.base_url)


def _reason(exc: httpx.HTTPError) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return "connection refused or host unknown"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {API_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__


def _error(response: httpx.Response, base_url: str) -> HpsearchError:
    """The API's error as the exception the `--db` path would have raised."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    status = response.status_code
    if status == 422 and isinstance(detail, list):
        return SpecError([(_field(problem), problem.get("msg", "")) for problem in detail])
    message = detail if isinstance(detail, str) else response.reason_phrase
    if status == 401:
        return ApiError(
            f"the API at {base_url} refused the request ({message.partition(':')[0]}): "
            "set HPSEARCH_API_TOKEN to a token from `hpsearch token create`"
        )
    if status == 404:
        return NotFound(message)
    if status == 409:
        return Conflict(message)
    return ApiError(f"the API at {base_url} answered {status}: {message}")


def _field(problem: dict[str, Any]) -> str:
    if "field" in problem:
        return problem["field"]
    return ".".join(str(part) for part in problem.get("loc", [])[1:])


def dump_json(answer: BaseModel | list[Any]) -> str:
    """The answer as the API would send it."""
    if isinstance(answer, list):
        return json.dumps([item.model_dump(mode="json") for item in answer], indent=2)
    return answer.model_dump_json(indent=2)
