"""The `/api/v1` routes: each validates, calls one service function, and returns its view."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, File, Form, Path, Query, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from hpsearch.api.auth import require_token
from hpsearch.api.errors import responses
from hpsearch.service import results
from hpsearch.service.datasets import add_dataset, get_dataset, list_datasets, parse_target
from hpsearch.service.importance import param_importance
from hpsearch.service.studies import (
    change_state,
    delete_study,
    enqueue,
    resume_study,
    submit_study,
)
from hpsearch.service.views import (
    DatasetView,
    LeaderboardEntry,
    Page,
    ParamImportances,
    ResumedStudy,
    StudyDetail,
    StudySummary,
    TrialDetail,
    TrialStateName,
    TrialSummary,
    WorkerView,
)
from hpsearch.spec import MAX_ENQUEUED, StudySpec
from hpsearch.storage import Store

router = APIRouter(
    prefix="/api/v1", dependencies=[Depends(require_token)], responses=responses(401, 503)
)

StudyKey = Annotated[
    str,
    Path(
        description="the study's numeric id or its name",
        examples=["digits"],
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
    ),
]
TrialNumber = Annotated[int, Path(ge=0, le=10_000_000, description="the trial's number")]

SPEC_EXAMPLE = {
    "name": "digits",
    "dataset": {"source": "builtin", "name": "digits"},
    "model": {"hidden": [128], "activation": "relu"},
    "search_space": {
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "batch_size": {"choices": [32, 64, 128]},
        "dropout": {"low": 0.0, "high": 0.5},
    },
    "training": {"max_epochs": 20},
    "sampler": {"name": "gp"},
    "pruner": {"name": "median"},
    "budget": {"n_trials": 30},
}


def _store(request: Request) -> Store:
    """The API's store (`Settings.store`), handed to each route by FastAPI."""
    return request.app.state.settings.store


StoreDep = Annotated[Store, Depends(_store)]


@router.post(
    "/studies",
    status_code=201,
    response_model=StudyDetail,
    responses=responses(409, 413, 422),
    summary="Submit a study",
    description="Creates the study, or returns the one of that name when its spec is the same "
    "(a new budget is taken over). Workers start on it at once.",
)
def create_study(
    store: StoreDep,
    spec: Annotated[StudySpec, Body(openapi_examples={"digits": {"value": SPEC_EXAMPLE}})],
) -> StudyDetail:
    state = submit_study(store, spec)
    return results.study_detail(store, state.id)


