"""Training a pack of trials as one horizontally fused network.

Trials of one study that share an architecture differ only in numbers: learning rate,
dropout, weight decay, momentum, gradient clipping, batch size. Their weights are stacked
(`[K, in, out]` per layer) and trained together with batched matmuls, so one kernel does the
work of K and a small network keeps a GPU busy instead of waiting on the host between tiny
kernels. On a CPU the same code saves the per-step Python and dispatch overhead K times,
but the stacked tensors no longer fit the caches, so there it is about as fast as K
trials one after the other (BENCHMARKS.md, "Throughput").

Batch sizes: every member keeps its own. An epoch is `ceil(n / b_k)` steps for member k,
each an index slice of its own permutation of the training rows, exactly the batches it
would see alone. Fused step s trains every member that still has a step s in the epoch.
Members are kept sorted by batch size, largest first, so those still stepping are always a
contiguous slice `[lo:]` of the stacked tensors (a view, no copy), and the large-batch
members finish their epoch first. A step pads each member's batch to a common width, the
padding rows weighted 0 in the loss: on a GPU the whole slice to its largest batch (one set
of kernels; launches, not rows, cost time there), on a CPU runs of members whose batch sizes
are within WIDTH_RATIO of each other, each to its own largest (arithmetic costs time there).
Only the interleaving with the other members differs from training alone, and the dropout
masks, which come from the pack's own random stream.

Per member: learning rate and its scheduler, optimiser state and step count, gradient-norm
clipping, early stopping with the best weights kept, divergence, pruning. A member that
stops leaves the pack at once (`on_done` gets its result), and the others go on in smaller
tensors.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from hpsearch.data.tensors import TensorData
from hpsearch.training.checkpoint import Checkpoint, CheckpointSchedule
from hpsearch.training.model import ACTIVATIONS
from hpsearch.training.progress import Ending, EpochRecord, Progress
from hpsearch.training.train import (
    TrainResult,
    TrialConfig,
    build_model,
    loss_function,
    make_optimizer,
    make_scheduler,
    matmul_precision,
    metric_tensors,
    step_scheduler,
)

WIDTH_RATIO = 1.5  # on a CPU, batch sizes padded to one width differ by less than this
_EVAL_CHUNK = 16384  # validation rows per fused forward pass, to bound K x rows x width
_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as the single-trial path uses
_ADAM_EPS = 1e-8
_RMSPROP_ALPHA, _RMSPROP_EPS = 0.99, 1e-8

# Called after each epoch of a member with its position in the caller's list; True prunes it.
MemberEpoch = Callable[[int, EpochRecord], bool]
# Called once when a member leaves the pack, with its position and its result.
MemberDone = Callable[[int, TrainResult], None]
# Receives a member's checkpoint (`Checkpoint.to_bytes`, as `train` hands them out, so
# either path resumes it) and the epoch it was taken after.
MemberCheckpoint = Callable[[int, bytes, int], None]


@dataclass(frozen=True)
class StepSettings:
    """What a pack's step does, fixed while its members are: constants to a compiled step."""

    optimizer: str
    activation: nn.Module
    task: str
    device_type: str
    bf16: bool  # the forward pass under bf16 autocast
    clipping: bool  # some member clips its gradients' norm
    weight_decay: bool  # some member decays its weights


class Columns(NamedTuple):
    """The stepping members' hyperparameters: [K, 1, 1] each but `clip`, [K]."""

    lr: torch.Tensor
    weight_decay: torch.Tensor
    momentum: torch.Tensor
    clip: torch.Tensor
    step: torch.Tensor  # each member's optimiser steps so far, this one included


