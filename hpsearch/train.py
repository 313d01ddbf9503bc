"""Training one trial: a BP network on device-resident data, reported every epoch.

Batches are index slices of a per-epoch permutation of tensors that already live on the
device (no DataLoader, no host-to-device copies), and the loss is read back once per epoch,
so the host never waits on the device inside an epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hpsearch.data import TensorData
from hpsearch.model import build_mlp
from hpsearch.spec import StudySpec

_EVAL_CHUNK = 65536
# A training loss this many times the untrained network's means the weights blew up, even
# when gradient clipping keeps it finite: healthy training never climbs that far above it.
EXPLOSION_FACTOR = 10.0  # rows per forward pass when evaluating, to bound memory on big sets


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
    seed: int
    metric: str  # the objective, without the "val_" prefix: loss, accuracy, f1, rmse, mae, r2
    maximize: bool

    @classmethod
    def from_spec(cls, spec: StudySpec, params: dict[str, Any]) -> TrialConfig:
        settings = spec.training.model_dump() | spec.model.model_dump() | params
        hidden = list(spec.model.hidden)
        if "n_layers" in params or "hidden_units" in params:
            width = params.get("hidden_units", hidden[0] if hidden else 64)
            hidden = [int(width)] * int(params.get("n_layers", len(hidden)))
        return cls(
            hidden=tuple(hidden),
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


@dataclass
class TrainResult:
    value: float  # best objective reached (what the sampler is told)
    best_epoch: int  # 0 = the untrained network
    epochs_run: int
    stopped_early: bool
    diverged: bool
    pruned: bool
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    seconds: float
    history: list[EpochRecord] = field(default_factory=list)
    model: nn.Module | None = None

    def history_rows(self) -> list[dict[str, float]]:
        return [asdict(r) for r in self.history]


# Called after every epoch; returns True when the trial should stop as pruned.
EpochCallback = Callable[[EpochRecord], bool]


def train(
    config: TrialConfig, data: TensorData, on_epoch: EpochCallback | None = None
) -> TrainResult:
    """Train one network and return its best objective, with the best weights restored.

    A loss that turns NaN or infinite, or explodes past EXPLOSION_FACTOR times the untrained
    network's, stops the run at once; the result then carries the best value reached before
    (the untrained network's if none), so a sampler learns that the region is bad instead of
    receiving NaN or the lucky accuracy of a network with exploded weights.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = data.device
    model = build_model(config, data).to(device)
    loss_fn = _loss_function(data.task)
    optimizer = _optimizer(config, model, device)
    scheduler = _scheduler(config, optimizer)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    untrained = evaluate(model, data.x_val, data.y_val, data, loss_fn)
    explosion = EXPLOSION_FACTOR * max(untrained["loss"], 1.0)
    best_value, best_epoch, best_state = untrained[config.metric], 0, _snapshot(model)
    history: list[EpochRecord] = []
    diverged = pruned = stopped_early = False
    for epoch in range(1, config.max_epochs + 1):
        train_loss = _train_epoch(model, data, loss_fn, optimizer, config, generator)
        val = evaluate(model, data.x_val, data.y_val, data, loss_fn)
        if not (math.isfinite(train_loss) and math.isfinite(val["loss"])) or train_loss > explosion:
            diverged = True
            break
        lr = optimizer.param_groups[0]["lr"]
        record = EpochRecord(epoch, train_loss, val["loss"], val[config.metric], lr)
        history.append(record)
        if best_epoch == 0 or _better(record.value, best_value, config.maximize):
            best_value, best_epoch, best_state = record.value, epoch, _snapshot(model)
        if on_epoch is not None and on_epoch(record):
            pruned = True
            break
        patience = config.early_stopping_patience
        if patience is not None and epoch - best_epoch >= patience:
            stopped_early = epoch < config.max_epochs
            break
        _step_scheduler(scheduler, val["loss"])

    model.load_state_dict(best_state)
    return TrainResult(
        value=best_value,
        best_epoch=best_epoch,
        epochs_run=len(history) + int(diverged),
        stopped_early=stopped_early,
        diverged=diverged,
        pruned=pruned,
        val_metrics=_prefixed("val", evaluate(model, data.x_val, data.y_val, data, loss_fn)),
        test_metrics=_prefixed("test", evaluate(model, data.x_test, data.y_test, data, loss_fn)),
        seconds=time.perf_counter() - started,
        history=history,
        model=model,
    )


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
) -> float:
    """One pass over a fresh permutation; the summed loss stays on the device until the end."""
    model.train()
    n = data.x_train.shape[0]
    order = torch.randperm(n, device=data.device, generator=generator)
    total = torch.zeros((), device=data.device)
    params = list(model.parameters())
    for start in range(0, n, config.batch_size):
        index = order[start : start + config.batch_size]
        if index.numel() < 2 and config.batch_norm:
            continue  # batch norm cannot normalise a single row
        loss = loss_fn(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip_norm:
            nn.utils.clip_grad_norm_(params, config.grad_clip_norm, foreach=True)
        optimizer.step()
        total += loss.detach() * index.numel()
    return (total / n).item()


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: TensorData, loss_fn: nn.Module
) -> dict[str, float]:
    """Loss and the task's metrics on one split, read back from the device in one transfer."""
    if x.shape[0] == 0:
        return {}
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + _EVAL_CHUNK]) for i in range(0, x.shape[0], _EVAL_CHUNK)])
    model.train(was_training)
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
    values = torch.stack([v.float() for v in metrics.values()]).tolist()
    return dict(zip(metrics, values, strict=True))


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


def _optimizer(
    config: TrialConfig, model: nn.Module, device: torch.device
) -> torch.optim.Optimizer:
    params, lr, wd = model.parameters(), config.learning_rate, config.weight_decay
    fused = {"fused": True} if device.type == "cuda" else {}
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **fused)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=config.momentum)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
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
