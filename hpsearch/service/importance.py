"""Which hyperparameters mattered: Optuna's PED-ANOVA over a study's complete trials.

Why PED-ANOVA (`optuna.importance.PedAnovaImportanceEvaluator`) and not Optuna's default,
fANOVA, or mean decrease impurity (measured in BENCHMARKS.md, "Hyperparameter importance"):

* Speed. On 1,000 trials fANOVA takes 14 s (it fits a random forest, then walks every
  tree's partitions), too long for an API request; PED-ANOVA compares two Parzen estimators
  per parameter on a grid and takes milliseconds. Reading the trials costs more than that.
* No scikit-learn. fANOVA and mean decrease impurity need it (a second to import); PED-ANOVA
  needs numpy only, so `hpsearch status` can show the line and stay a fast client command.
* Determinism. PED-ANOVA draws nothing at random: the same trials give the same answer,
  with no seed to pass (the random-forest evaluators need one).
* Few trials. PED-ANOVA asks which parameter values the best trials share, so enough of
  them must count as the best: the best tenth of the trials, or the best 10 where a tenth
  holds fewer (at most the better half: a study of 30 trials compares its best third with
  all). So run, it ranked a planted dominant parameter first as often as mean decrease
  impurity did from 20 trials up; Optuna's fixed tenth did worse at every size up to 50. Below
  MIN_TRIALS (10) complete trials no evaluator was reliable, and there is no answer.

Only COMPLETE trials count, as in all of Optuna's evaluators. A pruned trial's value is the
objective at the epoch where it stopped, not comparable with a trained trial's (pruning
stops the trials that look bad early, not those that end bad), and a failed trial has no
value. A study of more than MAX_TRIALS complete trials is evaluated on an evenly spaced
sample of them by trial number, so a request stays well under a second however large the
study.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from types import ModuleType

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from hpsearch.search.space import distributions
from hpsearch.service.studies import find_study
from hpsearch.service.views import ParamImportance, ParamImportances
from hpsearch.spec import StudySpec
from hpsearch.storage.queries import ScoredTrial, complete_trials, internal_params
from hpsearch.storage.store import Store

EVALUATOR = "PED-ANOVA"
MIN_TRIALS = 10
MAX_TRIALS = 2_000
TOP_QUANTILE = 0.1  # PED-ANOVA's default target quantile: the best tenth of the trials
TOP_TRIALS = 10  # the fewest trials that count as the best, where a tenth holds fewer
MAX_QUANTILE = 0.5  # and at most the better half


def param_importance(store: Store, study: str | int) -> ParamImportances:
    """Each searched hyperparameter's share of the importance, most important first; or,
    where there can be no answer (too few complete trials, nothing searched, nothing that
    varies, every trial alike), a `reason` that says so."""
    with store.session() as session:
        record = find_study(session, study)
        scored = complete_trials(session, record.optuna_study_id or -1)
        used = evenly_spaced(scored, MAX_TRIALS)
        params = internal_params(session, [trial.trial_id for trial in used])
    spec = StudySpec.model_validate(record.spec)
    searched = distributions(spec)
    varying = {name: dist for name, dist in searched.items() if not dist.single()}
    answer = functools.partial(
        ParamImportances,
        study=record.name,
        metric=spec.objective.metric,
        evaluator=EVALUATOR,
        trials_complete=len(scored),
        trials_used=0,
        min_trials=MIN_TRIALS,
        constant=[name for name in searched if name not in varying],
    )
    if not searched:
        return answer(reason="no hyperparameter is searched: the spec's search_space is empty")
    if not varying:
        return answer(reason="no searched hyperparameter varies: each has a single possible value")
    # Trials that hold every varying param (all of them, unless written outside hpsearch).
    trials = [trial for trial in used if varying.keys() <= params[trial.trial_id].keys()]
    if len(trials) < MIN_TRIALS:
        return answer(
            trials_used=len(trials),
            reason=f"telling which hyperparameters mattered needs at least {MIN_TRIALS} "
            f"complete trials; {record.name} has {len(trials)} (pruned and failed trials "
            "do not count)",
        )
    if len({trial.value for trial in trials}) == 1:
        return answer(
            trials_used=len(trials),
            reason=f"all {len(trials)} complete trials have the same {spec.objective.metric} "
            f"({trials[0].value:g}): no hyperparameter made a difference",
        )
    quantile = top_quantile(len(trials))
    frozen = [_frozen(trial.value, params[trial.trial_id], varying) for trial in trials]
    shares = _ped_anova(frozen, spec.objective.direction, quantile)
    if shares is None:
        return answer(
            trials_used=len(trials),
            top_quantile=quantile,
            reason="the best trials' hyperparameters are spread as all the trials' are: "
            "none of them stands out",
        )
    return answer(
        trials_used=len(trials),
        top_quantile=quantile,
        importances=[ParamImportance(param=name, importance=share) for name, share in shares],
    )


def _frozen(
    value: float, params: dict[str, float], varying: dict[str, BaseDistribution]
) -> FrozenTrial:
    """A complete trial for Optuna's evaluator: its value and its varying params, from their
    internal representation as stored."""
    return create_trial(
        state=TrialState.COMPLETE,
        value=value,
        params={name: dist.to_external_repr(params[name]) for name, dist in varying.items()},
        distributions=varying,
    )


def top_quantile(n_trials: int) -> float:
    """The share of `n_trials` trials that count as the best (PED-ANOVA's target quantile)."""
    return min(MAX_QUANTILE, max(TOP_QUANTILE, TOP_TRIALS / n_trials))


def evenly_spaced(trials: list[ScoredTrial], most: int) -> list[ScoredTrial]:
    """All the trials, or `most` of them evenly spaced from the first to the last."""
    if len(trials) <= most:
        return trials
    step = (len(trials) - 1) / (most - 1)
    return [trials[round(i * step)] for i in range(most)]


def _ped_anova(
    trials: list[optuna.trial.FrozenTrial], direction: str, quantile: float
) -> list[tuple[str, float]] | None:
    """(param, share) most important first, ties by name; None where every importance is
    zero (Optuna would then give every param an equal share, which would mislead)."""
    importance = _optuna_importance()
    storage = optuna.storages.InMemoryStorage()
    name = "importance"
    storage.create_new_study([optuna.study.StudyDirection[direction.upper()]], name)
    study = optuna.Study(name, storage)
    study.add_trials(trials)
    raw = importance.get_param_importances(
        study,
        evaluator=importance.PedAnovaImportanceEvaluator(target_quantile=quantile),
        normalize=False,
    )
    total = sum(raw.values())
    if not total > 0:
        return None
    return sorted(
        ((param, value / total) for param, value in raw.items()),
        key=lambda pair: (-pair[1], pair[0]),
    )


_load_lock = threading.Lock()
_loaded: list[ModuleType] = []  # the package, once loaded


def _optuna_importance() -> ModuleType:
    """`optuna.importance`, loaded once per process (`_load_importance`)."""
    with _load_lock:
        if not _loaded:
            _loaded.append(_load_importance())
        return _loaded[0]


def _load_importance() -> ModuleType:
    """`optuna.importance`, loaded without scikit-learn where nothing has loaded it yet.

    Optuna's importance package imports its fANOVA and mean-decrease-impurity evaluators,
    which import scikit-learn (and SciPy): a second of start-up that `hpsearch status` must
    not pay (tests/test_startup.py), for evaluators hpsearch does not use. Optuna guards both
    imports (`try_import`), so with scikit-learn hidden the package loads without them, and
    PED-ANOVA (numpy only) works. The package so loaded is then taken out of `sys.modules`
    (and `optuna.importance` made lazy again): whatever imports it later in this process
    gets it whole, fANOVA included.
    """
    if "sklearn" in sys.modules or "optuna.importance" in sys.modules:
        return importlib.import_module("optuna.importance")
    lazy = vars(optuna).get("importance")
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # importing it fails
    try:
        return importlib.import_module("optuna.importance")
    finally:
        del sys.modules["sklearn"]
        for name in [m for m in sys.modules if m.split(".")[:2] == ["optuna", "importance"]]:
            del sys.modules[name]
        if lazy is not None:
            optuna.importance = lazy  # type: ignore[attr-defined]
