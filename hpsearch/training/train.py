"""Training one trial: a BP network on device-resident data, reported every epoch.

Batches are index slices of a per-epoch permutation of tensors that already live on the
device (no DataLoader, no host-to-device copies), and the loss is read back once per epoch,
so the host never waits on the device inside an epoch.

What decides how an epoch ends (`progress.Progress`), the checkpoint format
(`checkpoint.Checkpoint`) and the result (`TrainResult.build`) are shared with a fused pack
(`fused`), so a trial trains, checkpoints and reports the same alone or in a pack.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hpsearch.data.memory import EVAL_CHUNK_ROWS
from hpsearch.data.tensors import TensorData
from hpsearch.spec import StudySpec
from hpsearch.training.checkpoint import Checkpoint, CheckpointSchedule
from hpsearch.training.model import build_mlp
from hpsearch.training.progress import Ending, EpochCallback, EpochRecord, Progress

# EpochRecord and EpochCallback live with the progress they record; callers import them here.


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
    # What a model file (`modelfile.model_file`) needs besides the model: its architecture
    # and the data's encoding, standardisation and labels.
    config: TrialConfig | None = None
    data: TensorData | None = None

    @classmethod
    def build(
        cls,
        progress: Progress[Any],
        ending: Ending,
        model: nn.Module,
        data: TensorData,
        loss_fn: nn.Module,
        started: float,
    ) -> TrainResult:
        """The result of a run begun at `started` that ended as `ending`, `model` holding its
        best weights, scored on val and test: the one place single runs and packs make
        their results, so a trial reports the same alone or in a pack."""
        return cls(
            value=progress.best_value,
            best_epoch=progress.best_epoch,
            epochs_run=progress.epoch + int(ending == "diverged"),
            stopped_early=ending == "stopped_early",
            diverged=ending == "diverged",
            pruned=ending == "pruned",
            val_metrics=_prefixed("val", evaluate(model, data.x_val, data.y_val, data, loss_fn)),
            test_metrics=_prefixed(
                "test", evaluate(model, data.x_test, data.y_test, data, loss_fn)
            ),
            seconds=progress.seconds(started),
            history=progress.history,
            model=model,
            interrupted=ending == "interrupted",
            resumed_from_epoch=progress.resumed_from_epoch,
            config=progress.config,
            data=data,
        )

    def history_rows(self) -> list[dict[str, float]]:
        return [asdict(r) for r in self.history]


# Receives a checkpoint (train's `resume_from` takes it back) and the epoch it was taken after.
CheckpointCallback = Callable[[bytes, int], None]


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

    A loss that turns NaN or infinite, or explodes past `progress.EXPLOSION_FACTOR` times
    the untrained network's, stops the run at once; the result then carries the best value
    reached before (the untrained network's if none), so a sampler learns that the region
    is bad instead of receiving NaN or the lucky accuracy of a network with exploded weights.

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
    schedule = CheckpointSchedule(checkpoint_every_s, checkpoint_now, stop_after_checkpoint)
    with matmul_precision(config, data.device):
        run = _Run(config, data, resume_from)
        return run.result(run.fit(on_epoch, on_checkpoint, schedule))


def checkpoint_history(payload: bytes) -> list[EpochRecord]:
    """The epochs a checkpoint holds, for re-reporting them before the run resumes."""
    return Checkpoint.from_bytes(payload).history


class _Run:
    """One trial's training in progress: exactly the state a checkpoint holds."""

    def __init__(self, config: TrialConfig, data: TensorData, resume_from: bytes | None) -> None:
        self.started = time.perf_counter()
        torch.manual_seed(config.seed)
        self.config, self.data, self.device = config, data, data.device
        self.model = build_model(config, data).to(self.device)
        self.loss_fn = loss_function(data.task)
        self.optimizer = make_optimizer(config, self.model)
        self.scheduler = make_scheduler(config, self.optimizer)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.progress: Progress[dict[str, torch.Tensor]] = (
            Progress.untrained(config, self._evaluate_val(), _snapshot(self.model))
            if resume_from is None
            else self._resume(Checkpoint.from_bytes(resume_from))
        )

    def _resume(self, checkpoint: Checkpoint) -> Progress[dict[str, torch.Tensor]]:
        """Continue `checkpoint`: weights and optimiser state on this run's device."""
        checkpoint.restore_into(
            self.config, self.data, self.model, self.optimizer, self.scheduler, self.generator
        )
        best = {k: v.to(self.device) for k, v in checkpoint.best_state.items()}
        return checkpoint.progress(self.config, best)

    def fit(
        self,
        on_epoch: EpochCallback | None,
        on_checkpoint: CheckpointCallback | None,
        schedule: CheckpointSchedule,
    ) -> Ending:
        """Train from the next epoch to the end; returns how the run ended."""
        for _ in range(self.progress.epoch, self.config.max_epochs):
            ending = self._epoch(on_epoch)
            if ending is not None:
                return ending
            if schedule.hand_out_if_due(lambda: self._hand_out(on_checkpoint)):
                return "interrupted"
        return "completed"

    def _epoch(self, on_epoch: EpochCallback | None) -> Ending | None:
        """Train one epoch and let the progress decide whether it ends the run."""
        loss, norms = _train_epoch(
            self.model, self.data, self.loss_fn, self.optimizer, self.config, self.generator
        )
        val = self._evaluate_val()
        lr = self.optimizer.param_groups[0]["lr"]
        snapshot = functools.partial(_snapshot, self.model)
        ending = self.progress.end_epoch(loss, norms, val, lr, snapshot, on_epoch)
        if ending is None:
            step_scheduler(self.scheduler, val["loss"])
        return ending

    def _hand_out(self, on_checkpoint: CheckpointCallback | None) -> None:
        if on_checkpoint is not None:
            on_checkpoint(self.checkpoint().to_bytes(), self.progress.epoch)

    def _evaluate_val(self) -> dict[str, float]:
        return evaluate(self.model, self.data.x_val, self.data.y_val, self.data, self.loss_fn)

    def result(self, ending: Ending) -> TrainResult:
        """The outcome with the best weights restored, scored on val and test."""
        self.model.load_state_dict(self.progress.best_state)
        return TrainResult.build(
            self.progress, ending, self.model, self.data, self.loss_fn, self.started
        )

    def checkpoint(self) -> Checkpoint:
        """Everything needed to continue after this epoch."""
        return Checkpoint.capture(
            self.config,
            self.data,
            self.progress,
            started=self.started,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            generator=self.generator,
            best_state=lambda: self.progress.best_state,
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


@contextlib.contextmanager
def matmul_precision(config: TrialConfig, device: torch.device) -> Iterator[None]:
    """TF32 matmuls on a GPU for a trial whose precision is tf32: fp32 tensors whose products
    round their inputs to 10-bit mantissas, several times faster on Ampere and later GPUs,
    at a loss of precision the spec accepted. The setting is the process's, so it is set
    for the training alone and put back after."""
    if config.precision != "tf32" or device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


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


def loss_function(task: str) -> nn.Module:
    """The task's training loss, which `evaluate` also reports: both training paths must
    optimise and score the same one."""
    return {
        "classification": nn.CrossEntropyLoss(),
        "multilabel": nn.BCEWithLogitsLoss(),
        "regression": nn.MSELoss(),
    }[task]


def make_optimizer(config: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The trial's torch optimizer over `model`: what a single run steps, and the form in
    which a pack's member writes and reads its optimiser state in checkpoints."""
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


def make_scheduler(config: TrialConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The trial's learning-rate scheduler on `optimizer`, None for a constant rate. It adds
    `initial_lr` to the optimizer's param groups, which checkpoints carry."""
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


def step_scheduler(scheduler: Any, val_loss: float) -> None:
    """Step after an epoch that the run goes on from; the plateau scheduler reads the
    validation loss, the others count epochs."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}
