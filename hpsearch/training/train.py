"""Training one trial: a BP network on device-resident data, reported every epoch.

Batches are index slices of a per-epoch permutation of tensors that already live on the
device (no DataLoader, no host-to-device copies), and the loss is read back once per epoch,
so the host never waits on the device inside an epoch.

A run can hand out checkpoints between epochs and be resumed from one, in another process
on another machine, exactly where it stopped (DESIGN.md, "Trial life cycle and crash
safety"): a crash then loses at most the work since the last checkpoint.
"""

from __future__ import annotations

import io
import math
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hpsearch.data.memory import EVAL_CHUNK_ROWS
from hpsearch.data.tensors import TensorData
from hpsearch.spec import StudySpec
from hpsearch.training.model import build_mlp

# A training loss this many times the untrained network's means the weights blew up, even
# when gradient clipping keeps it finite: healthy training never climbs that far above it.
EXPLOSION_FACTOR = 10.0
# Bumped whenever the checkpoint's keys change, so an old payload fails clearly on load.
CHECKPOINT_FORMAT = 1
# Optimiser settings that pick an implementation for the device (fused kernels on CUDA), not
# numbers of the run: a resume keeps its own, so a CUDA checkpoint resumes on a CPU and back.
_DEVICE_FLAGS = ("foreach", "fused", "capturable")


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs: the spec's defaults overlaid with a trial's params."""

    hidden: tuple[int, ...]
    activation: str
    init: str
    batch_norm: bool
    dropout: float
    learning_rate: float
    batch_size: int
    weight_decay: float
    momentum: float
    optimizer: str
    scheduler: str
    max_epochs: int
    early_stopping_patience: int | None
    grad_clip_norm: float | None
    precision: str  # fp32 | bf16 (autocast of the forward pass)
    seed: int
    metric: str  # the objective, without the "val_" prefix: loss, accuracy, f1, rmse, mae, r2
    maximize: bool

    @classmethod
    def from_spec(cls, spec: StudySpec, params: dict[str, Any]) -> TrialConfig:
        settings = spec.training.model_dump() | spec.model.model_dump() | params
        return cls(
            hidden=spec.model.hidden_layers(params),
            activation=settings["activation"],
            init=settings["init"],
            batch_norm=bool(settings["batch_norm"]),
            dropout=float(settings["dropout"]),
            learning_rate=float(settings["learning_rate"]),
            batch_size=int(settings["batch_size"]),
            weight_decay=float(settings["weight_decay"]),
            momentum=float(settings["momentum"]),
            optimizer=settings["optimizer"],
            scheduler=settings["scheduler"],
            max_epochs=spec.training.max_epochs,
            early_stopping_patience=spec.training.early_stopping_patience,
            grad_clip_norm=settings["grad_clip_norm"],
            precision=spec.training.precision,
            seed=spec.training.seed,
            metric=spec.objective.metric.removeprefix("val_"),
            maximize=spec.objective.direction == "maximize",
        )


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


@dataclass
class TrainResult:
    value: float  # best objective reached (what the sampler is told)
    best_epoch: int  # 0 = the untrained network
    epochs_run: int  # including those done before the checkpoint a run resumed from
    stopped_early: bool
    diverged: bool
    pruned: bool
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    seconds: float  # training time, summed over the runs a resumed trial went through
    history: list[EpochRecord] = field(default_factory=list)
    model: nn.Module | None = None
    interrupted: bool = False  # stopped at `checkpoint_now`: resume it from that checkpoint
    resumed_from_epoch: int | None = None  # the epoch of the checkpoint it resumed from

    def history_rows(self) -> list[dict[str, float]]:
        return [asdict(r) for r in self.history]


# Called after every epoch; returns True when the trial should stop as pruned.
EpochCallback = Callable[[EpochRecord], bool]
# Receives a checkpoint (train's `resume_from` takes it back) and the epoch it was taken after.
CheckpointCallback = Callable[[bytes, int], None]
# How a run ended; "interrupted" runs are continued from the checkpoint they handed out.
Ending = Literal["completed", "diverged", "pruned", "stopped_early", "interrupted"]


def train(
    config: TrialConfig,
    data: TensorData,
    on_epoch: EpochCallback | None = None,
    *,
    on_checkpoint: CheckpointCallback | None = None,
    checkpoint_every_s: float = 30.0,
    checkpoint_now: threading.Event | None = None,
    stop_after_checkpoint: bool = False,
    resume_from: bytes | None = None,
) -> TrainResult:
    """Train one network and return its best objective, with the best weights restored.

    A loss that turns NaN or infinite, or explodes past EXPLOSION_FACTOR times the untrained
    network's, stops the run at once; the result then carries the best value reached before
    (the untrained network's if none), so a sampler learns that the region is bad instead of
    receiving NaN or the lucky accuracy of a network with exploded weights.

    Checkpoints: after an epoch that another epoch follows, `on_checkpoint` gets one when
    `checkpoint_every_s` seconds have passed since the last (or since the start; 0 = every
    epoch), or whenever `checkpoint_now` is set. After the final epoch there is none: the
    result is stored then. `checkpoint_now` is only read, so a signal handler or another
    thread may set it; with `stop_after_checkpoint` the run then returns `interrupted`
    after that checkpoint, otherwise the caller clears it (e.g. in `on_checkpoint`).

    `resume_from` continues a checkpoint of the same config and data from its next epoch;
    `on_epoch` is not called for the epochs it holds (see `checkpoint_history`), but they
    are in the result's history.
    """
    run = _Run(config, data, resume_from)
    resumed_from_epoch = None if resume_from is None else run.epoch
    checkpoints = _Checkpoints(on_checkpoint, checkpoint_every_s, checkpoint_now)
    ending = run.fit(on_epoch, checkpoints, stop_after_checkpoint)
    return run.result(ending, resumed_from_epoch)


def checkpoint_history(payload: bytes) -> list[EpochRecord]:
    """The epochs a checkpoint holds, for re-reporting them before the run resumes."""
    return _records(_load_checkpoint(payload)["history"])


@dataclass
class _Checkpoints:
    """When a run hands out a checkpoint: on a timer, or at once while `now` is set."""

    deliver: CheckpointCallback | None
    every_s: float
    now: threading.Event | None
    last: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        return self.forced() or time.monotonic() - self.last >= self.every_s

    def forced(self) -> bool:
        return self.now is not None and self.now.is_set()

    def hand_out(self, run: _Run) -> None:
        if self.deliver is not None:
            self.deliver(run.checkpoint(), run.epoch)
        self.restart()

    def restart(self) -> None:
        """Count the interval from now (a checkpoint was just handed out)."""
        self.last = time.monotonic()


class _Run:
    """One trial's training in progress: exactly the state a checkpoint holds."""

    # Early stopping: set from the untrained network, or from the checkpoint resumed.
    best_value: float
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    explosion: float  # a training loss above this means the weights blew up

    def __init__(self, config: TrialConfig, data: TensorData, resume_from: bytes | None) -> None:
        self.started = time.perf_counter()
        torch.manual_seed(config.seed)
        self.config, self.data, self.device = config, data, data.device
        self.model = build_model(config, data).to(self.device)
        self.loss_fn = _loss_function(data.task)
        self.optimizer = _optimizer(config, self.model)
        self.scheduler = _scheduler(config, self.optimizer)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.history: list[EpochRecord] = []
        self.seconds_before = 0.0  # spent in the runs before the checkpoint resumed from
        if resume_from is None:
            self._start()
        else:
            self._restore(_load_checkpoint(resume_from))

    @property
    def epoch(self) -> int:
        """The last epoch completed (every recorded epoch; a diverged one is never kept)."""
        return len(self.history)

    def _start(self) -> None:
        """The untrained network is the first best and the yardstick for explosions."""
        untrained = self._evaluate_val()
        self.explosion = EXPLOSION_FACTOR * max(untrained["loss"], 1.0)
        self.best_value, self.best_epoch = untrained[self.config.metric], 0
        self.best_state = _snapshot(self.model)

    def fit(self, on_epoch: EpochCallback | None, checkpoints: _Checkpoints, stop: bool) -> Ending:
        """Train from the next epoch to the end; returns how the run ended."""
        for epoch in range(self.epoch + 1, self.config.max_epochs + 1):
            record = self._run_epoch(epoch)
            if record is None:
                return "diverged"
            if on_epoch is not None and on_epoch(record):
                return "pruned"
            patience = self.config.early_stopping_patience
            if patience is not None and epoch - self.best_epoch >= patience:
                return "stopped_early" if epoch < self.config.max_epochs else "completed"
            _step_scheduler(self.scheduler, record.val_loss)
            if epoch < self.config.max_epochs and checkpoints.due():
                forced = checkpoints.forced()
                checkpoints.hand_out(self)
                if forced and stop:
                    return "interrupted"
        return "completed"

    def _run_epoch(self, epoch: int) -> EpochRecord | None:
        """One epoch, recorded and kept as the best if it is; None when the loss diverged."""
        loss, norms = _train_epoch(
            self.model, self.data, self.loss_fn, self.optimizer, self.config, self.generator
        )
        val = self._evaluate_val()
        if not (math.isfinite(loss) and math.isfinite(val["loss"])) or loss > self.explosion:
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        record = EpochRecord(epoch, loss, val["loss"], val[self.config.metric], lr, norms)
        self.history.append(record)
        if self.best_epoch == 0 or _better(record.value, self.best_value, self.config.maximize):
            self.best_value, self.best_epoch = record.value, epoch
            self.best_state = _snapshot(self.model)
        return record

    def _evaluate_val(self) -> dict[str, float]:
        return evaluate(self.model, self.data.x_val, self.data.y_val, self.data, self.loss_fn)

    def result(self, ending: Ending, resumed_from_epoch: int | None) -> TrainResult:
        """The outcome with the best weights restored, scored on val and test."""
        self.model.load_state_dict(self.best_state)
        data = self.data
        return TrainResult(
            value=self.best_value,
            best_epoch=self.best_epoch,
            epochs_run=self.epoch + int(ending == "diverged"),
            stopped_early=ending == "stopped_early",
            diverged=ending == "diverged",
            pruned=ending == "pruned",
            val_metrics=_prefixed("val", self._evaluate_val()),
            test_metrics=_prefixed(
                "test", evaluate(self.model, data.x_test, data.y_test, data, self.loss_fn)
            ),
            seconds=self._seconds(),
            history=self.history,
            model=self.model,
            interrupted=ending == "interrupted",
            resumed_from_epoch=resumed_from_epoch,
        )

    def _seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def checkpoint(self) -> bytes:
        """Everything needed to continue after this epoch, as tensors and plain values on
        the CPU, so `torch.load(weights_only=True)` reads it on any machine."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "data": _data_shape(self.data),
            "epoch": self.epoch,
            "seconds": self._seconds(),
            "history": [asdict(r) for r in self.history],
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": _rng_state(self.generator, self.device),
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "explosion": self.explosion,
        }
        buffer = io.BytesIO()
        torch.save(_to_cpu(state), buffer)
        return buffer.getvalue()

    def _restore(self, state: dict[str, Any]) -> None:
        """Put every piece where this run keeps it: weights and optimiser state on its
        device, in the implementation (fused or not) this device uses."""
        _check_fits(state, self.config, self.data)
        self.model.load_state_dict(state["model"])
        _load_optimizer(self.optimizer, state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = _records(state["history"])
        self.seconds_before = state["seconds"]
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.best_state = {k: v.to(self.device) for k, v in state["best_state"].items()}
        self.explosion = state["explosion"]
        _restore_rng(state["rng"], self.generator, self.device, self.config.seed + self.epoch)


def build_model(config: TrialConfig, data: TensorData) -> nn.Sequential:
    """The trial's network; a regression head is flattened to match its [n] targets."""
    model = build_mlp(
        data.n_features,
        data.n_outputs,
        list(config.hidden),
        activation=config.activation,
        init=config.init,
        batch_norm=config.batch_norm,
        dropout=config.dropout,
    )
    if data.task == "regression":
        model.append(nn.Flatten(start_dim=0))
    return model


def _train_epoch(
    model: nn.Module,
    data: TensorData,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrialConfig,
    generator: torch.Generator,
) -> tuple[float, tuple[float, ...]]:
    """One pass over a fresh permutation: the mean training loss and the layers' gradient
    norms on the last full batch, both kept on the device and read back once at the end."""
    model.train()
    n = data.x_train.shape[0]
    order = torch.randperm(n, device=data.device, generator=generator)
    total = torch.zeros((), device=data.device)
    params = list(model.parameters())
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    last_full = max(0, n - config.batch_size) // config.batch_size * config.batch_size
    norms = torch.zeros(len(weights), device=data.device)
    for start in range(0, n, config.batch_size):
        index = order[start : start + config.batch_size]
        if index.numel() < 2 and config.batch_norm:
            continue  # batch norm cannot normalise a single row
        with autocast(config, data.device):
            loss = loss_fn(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if start == last_full:  # before clipping, which would hide an explosion
            norms = torch.stack([w.grad.detach().norm() for w in weights])
        if config.grad_clip_norm:
            nn.utils.clip_grad_norm_(params, config.grad_clip_norm, foreach=True)
        optimizer.step()
        total += loss.detach() * index.numel()
    loss, *layer_norms = torch.cat([(total / n).view(1), norms.float()]).tolist()
    return loss, tuple(layer_norms)


def autocast(config: TrialConfig, device: torch.device) -> torch.autocast:
    """The training forward pass in bf16 when the trial asks for it. Weights, optimizer
    moments, losses and every evaluation stay fp32, so metrics compare across precisions."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: TensorData, loss_fn: nn.Module
) -> dict[str, float]:
    """Loss and the task's metrics on one split, read back from the device in one transfer."""
    if x.shape[0] == 0:
        return {}
    was_training = model.training
    model.eval()
    chunks = range(0, x.shape[0], EVAL_CHUNK_ROWS)
    out = torch.cat([model(x[i : i + EVAL_CHUNK_ROWS]) for i in chunks])
    model.train(was_training)
    metrics = metric_tensors(out, y, data, loss_fn)
    values = torch.stack([v.float() for v in metrics.values()]).tolist()
    return dict(zip(metrics, values, strict=True))


def metric_tensors(
    out: torch.Tensor, y: torch.Tensor, data: TensorData, loss_fn: nn.Module
) -> dict[str, torch.Tensor]:
    """Loss and the task's metrics of the outputs `out` for targets `y`, still on the device
    (so a caller can read many back in one transfer)."""
    metrics = {"loss": loss_fn(out, y)}
    if data.task == "regression":
        pred, true = out * data.y_std + data.y_mean, y * data.y_std + data.y_mean
        residual = pred - true
        metrics["rmse"] = residual.square().mean().sqrt()
        metrics["mae"] = residual.abs().mean()
        metrics["r2"] = 1 - residual.square().sum() / (true - true.mean()).square().sum().clamp_min(
            1e-12
        )
    elif data.task == "multilabel":
        pred = out > 0
        truth = y > 0.5
        metrics["accuracy"] = (pred == truth).all(dim=1).float().mean()
        metrics["f1"] = _macro_f1(pred, truth)
    else:
        pred = out.argmax(dim=1)
        metrics["accuracy"] = (pred == y).float().mean()
        n_classes = out.shape[1]
        metrics["f1"] = _macro_f1(
            nn.functional.one_hot(pred, n_classes).bool(),
            nn.functional.one_hot(y, n_classes).bool(),
        )
    return metrics


def _macro_f1(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Macro F1 over the classes (columns) that occur in the truth or the predictions."""
    tp = (pred & truth).sum(dim=0).float()
    fp = (pred & ~truth).sum(dim=0).float()
    fn = (~pred & truth).sum(dim=0).float()
    present = (tp + fp + fn) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    return f1[present].mean() if bool(present.any()) else torch.zeros((), device=pred.device)


def _loss_function(task: str) -> nn.Module:
    return {
        "classification": nn.CrossEntropyLoss(),
        "multilabel": nn.BCEWithLogitsLoss(),
        "regression": nn.MSELoss(),
    }[task]


def _optimizer(config: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    params, lr, wd = model.parameters(), config.learning_rate, config.weight_decay
    # The fused kernels (CPU and CUDA) update every parameter in one pass per tensor: for
    # the small steps of an MLP the optimiser is otherwise a quarter of a step's time.
    # RMSprop has no fused kernel; it gets the multi-tensor (foreach) one.
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=config.momentum, fused=True)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd, foreach=True)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def _scheduler(config: TrialConfig, optimizer: torch.optim.Optimizer) -> Any:
    lr_scheduler = torch.optim.lr_scheduler
    if config.scheduler == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=3)
    if config.scheduler == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_epochs)
    if config.scheduler == "step":
        return lr_scheduler.StepLR(optimizer, step_size=max(1, config.max_epochs // 3), gamma=0.1)
    if config.scheduler == "exponential":
        return lr_scheduler.ExponentialLR(optimizer, gamma=0.95)
    return None


def _step_scheduler(scheduler: Any, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _better(value: float, best: float, maximize: bool) -> bool:
    return value > best if maximize else value < best


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


# --- checkpoints -----------------------------------------------------------------------


def _load_checkpoint(payload: bytes) -> dict[str, Any]:
    """The payload's contents on the CPU; only tensors and plain values are unpickled, so a
    payload from the database can never run code."""
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as exc:
        raise ValueError(f"not a readable hpsearch checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not an hpsearch checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def _data_shape(data: TensorData) -> dict[str, Any]:
    return {"task": data.task, "n_features": data.n_features, "n_outputs": data.n_outputs}


def _check_fits(state: dict[str, Any], config: TrialConfig, data: TensorData) -> None:
    """Refuse a checkpoint of another config or data, naming every difference, rather than
    load weights of the wrong shape or continue a different trial."""
    saved = state["config"] | state["data"]
    here = asdict(config) | _data_shape(data)
    differences = [
        f"{key} is {saved.get(key)!r} in the checkpoint but {value!r} here"
        for key, value in here.items()
        if saved.get(key) != value
    ]
    if differences:
        raise ValueError("checkpoint does not match this trial: " + "; ".join(differences))


def _records(rows: list[dict[str, Any]]) -> list[EpochRecord]:
    return [EpochRecord(**row | {"grad_norms": tuple(row.get("grad_norms", ()))}) for row in rows]


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The saved numbers (moments, steps, learning rates) with this device's _DEVICE_FLAGS."""
    own = optimizer.param_groups
    groups = [
        group | {flag: mine[flag] for flag in _DEVICE_FLAGS if flag in mine}
        for group, mine in zip(saved["param_groups"], own, strict=True)
    ]
    optimizer.load_state_dict(saved | {"param_groups": groups})


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The random streams training draws from: dropout's (the global CPU or CUDA
    generator) and the batch order's (the run's own generator)."""
    return {
        "device_type": device.type,
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "permutation": generator.get_state(),
    }


def _restore_rng(
    state: dict[str, Any], generator: torch.Generator, device: torch.device, reseed: int
) -> None:
    """Continue the saved streams. CPU and CUDA generators have different states, so after a
    move between them the streams are re-seeded instead: reproducible, though not the
    numbers an uninterrupted run would have drawn."""
    if state["device_type"] != device.type:
        torch.manual_seed(reseed)
        generator.manual_seed(reseed)
        return
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    generator.set_state(state["permutation"])


def _to_cpu(value: Any) -> Any:
    """A copy of nested dicts, lists and tuples with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
