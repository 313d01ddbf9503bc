"""The study spec: one pydantic model that the CLI, the API and the workers all read.

Every invalid spec is rejected with the path of the offending field and the reason, so a
user can fix a YAML file or a 422 response without reading our code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hpsearch.errors import SpecError

Task = Literal["classification", "regression", "multilabel"]
Activation = Literal["relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid"]
Init = Literal["he", "xavier", "orthogonal", "default"]
OptimizerName = Literal["adam", "adamw", "sgd", "rmsprop"]
SchedulerName = Literal["none", "plateau", "cosine", "step", "exponential"]
Precision = Literal["fp32", "bf16", "tf32"]
Metric = Literal["val_loss", "val_accuracy", "val_f1", "val_rmse", "val_mae", "val_r2"]
Direction = Literal["minimize", "maximize"]
BuiltinName = Literal["digits", "breast_cancer", "wine", "iris", "diabetes", "mnist_5k"]

DEFAULT_WIDTH = 64  # hidden units per layer when n_layers is searched without model.hidden
BUILTIN_TASKS: dict[str, Task] = {
    "digits": "classification",
    "breast_cancer": "classification",
    "wine": "classification",
    "iris": "classification",
    "diabetes": "regression",
    "mnist_5k": "classification",
}
METRICS_BY_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("val_loss", "val_accuracy", "val_f1"),
    "multilabel": ("val_loss", "val_accuracy", "val_f1"),
    "regression": ("val_loss", "val_rmse", "val_mae", "val_r2"),
}
MAXIMIZED_METRICS = frozenset({"val_accuracy", "val_f1", "val_r2"})
DEFAULT_METRIC: dict[str, str] = {
    "classification": "val_accuracy",
    "multilabel": "val_f1",
    "regression": "val_rmse",
}
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")  # the whole name (fullmatch)
# numpy's and scikit-learn's random states take seeds in [0, 2**32 - 1]; so do ours.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
MAX_LAYERS = 64
MAX_UNITS = 65536
MAX_BATCH_SIZE = 1_000_000
MAX_COUNT = 1_000_000  # trials, startup trials, warm-up epochs, rungs: beyond any real study
MAX_GRID_POINTS = 100_000  # Optuna's grid sampler holds every point of the grid in memory
MAX_ROW_ID = 2**31 - 1  # the integer primary keys of the service's tables
MAX_ENQUEUED = 1000  # configurations one warm start or one enqueue request may hold


class _Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, not silently ignored, and
    numbers are finite (PostgreSQL's JSON refuses Infinity and NaN, and no setting means
    them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- dataset ---------------------------------------------------------------------------


class BuiltinDataset(_Strict):
    source: Literal["builtin"]
    name: BuiltinName


class SyntheticDataset(_Strict):
    source: Literal["synthetic"]
    task: Task = "classification"
    n_samples: int = Field(1000, ge=20, le=50_000_000)
    n_features: int = Field(20, ge=1, le=100_000)
    n_classes: int = Field(2, ge=2, le=1000)
    seed: Seed = 0


class FileDataset(_Strict):
    source: Literal["file"]
    path: str = Field(min_length=1, max_length=4096)
    target: str | list[str] = Field(
        description="the label column; a list of columns makes the task multilabel"
    )

    @field_validator("path")
    @classmethod
    def _known_format(cls, path: str) -> str:
        if Path(path).suffix.lower() not in (".csv", ".parquet", ".pq", ".npz"):
            raise ValueError(f"'{path}' is not a .csv, .parquet or .npz file")
        return path

    @field_validator("target")
    @classmethod
    def _non_empty_target(cls, target: str | list[str]) -> str | list[str]:
        if isinstance(target, list) and not target:
            raise ValueError("give at least one target column")
        return target


class UploadedDataset(_Strict):
    """Data uploaded with `POST /api/v1/datasets`, stored in the study's database; the
    target column was given with the upload."""

    source: Literal["uploaded"]
    id: int = Field(ge=1, le=MAX_ROW_ID)


DatasetSpec = Annotated[
    BuiltinDataset | SyntheticDataset | FileDataset | UploadedDataset,
    Field(discriminator="source"),
]


class SplitSpec(_Strict):
    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: Seed = 0
    standardize: bool = True

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitSpec:
        if self.val + self.test >= 0.9:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves under 10% to train on")
        return self


# --- network and training --------------------------------------------------------------


class ModelSpec(_Strict):
    hidden: list[Annotated[int, Field(ge=1, le=MAX_UNITS)]] = Field(
        default_factory=lambda: [128], max_length=MAX_LAYERS
    )
    activation: Activation = "relu"
    init: Init = "he"
    batch_norm: bool = False

    def hidden_layers(self, params: dict[str, Any]) -> tuple[int, ...]:
        """A trial's hidden layer sizes: `hidden`, or `n_layers` layers of `hidden_units`
        when either is among its params (the other taken from `hidden`)."""
        if "n_layers" not in params and "hidden_units" not in params:
            return tuple(self.hidden)
        width = params.get("hidden_units", self.hidden[0] if self.hidden else DEFAULT_WIDTH)
        return (int(width),) * int(params.get("n_layers", len(self.hidden)))


class TrainingSpec(_Strict):
    """Defaults for every hyperparameter that the search space does not search."""

    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    dropout: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    max_epochs: int = Field(50, ge=1, le=100_000)
    optimizer: OptimizerName = "adam"
    scheduler: SchedulerName = "plateau"
    early_stopping_patience: int | None = Field(5, ge=1, le=100_000)
    grad_clip_norm: float | None = Field(5.0, gt=0)
    checkpoint_every_s: float = Field(30, ge=0)
    # bf16: the forward pass under bf16 autocast (weights, moments and losses stay fp32);
    # tf32: fp32 throughout, with TF32 matmuls on a GPU (fp32 ones on a CPU).
    precision: Precision = "fp32"
    seed: Seed = 0


# --- search space ----------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """Refuse infinity and NaN before a union of types would report each member's error."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


