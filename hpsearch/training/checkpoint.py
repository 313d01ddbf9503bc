"""Checkpoints: the one format in which single runs and packs hand out a trial's state.

A run can hand out checkpoints between epochs and be resumed from one, in another process
on another machine, exactly where it stopped (docs/architecture.md, "The trial life cycle
and crash semantics"): a crash then loses at most the work since the last checkpoint. A
pack's member checkpoints as a single run of its config would, so either path resumes the
other's.
"""

from __future__ import annotations

import io
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hpsearch.data.tensors import TensorData
from hpsearch.training.progress import EpochRecord, Progress, State

if TYPE_CHECKING:
    from hpsearch.training.train import TrialConfig

# Bumped whenever the checkpoint's fields change, so an old payload fails clearly on load.
CHECKPOINT_FORMAT = 1
# Optimiser settings that pick an implementation for the device (fused kernels on CUDA), not
# numbers of the run: a resume keeps its own, so a CUDA checkpoint resumes on a CPU and back.
_DEVICE_FLAGS = ("foreach", "fused", "capturable")


@dataclass
class Checkpoint:
    """Everything needed to continue a trial after an epoch, in the terms of a single
    network: its weights, a torch optimizer's and scheduler's state_dicts, its random
    streams, its progress. Serialised as tensors and plain values on the CPU, so
    `torch.load(weights_only=True)` reads it on any machine and a stored payload can never
    run code. The fields are the payload's keys, in this order, after "format"."""

    config: dict[str, Any]  # the TrialConfig it was taken under, as asdict gives it
    data: dict[str, Any]  # the data's shape: task, n_features, n_outputs
    epoch: int  # the last epoch completed
    seconds: float  # training time up to this checkpoint
    history: list[EpochRecord]
    model: dict[str, torch.Tensor]  # the network's state_dict
    optimizer: dict[str, Any]  # a torch optimizer's state_dict
    scheduler: dict[str, Any] | None  # a torch scheduler's state_dict, None without one
    rng: dict[str, Any]  # the random streams training draws from (_rng_state)
    best_value: float
    best_epoch: int
    best_state: dict[str, torch.Tensor]  # the best network's state_dict
    explosion: float

    @classmethod
    def capture(
        cls,
        config: TrialConfig,
        data: TensorData,
        progress: Progress[Any],
        *,
        started: float,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generator: torch.Generator,
        best_state: Callable[[], dict[str, torch.Tensor]],
    ) -> Checkpoint:
        """The state of a run of `config` on `data` begun at `started`, its batch order
        drawn from `generator`. `best_state` is called last, after the random streams are
        read, because building a network to hold the best weights draws from them."""
        return cls(
            config=asdict(config),
            data=_data_shape(data),
            epoch=progress.epoch,
            seconds=progress.seconds(started),
            history=list(progress.history),
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=None if scheduler is None else scheduler.state_dict(),
            rng=_rng_state(generator, data.device),
            best_value=progress.best_value,
            best_epoch=progress.best_epoch,
            best_state=best_state(),
            explosion=progress.explosion,
        )

    def to_bytes(self) -> bytes:
        """The payload to store, with every tensor on the CPU."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        state = {"format": CHECKPOINT_FORMAT} | values
        state["history"] = [asdict(r) for r in self.history]
        buffer = io.BytesIO()
        torch.save(_to_cpu(state), buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes) -> Checkpoint:
        """A stored payload back, on the CPU; only tensors and plain values are unpickled,
        so a payload from the database can never run code."""
        try:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError) as exc:
            raise ValueError(f"not a readable hpsearch checkpoint: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an hpsearch checkpoint of format {CHECKPOINT_FORMAT}")
        values = {f.name: state[f.name] for f in fields(cls)}
        return cls(**values | {"history": _records(state["history"])})

    def restore_into(
        self,
        config: TrialConfig,
        data: TensorData,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generator: torch.Generator,
    ) -> None:
        """Put the run's state into a fresh network of `config` on `data`'s device, its
        optimizer (in the implementation, fused or not, this device uses), its scheduler
        (None without one) and its batch-order stream. The random streams are restored
        last: nothing may draw from them before training goes on."""
        self._check_fits(config, data)
        model.load_state_dict(self.model)
        _load_optimizer(optimizer, self.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(self.scheduler)
        _restore_rng(self.rng, generator, data.device, config.seed + len(self.history))

    def progress(self, config: TrialConfig, best_state: State) -> Progress[State]:
        """The run's progress as it stood, with the best weights as the caller keeps them
        (`best_state`, made from this checkpoint's)."""
        return Progress(
            config,
            best_value=self.best_value,
            best_state=best_state,
            explosion=self.explosion,
            best_epoch=self.best_epoch,
            history=list(self.history),
            seconds_before=self.seconds,
            resumed_from_epoch=len(self.history),
        )

    def _check_fits(self, config: TrialConfig, data: TensorData) -> None:
        """Refuse a checkpoint of another config or data, naming every difference, rather
        than load weights of the wrong shape or continue a different trial."""
        saved = self.config | self.data
        here = asdict(config) | _data_shape(data)
        differences = [
            f"{key} is {saved.get(key)!r} in the checkpoint but {value!r} here"
            for key, value in here.items()
            if saved.get(key) != value
        ]
        if differences:
            raise ValueError("checkpoint does not match this trial: " + "; ".join(differences))


@dataclass
class CheckpointSchedule:
    """When a run hands out checkpoints: every `every_s` seconds (0 = every epoch), or at
    once while `now` is set. `now` is only read, so a signal handler or another thread may
    set it; with `stop_after` the run then ends interrupted after that checkpoint, otherwise
    the caller clears it (e.g. in its checkpoint callback)."""

    every_s: float
    now: threading.Event | None
    stop_after: bool
    last: float = field(default_factory=time.monotonic)

    def hand_out_if_due(self, hand_out: Callable[[], None]) -> bool:
        """Call `hand_out` when checkpoints are due and count the interval from then; True
        when the run is to stop after them."""
        forced = self.now is not None and self.now.is_set()
        if not forced and time.monotonic() - self.last < self.every_s:
            return False
        hand_out()
        self.last = time.monotonic()
        return forced and self.stop_after


def _data_shape(data: TensorData) -> dict[str, Any]:
    return {"task": data.task, "n_features": data.n_features, "n_outputs": data.n_outputs}


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
