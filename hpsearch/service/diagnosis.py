"""Why a trial's training went the way it did, and what a study's trials say to change.

A trial's diagnosis is read off its recorded epochs (train and val loss, the gradient norm
of each layer, the learning rate), the way one would read a BP network's learning curves
by hand. A study's advice counts diagnoses against the searched hyperparameters, so every
sentence carries its evidence ("9 of 11 trials with learning_rate >= 0.3 diverged"), and
names only fields of the study's spec and values the spec accepts: advice that gets its
spec refused is worse than none.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from hpsearch.spec import INTEGER_KEYS, SEARCH_RULES, Dimension, StudySpec

if TYPE_CHECKING:  # training's types; reading advice must not import torch
    from hpsearch.training.train import EpochRecord, TrainResult

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


@dataclass(frozen=True)
class Advice:
    """One sentence of advice and the change to the spec it proposes, {dotted path: new
    value} (empty when it names no single value). A change is proposed only once the spec's
    own validation accepts it."""

    text: str
    change: dict[str, Any] = field(default_factory=dict)


EDGE = 0.1  # the outer tenth of a range (on its own scale) counts as its edge
MIN_TRIALS = 5  # fewer finished trials are no evidence for advice
BEST_SHARE = 0.2  # the best fifth of the trials (at least 3) decide where the optimum lies
EARLY_EPOCHS = 2  # a best epoch this early in an early-stopped trial: it peaked at once
SHARE_FOR_ADVICE = 0.3  # a diagnosis this common among the trials is worth a sentence
MAX_DIGITS = 6  # significant digits of a proposed value, at most (what `:g` writes)
HALVINGS = 30  # a widening the spec refuses is halved towards its bound this often at most
SATURATING = ("sigmoid", "tanh")


def advise(trials: Sequence[TrialFacts], spec: StudySpec) -> list[str]:
    """Sentences with counts, each naming what to change in the spec."""
    return [item.text for item in study_advice(trials, spec)]


def study_advice(trials: Sequence[TrialFacts], spec: StudySpec) -> list[Advice]:
    """The advice, each with the change it proposes."""
    if len(trials) < MIN_TRIALS:
        return []
    advice = _diverging_learning_rates(trials, spec)
    advice += _best_at_an_edge(trials, spec)
    advice += _diagnosis_advice(trials, spec)
    return advice


def with_change(spec: StudySpec, change: dict[str, Any]) -> StudySpec:
    """`spec` with each dotted path of `change` set to its value, validated as a submitted
    spec is: raises pydantic's ValidationError where the spec refuses it."""
    data = spec.model_dump(mode="json")
    for path, value in change.items():
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    return StudySpec.model_validate(data)


def _accepts(spec: StudySpec, change: dict[str, Any]) -> bool:
    try:
        with_change(spec, change)
    except ValidationError:
        return False
    return True


def _diverging_learning_rates(trials: Sequence[TrialFacts], spec: StudySpec) -> list[Advice]:
    """The lowest learning rate above which at least half of the trials diverged."""
    dim = spec.search_space.learning_rate
    rated = sorted(
        (float(t.params["learning_rate"]), t.diagnosis == "diverged")
        for t in trials
        if "learning_rate" in t.params
    )
    diverged = [lr for lr, d in rated if d]
    if dim is None or len(diverged) < 2:
        return []
    for threshold in diverged:
        above = [d for lr, d in rated if lr >= threshold]
        if sum(above) * 2 >= len(above):
            below = sum(d for lr, d in rated if lr < threshold)
            tail = f"; {below} below it did" if below else ", none below it"
            remedy = _below(spec, dim, threshold)
            finding = (
                f"{sum(above)} of {len(above)} trials with learning_rate >= {threshold:.2g} "
                f"diverged{tail}: "
            )
            return [] if remedy is None else [Advice(finding + remedy.text, remedy.change)]
    return []