def _forward(
    x: torch.Tensor,
    params: list[torch.Tensor],
    activation: nn.Module,
    masks: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Members with stacked weights `params` on their own rows: x is [K, rows, features];
    `masks` (one per hidden layer) applies dropout."""
    h = x
    for depth in range(len(params) // 2 - 1):
        h = activation(torch.baddbmm(params[2 * depth + 1], h, params[2 * depth]))
        if masks:
            h = h * masks[depth]
    return torch.baddbmm(params[-1], h, params[-2])


def _row_loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """The loss of every row of every member: [K, rows]."""
    functional = nn.functional
    if task == "regression":
        return (out.squeeze(-1) - y).square()
    if task == "multilabel":
        return functional.binary_cross_entropy_with_logits(out, y, reduction="none").mean(-1)
    k, rows, classes = out.shape
    flat = functional.cross_entropy(out.reshape(-1, classes), y.reshape(-1), reduction="none")
    return flat.view(k, rows)


def _member_losses(
    params: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    real: torch.Tensor,
    masks: list[torch.Tensor],
    settings: StepSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a step differentiates, the sum of the members' mean losses over their real rows
    (padding rows weigh 0), so each member's gradient is that of its own mean loss; and,
    beside it, each member's summed loss."""
    with torch.autocast(settings.device_type, dtype=torch.bfloat16, enabled=settings.bf16):
        row_loss = _row_loss(_forward(x, params, settings.activation, masks), y, settings.task)
    weight = real.to(row_loss.dtype)
    counts = weight.sum(dim=1)
    member_loss = (row_loss * weight).sum(dim=1) / counts
    return member_loss.sum(), member_loss.detach() * counts


Gradients = tuple[list[torch.Tensor], torch.Tensor]


def _eager_gradients(params: list[torch.Tensor], *batch: Any) -> Gradients:
    """The members' gradients and summed losses, by autograd: the cheaper way eagerly."""
    leaves = [p.detach().requires_grad_() for p in params]
    total, losses = _member_losses(leaves, *batch)
    return list(torch.autograd.grad(total, leaves)), losses


def _traced_gradients(params: list[torch.Tensor], *batch: Any) -> Gradients:
    """The same by `torch.func.grad`, which `torch.compile` traces whole where it breaks
    its graph at `torch.autograd.grad`."""
    return torch.func.grad(_member_losses, has_aux=True)(params, *batch)


@torch.no_grad()
def _descend(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: list[torch.Tensor],
    scratch: list[torch.Tensor],
    columns: Columns,
    settings: StepSettings,
) -> None:
    """The members' optimiser step, vectorised: their gradients clipped each to its own norm
    limit (as clip_grad_norm_ does), then torch.optim's update rule with each member's own
    learning rate, weight decay, momentum and step count. `state` holds two slots per
    weight (first and second moment, or momentum buffer)."""
    if settings.clipping:
        norm = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
        scale = (columns.clip / (norm + 1e-6)).clamp(max=1.0).view(-1, 1, 1)
        for g in grads:
            g.mul_(scale)
    lr, wd, step = columns.lr, columns.weight_decay, columns.step
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        first, second = state[2 * i], state[2 * i + 1]
        # In place, into preallocated scratch: the stacked tensors outgrow the caches,
        # so every extra pass over them (or fresh allocation) costs memory bandwidth.
        denom = scratch[i]
        if settings.optimizer == "adamw":
            param.mul_(1 - lr * wd)
        elif settings.weight_decay:
            grad.addcmul_(param, wd)  # L2, as torch's Adam, SGD and RMSprop apply it
        if settings.optimizer in ("adam", "adamw"):
            beta1, beta2 = _BETAS
            first.lerp_(grad, 1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # param -= lr / bc1 * first / (sqrt(second) / sqrt(bc2) + eps), as torch's Adam
            step_size = lr / (1 - beta1**step)
            torch.sqrt(second, out=denom).div_((1 - beta2**step).sqrt_()).add_(_ADAM_EPS)
            param.addcdiv_(first, denom.div_(step_size), value=-1)
        elif settings.optimizer == "sgd":
            first.mul_(columns.momentum).add_(grad)
            param.addcmul_(first, lr, value=-1)
        elif settings.optimizer == "rmsprop":
            second.mul_(_RMSPROP_ALPHA).addcmul_(grad, grad, value=1 - _RMSPROP_ALPHA)
            torch.sqrt(second, out=denom).add_(_RMSPROP_EPS)
            param.addcdiv_(grad, denom.div_(lr), value=-1)
        else:
            raise ValueError(f"unknown optimizer {settings.optimizer!r}")


@dataclass(frozen=True)
class StepKernels:
    """How a pack's step runs its arithmetic: gradients, then the optimiser's descent."""

    gradients: Callable[..., Gradients]
    descend: Callable[..., None]


EAGER_KERNELS = StepKernels(_eager_gradients, _descend)


@functools.cache
def compiled_kernels() -> StepKernels:
    """The step through `torch.compile`, made once per process so packs share its compiled
    code: the optimiser's dozens of elementwise kernels fuse into a few. Not as CUDA graphs
    ("reduce-overhead"): the descent updates the stacked weights and the gradients in place,
    so the gradients' graph would have its outputs overwritten by its next replay (torch
    2.11 fails so on an H200). Shapes change as members finish an epoch or leave the pack;
    dynamo then compiles once more, for dynamic shapes."""
    return StepKernels(torch.compile(_traced_gradients), torch.compile(_descend))


def pack_key(config: TrialConfig) -> tuple[Any, ...]:
    """Trials with equal keys can share a pack: same network shape and update rule."""
    return (
        config.hidden,
        config.activation,
        config.init,
        config.batch_norm,
        config.optimizer,
        config.scheduler,
        config.max_epochs,
        config.precision,
        config.metric,
        config.maximize,
    )


def train_pack(
    configs: list[TrialConfig],
    data: TensorData,
    on_epoch: MemberEpoch | None = None,
    on_done: MemberDone | None = None,
    *,
    on_checkpoint: MemberCheckpoint | None = None,
    checkpoint_every_s: float = 30.0,
    checkpoint_now: threading.Event | None = None,
    stop_after_checkpoint: bool = False,
    resume_from: list[bytes | None] | None = None,
    on_epoch_end: Callable[[], None] | None = None,
    compiled: bool = False,
) -> list[TrainResult]:
    """Train the trials together; results in the order of `configs`, each as `train` would
    return it (best weights restored, scored on val and test).

    `on_epoch_end` is called once each epoch's reports, departures and checkpoints have all
    been handed out: where a caller writes them down together.

    Checkpoints and resuming work as in `train`, per member: every member hands out a
    checkpoint in `train`'s format when one is due, so a member's retry resumes alone or
    in another pack; `resume_from[i]` continues member i from one (members of one pack may
    stand at different epochs). With `stop_after_checkpoint`, a set `checkpoint_now` ends
    every member as interrupted after its checkpoint.

    `compiled` runs the step's arithmetic through `torch.compile` (`compiled_kernels`):
    fewer, fused kernels where an eager step spends its time launching dozens of small
    ones. Same batches, masks and update rule; the results differ from eager ones by float
    rounding only.
    """
    if len({pack_key(c) for c in configs}) != 1:
        raise ValueError("a pack needs trials with one architecture, optimiser and scheduler")
    if configs[0].batch_norm:
        raise ValueError("batch norm is not fused; train these trials one at a time")
    results: dict[int, TrainResult] = {}

    def done(index: int, result: TrainResult) -> None:
        results[index] = result
        if on_done is not None:
            on_done(index, result)

    kernels = compiled_kernels() if compiled else EAGER_KERNELS
    pack = _Pack(configs, data, resume_from or [None] * len(configs), kernels)
    schedule = CheckpointSchedule(checkpoint_every_s, checkpoint_now, stop_after_checkpoint)
    with matmul_precision(configs[0], data.device):
        pack.fit(on_epoch, done, on_checkpoint, schedule, on_epoch_end or (lambda: None))
    return [results[i] for i in range(len(configs))]


@dataclass
class _Member:
    """What the pack knows of one trial besides its slices of the stacked tensors."""

    index: int
    config: TrialConfig
    generator: torch.Generator  # its batch order, seeded as training it alone would be
    # A stand-in optimizer that only holds the member's learning rate, for its torch
    # scheduler (None for a constant rate) to drive.
    holder: torch.optim.Optimizer
    scheduler: Any
    # Its epochs and best weights (slices of the stacked tensors), from the untrained
    # network or the checkpoint it resumed from: set once the pack has either.
    progress: Progress[list[torch.Tensor]] = field(init=False)

    @property
    def lr(self) -> float:
        return self.holder.param_groups[0]["lr"]


class _Pack:
    """A pack in training: the members (largest batch first), their stacked weights and
    optimiser state (two slots per weight: first and second moment, or momentum buffer),
    and their hyperparameters as [K, 1, 1] columns."""

    def __init__(
        self,
        configs: list[TrialConfig],
        data: TensorData,
        resume_from: list[bytes | None],
        kernels: StepKernels,
    ) -> None:
        self.started = time.perf_counter()
        self.data, self.device, self.kernels = data, data.device, kernels
        self.loss_fn = loss_function(data.task)
        self.activation = ACTIVATIONS[configs[0].activation]()
        order = sorted(range(len(configs)), key=lambda i: -configs[i].batch_size)
        self.members = [self._member(i, configs[i]) for i in order]
        self.params = self._stacked_initial_weights()
        self.state = [torch.zeros_like(p) for p in self.params for _ in range(2)]
        self.scratch = [torch.empty_like(p) for p in self.params]
        self.steps = torch.zeros(len(self.members), device=self.device)
        self.dropout_generator = torch.Generator(device=self.device).manual_seed(
            configs[0].seed + 1
        )
        fresh = []
        for k, member in enumerate(self.members):
            payload = resume_from[member.index]
            if payload is None:
                fresh.append(k)
            else:
                self._restore(k, Checkpoint.from_bytes(payload))
        self._set_hyperparameters()
        self._start(fresh)

    def _member(self, index: int, config: TrialConfig) -> _Member:
        holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        return _Member(index, config, generator, holder, make_scheduler(config, holder))

    def _stacked_initial_weights(self) -> list[torch.Tensor]:
        """Each member's weights initialised exactly as its network alone would be, stacked
        per layer as `[K, in, out]` (weights) and `[K, 1, out]` (biases)."""
        layers = []
        for member in self.members:
            torch.manual_seed(member.config.seed)
            model = build_model(member.config, self.data)
            layers.append([m for m in model if isinstance(m, nn.Linear)])
        params = []
        for depth in range(len(layers[0])):
            weights = torch.stack([ls[depth].weight.detach().T for ls in layers])
            biases = torch.stack([ls[depth].bias.detach()[None, :] for ls in layers])
            params += [weights.to(self.device), biases.to(self.device)]
        return [p.contiguous() for p in params]

    def _set_hyperparameters(self) -> None:
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=self.device, dtype=torch.float32).view(-1, 1, 1)

        configs = [m.config for m in self.members]
        self.lr = column([m.lr for m in self.members])
        self.weight_decay = column([c.weight_decay for c in configs])
        self.momentum = column([c.momentum for c in configs])
        self.keep = column([1.0 - c.dropout for c in configs])
        self.clip = column([c.grad_clip_norm or math.inf for c in configs]).view(-1)
        self.batch = torch.tensor([c.batch_size for c in configs], device=self.device)
        self._set_flags()

    def _set_flags(self) -> None:
        """What the members need at all, decided on the host: a step never waits on the
        device to find out."""
        configs = [m.config for m in self.members]
        self.has_dropout = any(c.dropout > 0 for c in configs)
        self.step_settings = StepSettings(
            configs[0].optimizer,
            self.activation,
            self.data.task,
            self.device.type,
            bf16=configs[0].precision == "bf16",
            clipping=any(c.grad_clip_norm for c in configs),
            weight_decay=any(c.weight_decay > 0 for c in configs),
        )
        self.width_starts = [0]
        if self.device.type != "cuda":
            for k, config in enumerate(configs):
                if config.batch_size * WIDTH_RATIO < configs[self.width_starts[-1]].batch_size:
                    self.width_starts.append(k)

    # --- the epoch loop ----------------------------------------------------------------

    def fit(
        self,
        on_epoch: MemberEpoch | None,
        on_done: MemberDone,
        on_checkpoint: MemberCheckpoint | None,
        schedule: CheckpointSchedule,
        on_epoch_end: Callable[[], None],
    ) -> None:
        """Train until every member has left the pack, each told to `on_done` as it leaves."""
        while self.members:
            self._epoch(on_epoch, on_done)
            interrupted = bool(self.members) and schedule.hand_out_if_due(
                lambda: self._hand_out(on_checkpoint)
            )
            for member in self.members if interrupted else []:
                on_done(member.index, self._result(member, "interrupted"))
            on_epoch_end()
            if interrupted:
                return

    def _start(self, fresh: list[int]) -> None:
        """The untrained networks of members `fresh` are their first best, and the yardstick
        for explosions; resumed members brought theirs."""
        if not fresh:
            return
        untrained = self._evaluate_val()
        for k in fresh:
            weights = [p[k].detach().clone() for p in self.params]
            member = self.members[k]
            member.progress = Progress.untrained(member.config, untrained[k], weights)

    def _epoch(self, on_epoch: MemberEpoch | None, on_done: MemberDone) -> None:
        """One epoch of every member; the members it ends leave the pack."""
        train_losses, grad_norms = self._train_epoch()
        val = self._evaluate_val()
        leaving: dict[int, Ending] = {}
        for k in range(len(self.members)):
            ending = self._end_epoch(k, train_losses[k], grad_norms[k], val[k], on_epoch)
            if ending is not None:
                leaving[k] = ending
        for k, ending in leaving.items():
            on_done(self.members[k].index, self._result(self.members[k], ending))
        self._set_lr()
        if leaving:
            self._keep([k for k in range(len(self.members)) if k not in leaving])

    def _end_epoch(
        self,
        k: int,
        loss: float,
        grad_norms: tuple[float, ...],
        val: dict[str, float],
        on_epoch: MemberEpoch | None,
    ) -> Ending | None:
        """Member k's epoch, as its progress records and ends it (None: it goes on)."""
        member = self.members[k]

        def snapshot() -> list[torch.Tensor]:
            return [p[k].detach().clone() for p in self.params]

        def report(record: EpochRecord) -> bool:
            return on_epoch is not None and on_epoch(member.index, record)

        ending = member.progress.end_epoch(loss, grad_norms, val, member.lr, snapshot, report)
        if ending is None:
            step_scheduler(member.scheduler, val["loss"])
        return ending

    def _hand_out(self, on_checkpoint: MemberCheckpoint | None) -> None:
        """Every member's checkpoint to `on_checkpoint`."""
        if on_checkpoint is None:
            return
        for k, member in enumerate(self.members):
            on_checkpoint(member.index, self._checkpoint(k).to_bytes(), member.progress.epoch)

    def _set_lr(self) -> None:
        lrs = [m.lr for m in self.members]
        self.lr = torch.tensor(lrs, device=self.device, dtype=torch.float32).view(-1, 1, 1)

    def _keep(self, ks: list[int]) -> None:
        """Drop the members that left: every stacked tensor keeps the rows of `ks`."""
        index = torch.tensor(ks, device=self.device)
        self.members = [self.members[k] for k in ks]
        if not self.members:
            return
        self.params = [p[index] for p in self.params]
        self.state = [s[index] for s in self.state]
        self.scratch = [torch.empty_like(p) for p in self.params]
        self.steps = self.steps[index]
        for name in ("lr", "weight_decay", "momentum", "keep", "clip", "batch"):
            setattr(self, name, getattr(self, name)[index])
        self._set_flags()

    # --- one epoch -----------------------------------------------------------------------

    def _train_epoch(self) -> tuple[list[float], list[tuple[float, ...]]]:
        """One epoch of every member: their mean training losses and their layers' gradient
        norms on their last full batch (as `training.train` records them), read back once."""
        n = self.data.x_train.shape[0]
        perms = torch.stack(
            [torch.randperm(n, device=self.device, generator=m.generator) for m in self.members]
        )
        sizes = [m.config.batch_size for m in self.members]  # largest first
        steps = [math.ceil(n / b) for b in sizes]
        self.last_full_step = [max(0, n - b) // b for b in sizes]
        self.grad_norms = torch.zeros(len(self.members), len(self.params) // 2, device=self.device)
        total = torch.zeros(len(self.members), device=self.device)
        lo = 0
        for s in range(steps[-1]):
            while steps[lo] <= s:
                lo += 1
            total[lo:] += self._step(perms, s, lo, n)
        rows = torch.cat([(total / n)[:, None], self.grad_norms], dim=1).tolist()
        return [row[0] for row in rows], [tuple(row[1:]) for row in rows]

    def _step(self, perms: torch.Tensor, s: int, lo: int, n: int) -> torch.Tensor:
        """Step s of members [lo:], each on its own batch; returns each member's summed
        loss over its real rows."""
        parts = [self._slice_gradients(perms, s, a, b, n) for a, b in self._slices(lo)]
        losses, grads = zip(*parts, strict=True)
        grads = [torch.cat(g) if len(g) > 1 else g[0] for g in zip(*grads, strict=True)]
        self._record_grad_norms(s, lo, grads)
        self.steps[lo:] += 1
        self.kernels.descend(
            [p[lo:] for p in self.params],
            grads,
            [t[lo:] for t in self.state],
            [t[lo:] for t in self.scratch],
            self._columns(lo),
            self.step_settings,
        )
        return torch.cat(losses)

    def _record_grad_norms(self, s: int, lo: int, grads: list[torch.Tensor]) -> None:
        """The weights' gradient norms (before clipping) of the members whose last full
        batch is step s: a contiguous run, as the last full step grows with k."""
        run = [k for k in range(lo, len(self.members)) if self.last_full_step[k] == s]
        if run:
            a, b = run[0] - lo, run[-1] + 1 - lo
            norms = [g[a:b].flatten(1).norm(dim=1) for g in grads[::2]]
            self.grad_norms[run[0] : run[-1] + 1] = torch.stack(norms, dim=1)

    def _slices(self, lo: int) -> list[tuple[int, int]]:
        """Members [lo:] as runs that share one padded batch width. On a GPU a single run:
        its time goes to kernel launches, not to padding rows. On a CPU, whose time goes to
        arithmetic, runs of batch sizes within WIDTH_RATIO of each other."""
        starts = [lo, *(k for k in self.width_starts if k > lo)]
        return list(itertools.pairwise([*starts, len(self.members)]))

    def _slice_gradients(
        self, perms: torch.Tensor, s: int, a: int, b: int, n: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Members [a:b] on step s of their batches, padded to the widest (padding rows
        weigh 0): their summed losses, and the gradients of their mean losses."""
        batch = self.batch[a:b, None]
        column = torch.arange(self.members[a].config.batch_size, device=self.device)[None, :]
        position = s * batch + column
        real = (column < batch) & (position < n)
        rows = perms[a:b].gather(1, position.clamp(max=n - 1))
        masks = self._dropout_masks(a, b, rows.shape[1])
        # The slices themselves are differentiated: gradients come out [b - a, ...], and no
        # full-size gradient of the stacked tensors is zeroed and filled at every step.
        grads, losses = self.kernels.gradients(
            [p[a:b] for p in self.params],
            self.data.x_train[rows],
            self.data.y_train[rows],
            real,
            masks,
            self.step_settings,
        )
        return losses, grads

    def _dropout_masks(self, a: int, b: int, width: int) -> list[torch.Tensor]:
        """Members [a:b]'s dropout masks of one step, one per hidden layer (kept units
        scaled by 1 / keep), drawn from the pack's stream before the step, so that a
        compiled step draws exactly what an eager one does."""
        if not self.has_dropout:
            return []
        keep = self.keep[a:b]
        widths = [w.shape[-1] for w in self.params[0:-2:2]]
        shapes = [(b - a, width, units) for units in widths]
        return [
            torch.rand(shape, device=self.device, generator=self.dropout_generator)
            .lt_(keep)
            .div_(keep)
            for shape in shapes
        ]

    def _columns(self, lo: int) -> Columns:
        """Members [lo:]'s hyperparameters for their optimiser step."""
        return Columns(
            self.lr[lo:],
            self.weight_decay[lo:],
            self.momentum[lo:],
            self.clip[lo:],
            self.steps[lo:].view(-1, 1, 1),
        )

    @torch.no_grad()
    def _evaluate_val(self) -> list[dict[str, float]]:
        """Loss and metrics of every member on the validation set, read back once."""
        x, y = self.data.x_val, self.data.y_val
        count = len(self.members)
        chunks = [
            _forward(x[i : i + _EVAL_CHUNK].expand(count, -1, -1), self.params, self.activation)
            for i in range(0, x.shape[0], _EVAL_CHUNK)
        ]
        out = torch.cat(chunks, dim=1)
        if self.data.task == "regression":
            out = out.squeeze(-1)  # the single network's head is flattened the same way
        per_member = [metric_tensors(out[k], y, self.data, self.loss_fn) for k in range(count)]
        names = list(per_member[0])
        values = torch.stack([torch.stack([m[n].float() for n in names]) for m in per_member])
        return [dict(zip(names, row, strict=True)) for row in values.tolist()]

    # --- a member's result and checkpoints, as a single run of its config makes them -----

    def _result(self, member: _Member, ending: Ending) -> TrainResult:
        """The member's result, as `train` would return it: its best network, scored."""
        network = self._network(member)
        return TrainResult.build(
            member.progress, ending, network, self.data, self.loss_fn, self.started
        )

    def _network(self, member: _Member, weights: list[torch.Tensor] | None = None) -> nn.Sequential:
        """The member's best weights (or `weights`) in the network `train` would return."""
        model = build_model(member.config, self.data).to(self.device)
        stacked = member.progress.best_state if weights is None else weights
        with torch.no_grad():
            for param, tensor in zip(model.parameters(), stacked, strict=True):
                param.copy_(_unstacked(tensor, param))
        return model

    def _checkpoint(self, k: int) -> Checkpoint:
        """Member k's checkpoint: its network, a torch optimizer holding its moments, step
        count and learning rate, its scheduler, its batch-order stream."""
        member = self.members[k]
        model = self._network(member, [p[k].detach() for p in self.params])
        optimizer = self._torch_optimizer(k, model)
        return Checkpoint.capture(
            member.config,
            self.data,
            member.progress,
            started=self.started,
            model=model,
            optimizer=optimizer,
            scheduler=member.scheduler,
            generator=member.generator,
            best_state=lambda: self._network(member).state_dict(),
        )

    def _torch_optimizer(self, k: int, model: nn.Module) -> torch.optim.Optimizer:
        """Member k's optimiser state in the torch optimizer a single run of its config
        would have over `model`."""
        member = self.members[k]
        optimizer = make_optimizer(member.config, model)
        # A single run's optimizer has its scheduler attached, which adds `initial_lr` to
        # the param groups: make one so that a checkpoint's groups are the same.
        make_scheduler(member.config, optimizer)
        step = self.steps[k].detach().clone()
        for i, param in enumerate(model.parameters()):
            # Contiguous copies: torch's fused optimizers read their state as if it were.
            first, second = (
                _unstacked(self.state[slot][k], param).clone(memory_format=torch.contiguous_format)
                for slot in (2 * i, 2 * i + 1)
            )
            optimizer.state[param] = _torch_state(member.config, step, first, second)
        for group in optimizer.param_groups:
            group["lr"] = member.lr
        return optimizer

    def _restore(self, k: int, checkpoint: Checkpoint) -> None:
        """Put a checkpoint (from a pack or a single run) into member k's slices, by way of
        the single network and torch optimizer it describes."""
        member = self.members[k]
        # Both networks first: building one draws from the random streams, which the
        # checkpoint then restores.
        model = build_model(member.config, self.data).to(self.device)
        best = build_model(member.config, self.data).to(self.device)
        optimizer = make_optimizer(member.config, model)
        checkpoint.restore_into(
            member.config, self.data, model, optimizer, member.scheduler, member.generator
        )
        self._load_slices(k, model, optimizer)
        member.holder.param_groups[0]["lr"] = checkpoint.optimizer["param_groups"][0]["lr"]
        best.load_state_dict(checkpoint.best_state)
        best_weights = [
            _stacked(param.detach(), self.params[i][k]).clone()
            for i, param in enumerate(best.parameters())
        ]
        member.progress = checkpoint.progress(member.config, best_weights)

    @torch.no_grad()
    def _load_slices(self, k: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Member k's weights, moments and step count from a single network's `model` and
        torch `optimizer`."""
        for i, param in enumerate(model.parameters()):
            self.params[i][k].copy_(_stacked(param, self.params[i][k]))
            saved = optimizer.state.get(param, {})
            first = saved.get("exp_avg", saved.get("momentum_buffer"))
            second = saved.get("exp_avg_sq", saved.get("square_avg"))
            for slot, tensor in ((2 * i, first), (2 * i + 1, second)):
                if tensor is not None:
                    self.state[slot][k].copy_(_stacked(tensor, self.state[slot][k]))
            if "step" in saved:
                self.steps[k] = float(saved["step"])


def _unstacked(stacked: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A member's slice in nn.Linear's layout: weights [in, out] -> [out, in], biases
    [1, out] -> [out]."""
    return stacked.T if like.dim() == 2 else stacked[0]


def _stacked(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of `_unstacked`, on the pack's device."""
    tensor = tensor.to(like.device)
    return tensor.T if tensor.dim() == 2 else tensor[None, :]


def _torch_state(
    config: TrialConfig, step: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> dict[str, Any]:
    """One parameter's optimizer state under torch.optim's names; each its own step
    tensor, since torch increments them in place."""
    if config.optimizer in ("adam", "adamw"):
        return {"step": step.clone(), "exp_avg": first, "exp_avg_sq": second}
    if config.optimizer == "sgd":
        return {"momentum_buffer": first}
    return {"step": step.clone(), "square_avg": second}