Number = Annotated[int | float, BeforeValidator(_finite)]
Choice = Annotated[bool | int | float | str, BeforeValidator(_finite)]


class Dimension(_Strict):
    """One searched hyperparameter: a range `{low, high, log, step}` or `{choices: [...]}`."""

    low: Number | None = None
    high: Number | None = None
    log: bool = False
    step: Number | None = None
    choices: list[Choice] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Dimension:
        if self.choices is not None:
            if any(v is not None for v in (self.low, self.high, self.step)) or self.log:
                raise ValueError("give either choices or a range (low, high), not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError("choices must not repeat a value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be < high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low = {self.low:g}")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError("step must be > 0 and cannot be combined with log")
        return self

    @property
    def is_range(self) -> bool:
        return self.choices is None

    def count(self) -> int:
        """How many values a finite dimension has (choices, or a stepped/integer range)."""
        if self.choices is not None:
            return len(self.choices)
        return math.floor((self.high - self.low) / (self.step or 1) + 1e-9) + 1

    def values(self) -> list[Any]:
        """Every value of a finite dimension (choices, or a stepped/integer range)."""
        if self.choices is not None:
            return list(self.choices)
        return [self.low + i * (self.step or 1) for i in range(self.count())]

    def fit(self, value: Any, integer: bool) -> Any:
        """`value` as this dimension holds it: the choice it equals (of the same kind:
        a bool matches only a bool, a string only a string), or a number within the range
        and on its step, as an int for an `integer` key and a float otherwise. Raises
        ValueError with the reason when the dimension does not hold it."""
        if self.choices is not None:
            for choice in self.choices:
                if _same_kind(choice, value) and choice == value:
                    return choice
            raise ValueError(f"must be one of {self.choices}, got {_shown(value)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"takes a number, got {_shown(value)}")
        if isinstance(value, float):  # an int is whole, and may be too large for a float
            if not math.isfinite(value):
                raise ValueError(f"must be a finite number, got {value}")
            if integer and not value.is_integer():
                raise ValueError(f"takes whole numbers, got {value:g}")
        if value < self.low:
            raise ValueError(f"{_shown(value)} is below the search space's low ({self.low:g})")
        if value > self.high:
            raise ValueError(f"{_shown(value)} is above the search space's high ({self.high:g})")
        value = int(value) if integer else float(value)  # within the bounds: exact
        if self.step is not None:
            steps = (value - self.low) / self.step
            if abs(steps - round(steps)) > 1e-8:  # Optuna's own tolerance
                raise ValueError(
                    f"{value:g} is not on the search space's step ({self.step:g} from {self.low:g})"
                )
        return value


def _same_kind(choice: Any, value: Any) -> bool:
    """Whether a value may equal a choice: bools with bools, strings with strings, numbers
    with numbers (in Python, True == 1)."""
    for kind in (bool, str):
        if isinstance(choice, kind) or isinstance(value, kind):
            return isinstance(choice, kind) and isinstance(value, kind)
    return isinstance(value, (int, float))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class _Rule:
    """What a searchable key accepts: numbers within bounds, or one of some names."""

    integer: bool = False
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound
    names: tuple[Any, ...] | None = None

    def check(self, key: str, dim: Dimension) -> None:
        if self.names is not None:
            if dim.is_range:
                raise ValueError(f"{key} is categorical: give {{choices: {list(self.names)}}}")
            unknown = [c for c in dim.choices if c not in self.names]
            if unknown:
                raise ValueError(f"unknown {key} {unknown}; allowed: {list(self.names)}")
            return
        values = [dim.low, dim.high] if dim.is_range else list(dim.choices)
        if dim.is_range and dim.step is not None:
            values.append(dim.step)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{key} takes numbers, got {v!r}")
            if self.integer and not float(v).is_integer():
                raise ValueError(f"{key} takes whole numbers, got {v:g}")
            if self.minimum is not None and v < self.minimum:
                raise ValueError(f"{key} must be >= {self.minimum:g}, got {v:g}")
            if self.maximum is not None and v > self.maximum:
                raise ValueError(f"{key} must be <= {self.maximum:g}, got {v:g}")
            if self.above is not None and v <= self.above:
                raise ValueError(f"{key} must be > {self.above:g}, got {v:g}")
            if self.below is not None and v >= self.below:
                raise ValueError(f"{key} must be < {self.below:g}, got {v:g}")


SEARCH_RULES: dict[str, _Rule] = {
    "learning_rate": _Rule(above=0),
    "batch_size": _Rule(integer=True, minimum=1, maximum=MAX_BATCH_SIZE),
    "dropout": _Rule(minimum=0, below=1),
    "weight_decay": _Rule(minimum=0),
    "momentum": _Rule(minimum=0, below=1),
    "grad_clip_norm": _Rule(above=0),
    "n_layers": _Rule(integer=True, minimum=1, maximum=MAX_LAYERS),
    "hidden_units": _Rule(integer=True, minimum=1, maximum=MAX_UNITS),
    "optimizer": _Rule(names=OptimizerName.__args__),
    "scheduler": _Rule(names=SchedulerName.__args__),
    "activation": _Rule(names=Activation.__args__),
    "init": _Rule(names=Init.__args__),
    "batch_norm": _Rule(names=(True, False)),
}
INTEGER_KEYS = frozenset(k for k, r in SEARCH_RULES.items() if r.integer)


class SearchSpace(_Strict):
    learning_rate: Dimension | None = None
    batch_size: Dimension | None = None
    dropout: Dimension | None = None
    weight_decay: Dimension | None = None
    momentum: Dimension | None = None
    grad_clip_norm: Dimension | None = None
    n_layers: Dimension | None = None
    hidden_units: Dimension | None = None
    optimizer: Dimension | None = None
    scheduler: Dimension | None = None
    activation: Dimension | None = None
    init: Dimension | None = None
    batch_norm: Dimension | None = None

    @field_validator("*")
    @classmethod
    def _fits_key(cls, dim: Dimension | None, info: Any) -> Dimension | None:
        if dim is not None:
            SEARCH_RULES[info.field_name].check(info.field_name, dim)
        return dim

    def dimensions(self) -> dict[str, Dimension]:
        """The searched keys in a stable order (the order of the fields above)."""
        return {
            k: getattr(self, k) for k in type(self).model_fields if getattr(self, k) is not None
        }

    def fit(self, params: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """A configuration (param name -> value) as this space holds it (`Dimension.fit`),
        in the space's order, and (name, reason) for each param it does not hold: a name
        it does not search, a value of the wrong type, out of bounds, off the step or not
        among the choices. A configuration may leave params out (the sampler draws them)."""
        dims = self.dimensions()
        fitted: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        for name, value in params.items():
            if name not in dims:
                searched = ", ".join(dims) or "nothing"
                problems.append((name, f"not in the study's search space (it searches {searched})"))
                continue
            try:
                fitted[name] = dims[name].fit(value, name in INTEGER_KEYS)
            except ValueError as exc:
                problems.append((name, str(exc)))
        return {k: fitted[k] for k in dims if k in fitted}, problems


# --- objective, sampler, pruner, budget ------------------------------------------------


class ObjectiveSpec(_Strict):
    metric: Metric
    direction: Direction | None = None

    @model_validator(mode="after")
    def _direction_fits_metric(self) -> ObjectiveSpec:
        natural = "maximize" if self.metric in MAXIMIZED_METRICS else "minimize"
        if self.direction is None:
            object.__setattr__(self, "direction", natural)
        elif self.direction != natural:
            raise ValueError(f"{self.metric} is to {natural}, not {self.direction}")
        return self


# Start-up trials (on a Latin hypercube) before a model-based sampler takes over, where the
# default is not 10. On bench/lcbench.py's development tasks (20 seeds) bayes reached a lower
# regret at 30 trials with 5 random ones than with 10 (0.058 against 0.072, standard errors
# 0.005 and 0.006), and within noise of 10 on bench/samplers.py's mixed-5d. tpe on the Latin
# start-up, 40 seeds: 0.259 after 10 trials with 5 against 0.314 with 10 (20 seeds), the same
# at 30 (0.119 and 0.122); on mixed-5d, 100 seeds, 0.050 against 10 random ones' 0.050. gp,
# 20 seeds: 0.193 ± 0.011 after 10 trials with 5 against 0.300 ± 0.013 with 10, the same at
# 30 (0.034 ± 0.004 and 0.032 ± 0.004).
STARTUP_TRIALS = {"bayes": 5, "gp": 5, "tpe": 5}


class SamplerSpec(_Strict):
    """The search's sampler. gp by default: on bench/lcbench.py's development tasks (20 seeds)
    its mean regret at 30 trials was 0.14x random search's, against bayes' 0.30x and tpe's
    0.50x, and the lowest after 10 and 100 trials too (BENCHMARKS.md)."""

    name: Literal["tpe", "bayes", "gp", "random", "cmaes", "grid"] = "gp"
    seed: Seed | None = 0
    n_startup_trials: int | None = Field(
        None,
        ge=0,
        le=MAX_COUNT,
        description="start-up trials before the model takes over: 5 for gp, bayes and tpe, else 10",
    )

    @model_validator(mode="after")
    def _default_startup_trials(self) -> SamplerSpec:
        if self.n_startup_trials is None:
            object.__setattr__(self, "n_startup_trials", STARTUP_TRIALS.get(self.name, 10))
        return self


class PrunerSpec(_Strict):
    name: Literal["none", "median", "percentile", "sha", "hyperband"] = "none"
    n_startup_trials: int = Field(
        5, ge=0, le=MAX_COUNT, description="median/percentile: trials before pruning"
    )
    # 5, not Optuna's 0 or our former 2: on bench/lcbench.py's development tasks (tpe, 10
    # seeds) the median pruner after 2 epochs left a mean regret of 0.093 at 100 trials and
    # 0.104 at 40% of their epochs, after 5 epochs 0.064 and 0.084: early epochs mislead.
    n_warmup_steps: int = Field(
        5, ge=0, le=MAX_COUNT, description="median/percentile: epochs before pruning"
    )
    percentile: float = Field(25.0, gt=0, lt=100)
    min_resource: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="sha/hyperband: epochs of the first rung (default 1 for sha; for "
        "hyperband max_epochs / 16, at least 1)",
    )
    reduction_factor: int | None = Field(
        None,
        ge=2,
        le=MAX_COUNT,
        description="sha/hyperband: 1 in this many trials goes on at each rung",
    )

    @model_validator(mode="after")
    def _default_reduction_factor(self) -> PrunerSpec:
        """3 for sha (Optuna's default), 4 for hyperband. On bench/search_quality.py's
        digits study (held-out seeds 100-109) hyperband trained 41% of no pruning's epochs
        with 3 and 36% with 4, the best trials' val and test accuracy within noise of each
        other. 4 is within the Hyperband paper's advice (3 or 4); 5 saved little more (35%)
        and has at most 3 brackets (successive halvings) below 125 epochs."""
        if self.reduction_factor is None:
            factor = 4 if self.name == "hyperband" else 3
            object.__setattr__(self, "reduction_factor", factor)
        return self


class BudgetSpec(_Strict):
    n_trials: int = Field(ge=1, le=MAX_COUNT)
    timeout_s: float | None = Field(None, gt=0)


class WarmStartSpec(_Strict):
    """Seed the study, when it is created, with the best `top` complete configurations of
    another study of the same database that fit its search space (`service.enqueue`)."""

    study: str = Field(
        min_length=1,
        max_length=64,
        description="the name of a study in the same database",
        json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"},
    )
    top: int = Field(ge=1, le=MAX_ENQUEUED, description="configurations to take, best first")


# --- the study -------------------------------------------------------------------------


class StudySpec(_Strict):
    # The pattern is documented in the JSON schema; `_valid_name` checks it with a message.
    name: str = Field(json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"})
    dataset: DatasetSpec
    task: Task | None = None
    split: SplitSpec = SplitSpec()
    model: ModelSpec = ModelSpec()
    search_space: SearchSpace = SearchSpace()
    training: TrainingSpec = TrainingSpec()
    objective: ObjectiveSpec | None = None
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    budget: BudgetSpec
    warm_start: WarmStartSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_nul_characters(cls, data: Any) -> Any:
        """No string of the spec, key or value, may hold a NUL character: PostgreSQL cannot
        store one, and no file, column or name has one."""
        loc = _nul_location(data)
        if loc is not None:
            raise _FieldError(loc, "must not contain the NUL character (\\u0000)")
        return data

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                "must start with a lower-case letter and use only a-z, 0-9, '_' and '-' "
                "(at most 64 characters)"
            )
        return name

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        task = self.task or _implied_task(self)
        if task is not None:
            _check_task_fits_dataset(task, self.dataset)
            object.__setattr__(self, "task", task)
        if self.objective is None and task is not None:
            object.__setattr__(self, "objective", ObjectiveSpec(metric=DEFAULT_METRIC[task]))
        if self.objective is not None and task is not None:
            allowed = METRICS_BY_TASK[task]
            if self.objective.metric not in allowed:
                raise _FieldError(
                    ("objective", "metric"),
                    f"{self.objective.metric} does not fit a {task} task; "
                    f"use one of {', '.join(allowed)}",
                )
        if self.pruner.min_resource is None:  # a copy: the default PrunerSpec is shared
            resolved = self.pruner.model_copy(update={"min_resource": _default_min_resource(self)})
            object.__setattr__(self, "pruner", resolved)
        if self.sampler.name == "grid":
            _check_grid(self.search_space)
        if self.warm_start is not None:
            _check_warm_start(self)
        return self

    def with_task(self, task: Task) -> StudySpec:
        """This spec with the task that loading the data revealed (for file datasets)."""
        data = self.model_dump(mode="json")
        data["task"] = task
        return StudySpec.model_validate(data)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


HYPERBAND_FIRST_RUNG_DIVISOR = 16


def _default_min_resource(spec: StudySpec) -> int:
    """The first rung: 1 epoch for sha; for hyperband a sixteenth of max_epochs. On
    bench/lcbench.py's development tasks (52 epochs, tpe, 10 seeds) hyperband from 1 epoch
    left a mean regret of 0.20 at 40% of no pruning's epochs, from 3 epochs 0.09: the first
    epochs rank a network's learning curve poorly."""
    if spec.pruner.name != "hyperband":
        return 1
    return max(1, spec.training.max_epochs // HYPERBAND_FIRST_RUNG_DIVISOR)


class _FieldError(ValueError):
    """A cross-field error that belongs to one field, so the message can name its path."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _nul_location(data: Any, loc: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path of the first string (or key) in `data` that holds a NUL character."""
    if isinstance(data, str):
        return loc if "\x00" in data else None
    if isinstance(data, dict):
        for key, value in data.items():
            here = (*loc, str(key).replace("\x00", "\\u0000"))
            if isinstance(key, str) and "\x00" in key:
                return here
            if (found := _nul_location(value, here)) is not None:
                return found
    if isinstance(data, list | tuple):
        for i, value in enumerate(data):
            if (found := _nul_location(value, (*loc, str(i)))) is not None:
                return found
    return None


def _check_grid(space: SearchSpace) -> None:
    """Every searched key finite, and the grid small enough to hold in memory (counted
    without building it)."""
    points = 1
    for key, dim in space.dimensions().items():
        if dim.is_range and dim.step is None and key not in INTEGER_KEYS:
            raise _FieldError(
                ("search_space", key),
                "the grid sampler needs a finite set: give choices or a step",
            )
        points *= dim.count()
        if points > MAX_GRID_POINTS:
            raise _FieldError(
                ("search_space", key),
                f"the grid has more than {MAX_GRID_POINTS:,} points; search fewer values "
                "or use another sampler",
            )


def _check_warm_start(spec: StudySpec) -> None:
    """Configurations to enqueue need a sampler that draws around them and room in the
    budget; they come from another study."""
    warm = spec.warm_start
    assert warm is not None
    if not NAME_PATTERN.fullmatch(warm.study):
        raise _FieldError(("warm_start", "study"), "is not a study name")
    if warm.study == spec.name:
        raise _FieldError(("warm_start", "study"), "a study cannot warm-start from itself")
    if spec.sampler.name == "grid":
        raise _FieldError(
            ("warm_start",),
            "a grid study trains every point of its grid once, in its own order; "
            "warm starts need another sampler",
        )
    if warm.top > spec.budget.n_trials:
        raise _FieldError(
            ("warm_start", "top"),
            f"{warm.top} configurations do not fit a budget of {spec.budget.n_trials} "
            "trials (budget.n_trials)",
        )


def _implied_task(spec: StudySpec) -> Task | None:
    dataset = spec.dataset
    if isinstance(dataset, BuiltinDataset):
        return BUILTIN_TASKS[dataset.name]
    if isinstance(dataset, SyntheticDataset):
        return dataset.task
    if isinstance(dataset, FileDataset) and isinstance(dataset.target, list):
        return "multilabel"
    if spec.objective is not None:
        if spec.objective.metric in METRICS_BY_TASK["regression"][2:]:
            return "regression"
        if spec.objective.metric in ("val_accuracy", "val_f1"):
            return "classification"
    return None  # decided from the target column when the data is read


def _check_task_fits_dataset(task: str, dataset: Any) -> None:
    if isinstance(dataset, BuiltinDataset) and BUILTIN_TASKS[dataset.name] != task:
        raise _FieldError(
            ("task",), f"{dataset.name} is a {BUILTIN_TASKS[dataset.name]} data set, not {task}"
        )
    if isinstance(dataset, SyntheticDataset) and dataset.task != task:
        raise _FieldError(("task",), f"the synthetic data set is {dataset.task}, not {task}")
    if isinstance(dataset, FileDataset) and isinstance(dataset.target, list) != (
        task == "multilabel"
    ):
        raise _FieldError(("task",), "a list of target columns means multilabel, and only then")


# --- loading ---------------------------------------------------------------------------


def parse_spec(data: Any) -> StudySpec:
    """Validate a parsed document; raise SpecError listing every field and reason."""
    if not isinstance(data, dict):
        raise SpecError([("", f"a study spec is a mapping of keys, got {type(data).__name__}")])
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_field_errors(exc)) from None


def load_spec(path: str | Path) -> StudySpec:
    """Read a YAML or JSON spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([("", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(
            [("", f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")]
        ) from None
    return parse_spec(data)


_UNION_TAGS = {"builtin", "synthetic", "file", "uploaded"}


def _field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    return field_errors(exc.errors())


def field_errors(errors: Any) -> list[tuple[str, str]]:
    """(dotted field path, reason) for each of pydantic's errors about a spec, with the
    union's tag left out of the path (`dataset.name`, not `dataset.builtin.name`)."""
    found = []
    for err in errors:
        loc = tuple(str(p) for p in err["loc"])
        message = err["msg"]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):
            loc, message = loc + ctx_error.loc, str(ctx_error)
        message = message.removeprefix("Value error, ")
        if len(loc) >= 2 and loc[0] == "dataset" and loc[1] in _UNION_TAGS:
            loc = loc[:1] + loc[2:]
        found.append((".".join(loc), message))
    return found