def _below(spec: StudySpec, dim: Dimension, threshold: float) -> Advice | None:
    """Searching learning rates under `threshold` only: a lower high, the choices under it,
    or, where the threshold is the range's low itself, the range a decade lower."""
    path = "search_space.learning_rate"
    if not dim.is_range:
        kept = [c for c in dim.choices if c < threshold]
        change = {f"{path}.choices": kept}
        if not kept or not _accepts(spec, change):
            return None
        return Advice(f"keep only the choices under it, {path}.choices: {kept}.", change)
    for high in _roundings(threshold):
        change = {f"{path}.high": high}
        if high > dim.low and _accepts(spec, change):
            return Advice(f"lower {path}.high to about {high:g}.", change)
    for low in _roundings(dim.low / 10):
        change = {f"{path}.low": low, f"{path}.high": dim.low}
        if _accepts(spec, change):
            return Advice(f"lower {path}: low {low:g}, high {_number(dim.low)}.", change)
    return None


def _best_at_an_edge(trials: Sequence[TrialFacts], spec: StudySpec) -> list[Advice]:
    """Ranges whose best trials crowd against a bound: the optimum may lie beyond it, where
    the spec allows searching beyond it."""
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
                advice += _widen(spec, key, dim, side, f"{sum(near)} of the best {len(positions)}")
    return advice


def _widen(spec: StudySpec, key: str, dim: Dimension, side: str, share: str) -> list[Advice]:
    """Widen the range past its bound on `side` to the widest value the spec accepts, or
    nothing where the bound is the spec's own limit (n_layers at 1, dropout at 0, ...)."""
    bound = dim.high if side == "upper" else dim.low
    name = "high" if side == "upper" else "low"
    path = f"search_space.{key}.{name}"
    tried: set[float] = set()
    for value in _past(key, dim, side):
        beyond = value > bound if side == "upper" else value < bound
        if value in tried or not beyond:
            continue
        tried.add(value)
        if _accepts(spec, {path: value}):
            return [
                Advice(
                    f"{share} trials have {key} in the {side} tenth of its range (bound "
                    f"{_number(bound)}): widen search_space.{key} past {_number(bound)}, e.g. "
                    f"{name}: {_number(value)}.",
                    {path: value},
                )
            ]
    return []


def _past(key: str, dim: Dimension, side: str) -> Iterator[float]:
    """Candidate bounds past `side`'s, widest first: the range's width again (a decade on a
    log scale), then halved towards the bound; within the key's inclusive limits, on the
    range's step, whole for integer keys, and rounded."""
    sign = 1 if side == "upper" else -1
    bound = float(dim.high if side == "upper" else dim.low)
    rule = SEARCH_RULES[key]
    for i in range(HALVINGS):
        if dim.log:
            far = bound * 10.0 ** (sign / 2**i)
        else:
            far = bound + sign * (float(dim.high) - float(dim.low)) / 2**i
        far = min(far, rule.maximum) if rule.maximum is not None else far
        far = max(far, rule.minimum) if rule.minimum is not None else far
        if dim.step is not None:
            far = bound + sign * max(1, round(abs(far - bound) / dim.step)) * dim.step
        if key in INTEGER_KEYS:
            yield math.ceil(far) if sign > 0 else math.floor(far)
        else:
            yield from _roundings(far)


def _roundings(value: float) -> Iterator[float]:
    """`value` with 2 significant digits, then more: a round number first, exact enough
    later for a value squeezed against a limit."""
    for digits in range(2, MAX_DIGITS + 1):
        yield float(f"{value:.{digits}g}")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _unit(dim: Dimension, value: float) -> float:
    """`value`'s place in the range on the range's own scale: 0 at low, 1 at high."""
    low, high = float(dim.low), float(dim.high)
    if dim.log:
        low, high, value = math.log(low), math.log(high), math.log(max(value, 1e-300))
    return (value - low) / (high - low)


