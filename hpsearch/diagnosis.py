"""Why a trial's training went the way it did, and what a study's trials say to change.

A trial's diagnosis is read off its recorded epochs (train and val loss, the gradient norm
of each layer, the learning rate), the way one would read a BP network's learning curves
by hand. A study's advice counts diagnoses against the searched hyperparameters, so every
sentence carries its evidence ("9 of 11 trials with learning_rate >= 0.3 diverged").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hpsearch.spec import Dimension, StudySpec
from hpsearch.train import EpochRecord, TrainResult

Diagnosis = Literal[
    "ok",
    "early_stopped",
    "pruned",
    "diverged",
    "vanishing_gradients",
    "oscillating",
    "overfitting",
    "crashed",
]

# A layer's gradient norm this many times its first epoch's: the weights are exploding.
EXPLODING_GROWTH = 1e3
# The first layer's gradient norm under this fraction of the last layer's: it hardly learns.
VANISHING_RATIO = 1e-3
# Training loss improved by less than this fraction of its first epoch's value: flat.
FLAT_IMPROVEMENT = 0.05
# An epoch whose training loss rose above the previous one's by more than this fraction.
RISE = 0.02
# Oscillating: at least this share of the epoch-to-epoch changes are rises.
OSCILLATING_SHARE = 0.4
# Overfitting: the last val loss this much above its minimum, the train loss this much below
# its value at that minimum, and at least OVERFIT_EPOCHS epochs after it.
OVERFIT_VAL_RISE = 0.1
OVERFIT_TRAIN_FALL = 0.1
OVERFIT_EPOCHS = 3
MIN_EPOCHS = 4  # fewer recorded epochs are no evidence of a pattern


def diagnose(result: TrainResult) -> Diagnosis:
    """One word for how the training went; a pathology wins over how the run ended."""
    history = result.history
    if result.diverged or _exploding(history):
        return "diverged"
    if _vanishing(history):
        return "vanishing_gradients"
    if _oscillating(history):
        return "oscillating"
    if _overfitting(history):
        return "overfitting"
    if result.pruned:
        return "pruned"
    if result.stopped_early:
        return "early_stopped"
    return "ok"


def _exploding(history: Sequence[EpochRecord]) -> bool:
    norms = [r.grad_norms for r in history if r.grad_norms]
    if not norms:
        return False
    first, last = norms[0], norms[-1]
    return any(
        not math.isfinite(b) or (a > 0 and b > EXPLODING_GROWTH * a)
        for a, b in zip(first, last, strict=False)
    )


def _vanishing(history: Sequence[EpochRecord]) -> bool:
    """The first layer's gradient a vanishing fraction of the last's, with the loss flat."""
    norms = [r.grad_norms for r in history if len(r.grad_norms) >= 2]
    if len(norms) < MIN_EPOCHS:
        return False
    ratios = sorted(n[0] / n[-1] if n[-1] > 0 else 1.0 for n in norms)
    start, best = history[0].train_loss, min(r.train_loss for r in history)
    flat = start - best < FLAT_IMPROVEMENT * abs(start)
    return ratios[len(ratios) // 2] < VANISHING_RATIO and flat


def _oscillating(history: Sequence[EpochRecord]) -> bool:
    if len(history) < MIN_EPOCHS + 1:
        return False
    losses = [r.train_loss for r in history]
    rises = sum(b > a * (1 + RISE) for a, b in itertools.pairwise(losses))
    return rises >= OSCILLATING_SHARE * (len(losses) - 1)


def _overfitting(history: Sequence[EpochRecord]) -> bool:
    """Validation loss rising from its minimum while the training loss keeps falling."""
    if len(history) < MIN_EPOCHS:
        return False
    at = min(range(len(history)), key=lambda i: history[i].val_loss)
    best, last = history[at], history[-1]
    return (
        len(history) - 1 - at >= OVERFIT_EPOCHS
        and last.val_loss > best.val_loss * (1 + OVERFIT_VAL_RISE)
        and last.train_loss < best.train_loss * (1 - OVERFIT_TRAIN_FALL)
    )


# --- study advice ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrialFacts:
    """What advice needs of one finished trial."""

    params: dict[str, Any]
    value: float | None  # the objective; None when the trial has none (failed, diverged early)
    diagnosis: str | None
    best_epoch: int | None


EDGE = 0.1  # the outer tenth of a range (on its own scale) counts as its edge
MIN_TRIALS = 5  # fewer finished trials are no evidence for advice
BEST_SHARE = 0.2  # the best fifth of the trials (at least 3) decide where the optimum lies
EARLY_EPOCHS = 2  # a best epoch this early in an early-stopped trial: it peaked at once
SHARE_FOR_ADVICE = 0.3  # a diagnosis this common among the trials is worth a sentence


def advise(trials: Sequence[TrialFacts], spec: StudySpec) -> list[str]:
    """Sentences with counts, each naming what to change in the spec."""
    if len(trials) < MIN_TRIALS:
        return []
    advice = _diverging_learning_rates(trials, spec)
    advice += _best_at_an_edge(trials, spec)
    advice += _diagnosis_advice(trials, spec)
    return advice


def _diverging_learning_rates(trials: Sequence[TrialFacts], spec: StudySpec) -> list[str]:
    """The lowest learning rate above which at least half of the trials diverged."""
    rated = sorted(
        (float(t.params["learning_rate"]), t.diagnosis == "diverged")
        for t in trials
        if "learning_rate" in t.params
    )
    diverged = [lr for lr, d in rated if d]
    if len(diverged) < 2:
        return []
    for threshold in diverged:
        above = [d for lr, d in rated if lr >= threshold]
        if sum(above) * 2 >= len(above):
            below = sum(d for lr, d in rated if lr < threshold)
            tail = f"; {below} below it did" if below else ", none below it"
            return [
                f"{sum(above)} of {len(above)} trials with learning_rate >= {threshold:.2g} "
                f"diverged{tail}: lower search_space.learning_rate.high to about "
                f"{threshold:.2g}."
            ]
    return []


def _best_at_an_edge(trials: Sequence[TrialFacts], spec: StudySpec) -> list[str]:
    """Ranges whose best trials crowd against a bound: the optimum may lie beyond it."""
    scored = [t for t in trials if t.value is not None and math.isfinite(t.value)]
    if len(scored) < MIN_TRIALS:
        return []
    maximize = spec.objective.direction == "maximize"
    scored.sort(key=lambda t: t.value, reverse=maximize)
    best = scored[: max(3, round(BEST_SHARE * len(scored)))]
    advice = []
    for key, dim in spec.search_space.dimensions().items():
        if not dim.is_range or dim.low == dim.high:
            continue
        positions = [_unit(dim, float(t.params[key])) for t in best if key in t.params]
        if len(positions) < 3:
            continue
        for side, near in (
            ("upper", [p >= 1 - EDGE for p in positions]),
            ("lower", [p <= EDGE for p in positions]),
        ):
            if sum(near) * 3 >= 2 * len(positions):  # two thirds or more
                bound = dim.high if side == "upper" else dim.low
                advice.append(
                    f"{sum(near)} of the best {len(positions)} trials have {key} in the "
                    f"{side} tenth of its range (bound {bound:g}): widen "
                    f"search_space.{key} past {bound:g}."
                )
    return advice


def _unit(dim: Dimension, value: float) -> float:
    """`value`'s place in the range on the range's own scale: 0 at low, 1 at high."""
    low, high = float(dim.low), float(dim.high)
    if dim.log:
        low, high, value = math.log(low), math.log(high), math.log(max(value, 1e-300))
    return (value - low) / (high - low)


def _diagnosis_advice(trials: Sequence[TrialFacts], spec: StudySpec) -> list[str]:
    total = len(trials)
    count = {d: sum(t.diagnosis == d for t in trials) for d in Diagnosis.__args__}
    advice = []
    early = [
        t for t in trials if t.diagnosis == "early_stopped" and (t.best_epoch or 0) <= EARLY_EPOCHS
    ]
    if len(early) * 2 >= total:
        advice.append(
            f"{len(early)} of {total} trials stopped early with their best epoch among the "
            f"first {EARLY_EPOCHS}: the learning rate is likely too high for the rest of "
            "training; lower search_space.learning_rate or use a scheduler."
        )
    if count["vanishing_gradients"]:
        activation = spec.model.activation
        advice.append(
            f"{count['vanishing_gradients']} of {total} trials show vanishing gradients (the "
            f"first layer's gradient under {VANISHING_RATIO:g} of the last layer's, the loss "
            f"flat)"
            + (
                f" in a {len(spec.model.hidden)}-layer {activation} network: use relu with "
                "init he, or batch_norm: true."
                if activation in ("sigmoid", "tanh")
                else ": use fewer layers, init he, or batch_norm: true."
            )
        )
    if count["overfitting"] >= SHARE_FOR_ADVICE * total:
        advice.append(
            f"{count['overfitting']} of {total} trials overfit (validation loss rising while "
            "the training loss falls): raise dropout or weight_decay, or use a smaller network."
        )
    if count["oscillating"] >= SHARE_FOR_ADVICE * total:
        advice.append(
            f"{count['oscillating']} of {total} trials oscillate (training loss rising in "
            "many epochs): lower search_space.learning_rate or clip gradients "
            "(training.grad_clip_norm)."
        )
    return advice
