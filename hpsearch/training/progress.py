"""A trial's progress through its epochs, and the rules that end its run.

Single-trial training keeps one `Progress`, a fused pack one per member, and both let it
decide how every epoch ends: a trial then stops at the same epoch, for the same reason,
whether it trains alone or in a pack.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

if TYPE_CHECKING:
    from hpsearch.training.train import TrialConfig

# A training loss this many times the untrained network's means the weights blew up, even
# when gradient clipping keeps it finite: healthy training never climbs that far above it.
EXPLOSION_FACTOR = 10.0

# How a run ended; "interrupted" runs are continued from the checkpoint they handed out.
Ending = Literal["completed", "diverged", "pruned", "stopped_early", "interrupted"]
# How a training path keeps the best weights: a state_dict alone, slices of stacked
# tensors in a pack. Progress only holds them.
State = TypeVar("State")


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    value: float  # the objective on the validation set
    lr: float
    # The gradient norm of each layer's weights (first to last) on the epoch's last full
    # batch: one reading per epoch, enough to see gradients vanish or explode.
    grad_norms: tuple[float, ...] = ()


# Called after every epoch; returns True when the trial should stop as pruned.
EpochCallback = Callable[[EpochRecord], bool]


@dataclass
class Progress(Generic[State]):
    """Where one trial's run stands: its recorded epochs, the best value with its epoch and
    weights, the training loss that counts as an explosion, and the time spent before the
    checkpoint it resumed from. Exactly what a checkpoint carries of a run besides its
    network and optimiser."""

    config: TrialConfig
    best_value: float
    best_state: State
    explosion: float  # a training loss above this means the weights blew up
    best_epoch: int = 0  # 0 = the untrained network
    history: list[EpochRecord] = field(default_factory=list)
    seconds_before: float = 0.0  # spent in the runs before the checkpoint resumed from
    resumed_from_epoch: int | None = None

    @classmethod
    def untrained(cls, config: TrialConfig, val: dict[str, float], state: State) -> Progress[State]:
        """A fresh run: the untrained network (validation metrics `val`, weights `state`)
        is the first best, so a run that diverges at once still reports a real value, and
        its loss is the yardstick for explosions."""
        return cls(
            config,
            best_value=val[config.metric],
            best_state=state,
            explosion=EXPLOSION_FACTOR * max(val["loss"], 1.0),
        )

    @property
    def epoch(self) -> int:
        """The last epoch completed (every recorded epoch; a diverged one is never kept)."""
        return len(self.history)

    def seconds(self, started: float) -> float:
        """Training time so far: the runs before the checkpoint resumed from, and this one
        since `started` (a `time.perf_counter()` reading)."""
        return self.seconds_before + time.perf_counter() - started

    def end_epoch(
        self,
        train_loss: float,
        grad_norms: tuple[float, ...],
        val: dict[str, float],
        lr: float,
        snapshot: Callable[[], State],
        on_epoch: EpochCallback | None,
    ) -> Ending | None:
        """Record the epoch just trained and decide whether it ends the run (None: go on).

        A diverged epoch is not recorded: its value would tell the sampler the lucky score
        of exploded weights. `snapshot` takes the weights, called only when the epoch is the
        best so far (copying them every epoch would cost a pass over them). `on_epoch` sees
        the record and prunes the trial by returning True.
        """
        if self._diverged(train_loss, val["loss"]):
            return "diverged"
        epoch, value = self.epoch + 1, val[self.config.metric]
        record = EpochRecord(epoch, train_loss, val["loss"], value, lr, grad_norms)
        self.history.append(record)
        if self.best_epoch == 0 or self._better(record.value):
            self.best_value, self.best_epoch = record.value, epoch
            self.best_state = snapshot()
        if on_epoch is not None and on_epoch(record):
            return "pruned"
        if epoch >= self.config.max_epochs:
            return "completed"
        patience = self.config.early_stopping_patience
        if patience is not None and epoch - self.best_epoch >= patience:
            return "stopped_early"
        return None

    def _diverged(self, train_loss: float, val_loss: float) -> bool:
        """A loss that is NaN or infinite, or a training loss past the explosion threshold."""
        finite = math.isfinite(train_loss) and math.isfinite(val_loss)
        return not finite or train_loss > self.explosion

    def _better(self, value: float) -> bool:
        return value > self.best_value if self.config.maximize else value < self.best_value