def _diagnosis_advice(trials: Sequence[TrialFacts], spec: StudySpec) -> list[Advice]:
    total = len(trials)
    count = {d: sum(t.diagnosis == d for t in trials) for d in Diagnosis.__args__}
    learning_rate = _setting(spec, "learning_rate")
    advice = []
    early = [
        t for t in trials if t.diagnosis == "early_stopped" and (t.best_epoch or 0) <= EARLY_EPOCHS
    ]
    if len(early) * 2 >= total:
        advice.append(
            f"{len(early)} of {total} trials stopped early with their best epoch among the "
            f"first {EARLY_EPOCHS}: the learning rate is likely too high for the rest of "
            f"training; " + _either([f"lower {learning_rate}", *_scheduler_remedy(spec)])
        )
    if count["vanishing_gradients"]:
        advice.append(
            f"{count['vanishing_gradients']} of {total} trials show vanishing gradients (the "
            f"first layer's gradient under {VANISHING_RATIO:g} of the last layer's, the loss "
            "flat)" + _remedies(_vanishing_remedies(spec))
        )
    if count["overfitting"] >= SHARE_FOR_ADVICE * total:
        remedies = [f"raise {_setting(spec, 'dropout')} or {_setting(spec, 'weight_decay')}"]
        advice.append(
            f"{count['overfitting']} of {total} trials overfit (validation loss rising while "
            "the training loss falls): " + _either([*remedies, "use a smaller network"])
        )
    if count["oscillating"] >= SHARE_FOR_ADVICE * total:
        advice.append(
            f"{count['oscillating']} of {total} trials oscillate (training loss rising in "
            "many epochs): " + _either([f"lower {learning_rate}", _clip_remedy(spec)])
        )
    return [Advice(text) for text in advice]


def _setting(spec: StudySpec, key: str) -> str:
    """Where a training hyperparameter is set: its searched range, else its fixed value."""
    if getattr(spec.search_space, key) is not None:
        return f"search_space.{key}"
    return f"training.{key}"


def _scheduler_remedy(spec: StudySpec) -> list[str]:
    if spec.training.scheduler != "none" or spec.search_space.scheduler is not None:
        return []  # one is in use, or searched
    return ["use a scheduler (training.scheduler)"]


def _clip_remedy(spec: StudySpec) -> str:
    if spec.search_space.grad_clip_norm is not None:
        return "clip gradients harder (lower search_space.grad_clip_norm)"
    if spec.training.grad_clip_norm is None:
        return "clip gradients (training.grad_clip_norm)"
    return f"clip gradients harder (training.grad_clip_norm under {spec.training.grad_clip_norm:g})"


def _vanishing_remedies(spec: StudySpec) -> list[str]:
    """The usual cures that the spec does not use already."""
    space, model = spec.search_space, spec.model
    remedies = []
    if space.activation is not None:
        saturating = [c for c in space.activation.choices if c in SATURATING]
        if saturating and len(saturating) < len(space.activation.choices):
            remedies.append(f"drop {' and '.join(saturating)} from search_space.activation")
    elif model.activation in SATURATING:
        remedies.append("use relu (model.activation)")
    if space.init is None and model.init != "he":
        remedies.append("use init he (model.init)")
    if space.batch_norm is None and not model.batch_norm:
        remedies.append("use batch_norm: true (model.batch_norm)")
    if space.n_layers is not None and (space.n_layers.high or max(space.n_layers.choices)) > 1:
        remedies.append("use fewer layers (search_space.n_layers)")
    elif space.n_layers is None and len(model.hidden) > 1:
        remedies.append("use fewer layers (model.hidden)")
    return remedies


def _remedies(remedies: list[str]) -> str:
    return ": " + _either(remedies) if remedies else "."


def _either(remedies: list[str]) -> str:
    """The remedies as one clause, "a, b or c", ending the sentence."""
    if len(remedies) == 1:
        return remedies[0] + "."
    return ", ".join(remedies[:-1]) + " or " + remedies[-1] + "."
