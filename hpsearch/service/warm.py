"""Warm starts: configurations to train first, checked against a study's search space,
given by a user (`hpsearch enqueue`, `POST /studies/{study}/trials`) or taken from another
study's best trials (`warm_start` in a spec).

A configuration maps param names to values. It may leave params out: the study's sampler
draws those. Every value it gives must be one the search space holds (`SearchSpace.fit`).
`hpsearch.service.studies` enqueues the configurations as Optuna's waiting trials.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from hpsearch.errors import SpecError
from hpsearch.spec import MAX_ENQUEUED, SearchSpace, StudySpec
from hpsearch.storage import records
from hpsearch.storage.queries import ranked_trials

RANKED_PAGE = 200  # a warm start reads its source's ranked trials this many at a time


def fit_configs(spec: StudySpec, configs: list[Any], field: str = "configs") -> list[dict]:
    """The configurations as the study's search space holds them, or a SpecError naming
    each param at fault (`configs.1.learning_rate`) with the reason."""
    if len(configs) > MAX_ENQUEUED:
        raise SpecError(
            [(field, f"at most {MAX_ENQUEUED:,} configurations at once, got {len(configs):,}")]
        )
    fitted: list[dict] = []
    problems: list[tuple[str, str]] = []
    for i, config in enumerate(configs):
        if not isinstance(config, dict):
            problems.append((f"{field}.{i}", "a configuration maps param names to values"))
            continue
        if not config:
            problems.append((f"{field}.{i}", "give at least one param"))
            continue
        values, wrong = spec.search_space.fit(config)
        problems += [(f"{field}.{i}.{name}", reason) for name, reason in wrong]
        fitted.append(values)
    if problems:
        raise SpecError(problems)
    return fitted


def warm_start_configs(session: Session, spec: StudySpec) -> list[dict]:
    """The best `warm_start.top` configurations of the study `warm_start.study` that fit
    `spec`'s search space, best first by that study's own objective: its complete trials'
    params, without those `spec` does not search; a trial with a value outside `spec`'s
    bounds or choices (or off its step) is skipped, not clipped, and so is one left with no
    param; a configuration equal to a better one is dropped."""
    warm = spec.warm_start
    if warm is None:
        return []
    source = records.study_by_name(session, warm.study)
    if source is None or source.optuna_study_id is None:
        raise SpecError([("warm_start.study", f"no study named {warm.study!r} in this database")])
    try:
        objective = StudySpec.model_validate(source.spec).objective
    except ValidationError:
        raise SpecError(
            [("warm_start.study", f"study {warm.study!r} has a spec this version cannot read")]
        ) from None
    maximize = objective is not None and objective.direction == "maximize"
    configs: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while len(configs) < warm.top:
        rows = ranked_trials(session, source.optuna_study_id, maximize, RANKED_PAGE, offset)
        for row in rows:
            config = _fitting(spec.search_space, row.params)
            key = json.dumps(config, sort_keys=True)
            if config is None or key in seen:
                continue
            seen.add(key)
            configs.append(config)
            if len(configs) == warm.top:
                break
        if len(rows) < RANKED_PAGE:
            break
        offset += RANKED_PAGE
    return configs


def _fitting(space: SearchSpace, params: dict[str, Any]) -> dict | None:
    """The params `space` searches, as it holds them; None when one of them falls outside
    it, or none is left."""
    searched = space.dimensions()
    fitted, problems = space.fit({k: v for k, v in params.items() if k in searched})
    return None if problems or not fitted else fitted