@router.get("/studies", response_model=Page[StudySummary], summary="List studies with progress")
def get_studies(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Page[StudySummary]:
    return results.list_studies(store, limit, offset)


@router.get("/studies/{study}", response_model=StudyDetail, responses=responses(404, 422))
def get_study(store: StoreDep, study: StudyKey) -> StudyDetail:
    """The spec, state, progress and best trial."""
    return results.study_detail(store, study)


@router.get(
    "/studies/{study}/leaderboard",
    response_model=list[LeaderboardEntry],
    responses=responses(404, 422),
)
def get_leaderboard(
    store: StoreDep, study: StudyKey, top: Annotated[int, Query(ge=1, le=1000)] = 10
) -> list[LeaderboardEntry]:
    """The best complete trials, best first."""
    return results.leaderboard(store, study, top)


@router.get(
    "/studies/{study}/importance",
    response_model=ParamImportances,
    responses=responses(404, 422),
    summary="Which hyperparameters mattered",
)
def get_importance(store: StoreDep, study: StudyKey) -> ParamImportances:
    """Each searched hyperparameter's share of the importance, most important first, by
    Optuna's PED-ANOVA over the complete trials (at least 10; a study of more than 2,000 is
    evaluated on an evenly spaced sample of them). Where there can be no answer (too few
    trials, nothing searched or nothing that varies), `importances` is empty and `reason`
    says why."""
    return param_importance(store, study)


@router.get(
    "/studies/{study}/trials", response_model=Page[TrialSummary], responses=responses(404, 422)
)
def get_trials(
    store: StoreDep,
    study: StudyKey,
    state: TrialStateName | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Page[TrialSummary]:
    """Trials by number, optionally of one state."""
    return results.list_trials(store, study, state, limit, offset)


class Configurations(BaseModel):
    model_config = ConfigDict(extra="forbid")

    configs: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_ENQUEUED,
        description="configurations to train first, in order: each maps searched params to "
        "values; the sampler draws the params one leaves out",
        examples=[[{"learning_rate": 0.003, "batch_size": 64}, {"learning_rate": 0.01}]],
    )


@router.post(
    "/studies/{study}/trials",
    status_code=201,
    response_model=list[TrialSummary],
    responses=responses(404, 409, 413, 422),
    summary="Enqueue configurations to train first",
)
def enqueue_trials(store: StoreDep, study: StudyKey, body: Configurations) -> list[TrialSummary]:
    """Waiting trials with these configurations, trained before the sampler's own points and
    counted in the budget (409 when the budget has no room for them, or the study is
    completed, cancelled, failed or a grid). 422 names each param outside the search
    space, of the wrong type, or outside its bounds or choices."""
    return enqueue(store, study, body.configs)


@router.get(
    "/studies/{study}/trials/{number}", response_model=TrialDetail, responses=responses(404, 422)
)
def get_trial(store: StoreDep, study: StudyKey, number: TrialNumber) -> TrialDetail:
    """One trial with its learning curve."""
    return results.trial_detail(store, study, number)


@router.get(
    "/studies/{study}/trials/{number}/model",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "torch.save'd weights"},
        **responses(404, 422),
    },
)
def get_model(store: StoreDep, study: StudyKey, number: TrialNumber) -> Response:
    """The trained weights (a `state_dict` for `torch.load`) of one of the best trials."""
    payload = results.model_weights(store, study, number)
    filename = f"{study}-trial-{number}.pt"
    return Response(
        payload,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post(
    "/studies/{study}/pause", response_model=StudySummary, responses=responses(404, 409, 422)
)
def pause(store: StoreDep, study: StudyKey) -> StudySummary:
    """Start no new trials (running ones finish); 409 unless queued or running."""
    state = change_state(store, study, "pause")
    return results.study_summary(store, state.id)


@router.post(
    "/studies/{study}/cancel", response_model=StudySummary, responses=responses(404, 409, 422)
)
def cancel(store: StoreDep, study: StudyKey) -> StudySummary:
    """Stop the study for good; its results stay. 409 once completed or cancelled."""
    state = change_state(store, study, "cancel")
    return results.study_summary(store, state.id)


@router.post(
    "/studies/{study}/resume", response_model=ResumedStudy, responses=responses(404, 409, 422)
)
def resume(store: StoreDep, study: StudyKey, free_running: bool = False) -> ResumedStudy:
    """Run the study again and free the trials of crashed workers now (not after the grace
    period); they resume from their checkpoints. `free_running=true` when their workers
    are known dead: each running trial is freed unless its worker beats within two
    heartbeats (the answer takes that long at most)."""
    state, recovery = resume_study(store, study, free_running=free_running)
    return results.resumed_study(store, state.id, recovery)


class Extension(BaseModel):
    n_trials: int = Field(ge=1, le=1_000_000, description="trials to add to the budget")


@router.post(
    "/studies/{study}/extend", response_model=StudySummary, responses=responses(404, 409, 413, 422)
)
def extend(store: StoreDep, study: StudyKey, extension: Extension) -> StudySummary:
    """Raise the budget; a completed study runs again."""
    state = change_state(store, study, "extend", extension.n_trials)
    return results.study_summary(store, state.id)


@router.delete("/studies/{study}", status_code=204, responses=responses(404, 409, 422))
def remove_study(store: StoreDep, study: StudyKey) -> Response:
    """Delete the study with its trials, checkpoints and kept weights (409 while it runs:
    pause or cancel it first)."""
    delete_study(store, study)
    return Response(status_code=204)


@router.post(
    "/datasets", status_code=201, response_model=DatasetView, responses=responses(413, 422)
)
def upload_dataset(
    request: Request,
    file: Annotated[UploadFile, File(description="a .csv, .parquet or .npz file")],
    target: Annotated[
        str,
        Form(
            min_length=1,
            max_length=4096,
            description="the label column; comma-separated columns for a multilabel target",
        ),
    ],
) -> DatasetView:
    """Store a data set in the database, after checking that it can be trained on; a study
    uses it with `dataset: {source: uploaded, id: N}`."""
    content = file.file.read()  # already spooled to disk within the size limit
    settings = request.app.state.settings
    name, columns = file.filename or "upload", parse_target(target)
    return add_dataset(settings.store, name, content, columns, settings.max_upload_cells)


@router.get("/datasets", response_model=list[DatasetView])
def get_datasets(store: StoreDep) -> list[DatasetView]:
    return list_datasets(store)


@router.get("/datasets/{dataset_id}", response_model=DatasetView, responses=responses(404, 422))
def get_one_dataset(
    store: StoreDep, dataset_id: Annotated[int, Path(ge=1, le=2**31 - 1)]
) -> DatasetView:
    return get_dataset(store, dataset_id)


@router.get("/workers", response_model=list[WorkerView])
def get_workers(store: StoreDep) -> list[WorkerView]:
    """Workers that have not stopped, with device, heartbeat and current trial."""
    return results.list_workers(store)
