"""Checkpoints of a training run: resuming one continues exactly where the run stopped.

Real training on real data, no mocks: a resumed run must produce the very numbers of a run
that was never stopped, because the worker that resumes a crashed or interrupted trial
reports them to the sampler as if nothing had happened (docs/architecture.md, "The trial
life cycle and crash semantics").
"""

from __future__ import annotations

import io
import threading
from dataclasses import fields, replace
from typing import Any

import pytest
import torch

from hpsearch.data.tensors import TensorData, load_dataset
from hpsearch.spec import parse_spec
from hpsearch.training.checkpoint import Checkpoint
from hpsearch.training.fused import train_pack
from hpsearch.training.train import (
    EpochRecord,
    TrainResult,
    TrialConfig,
    checkpoint_history,
    train,
)

pytestmark = pytest.mark.integration  # real trainings, stopped and resumed, single and packed: slow

NEVER = 1e9  # checkpoint_every_s that no test run reaches


def setup(
    dataset: str = "digits",
    params: dict[str, Any] | None = None,
    device: str = "cpu",
    **training: Any,
) -> tuple[TrialConfig, TensorData]:
    spec = parse_spec(
        {
            "name": "checkpoint-test",
            "dataset": {"source": "builtin", "name": dataset},
            "training": {"max_epochs": 6, **training},
            "budget": {"n_trials": 1},
        }
    )
    return TrialConfig.from_spec(spec, params or {}), load_dataset(spec, device)


def train_collecting(
    config: TrialConfig, data: TensorData, **kwargs: Any
) -> tuple[TrainResult, dict[int, bytes]]:
    """Train and keep every checkpoint handed out, by the epoch it was taken after."""
    taken: dict[int, bytes] = {}

    def keep(payload: bytes, epoch: int) -> None:
        taken[epoch] = payload

    return train(config, data, on_checkpoint=keep, **kwargs), taken


def assert_same_run(resumed: TrainResult, straight: TrainResult) -> None:
    assert resumed.history == straight.history  # every field of every epoch, exactly
    assert resumed.value == straight.value
    assert resumed.best_epoch == straight.best_epoch
    assert resumed.epochs_run == straight.epochs_run
    assert resumed.stopped_early == straight.stopped_early
    assert resumed.val_metrics == straight.val_metrics
    assert resumed.test_metrics == straight.test_metrics
    assert resumed.model is not None and straight.model is not None
    resumed_weights, straight_weights = resumed.model.state_dict(), straight.model.state_dict()
    for name, weight in straight_weights.items():
        assert torch.equal(resumed_weights[name], weight), name


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "dropout"), [("adam", "plateau", 0.3), ("sgd", "cosine", 0.0)]
)
def test_a_resumed_run_equals_one_never_stopped(
    optimizer: str, scheduler: str, dropout: float
) -> None:
    config, data = setup(
        params={"dropout": dropout, "learning_rate": 0.01},
        optimizer=optimizer,
        scheduler=scheduler,
    )
    straight = train(config, data)
    _, taken = train_collecting(config, data, checkpoint_every_s=0)
    torch.manual_seed(12345)  # the resume must not depend on what this process drew before
    seen: list[int] = []

    def report(record: EpochRecord) -> bool:
        seen.append(record.epoch)
        return False

    resumed = train(config, data, report, resume_from=taken[3])
    assert_same_run(resumed, straight)
    assert resumed.resumed_from_epoch == 3
    assert straight.resumed_from_epoch is None
    assert seen == [4, 5, 6]  # the checkpoint's epochs are not reported again
    assert not resumed.interrupted


def test_a_resume_after_the_best_epoch_still_restores_the_best_weights() -> None:
    config, data = setup(
        params={"learning_rate": 0.03},
        max_epochs=30,
        early_stopping_patience=3,
        scheduler="none",
    )
    straight, taken = train_collecting(config, data, checkpoint_every_s=0)
    after_best = straight.best_epoch + 1
    assert straight.stopped_early and after_best < straight.epochs_run  # the premise
    # None after the final epoch, also when early stopping ends the run.
    assert sorted(taken) == list(range(1, straight.epochs_run))

    resumed = train(config, data, resume_from=taken[after_best])
    assert_same_run(resumed, straight)
    assert resumed.best_epoch < after_best
    assert resumed.value == max(r.value for r in straight.history[:after_best])
    # The restored network is the best one, whose weights came from the checkpoint.
    assert resumed.val_metrics["val_accuracy"] == pytest.approx(resumed.value)


def test_checkpoint_every_s_sets_how_often_one_is_handed_out() -> None:
    config, data = setup()
    _, every_epoch = train_collecting(config, data, checkpoint_every_s=0)
    _, rarely = train_collecting(config, data, checkpoint_every_s=NEVER)
    assert sorted(every_epoch) == [1, 2, 3, 4, 5]  # none after the final epoch
    assert rarely == {}


def test_checkpoint_now_with_stop_interrupts_and_the_resume_finishes_the_run() -> None:
    config, data = setup(params={"dropout": 0.2})
    straight = train(config, data)
    stop = threading.Event()

    def report(record: EpochRecord) -> bool:
        if record.epoch == 2:
            stop.set()  # as a SIGTERM handler would
        return False

    interrupted, taken = train_collecting(
        config,
        data,
        on_epoch=report,
        checkpoint_every_s=NEVER,
        checkpoint_now=stop,
        stop_after_checkpoint=True,
    )
    assert interrupted.interrupted
    assert interrupted.epochs_run == 2
    assert list(taken) == [2]
    assert interrupted.history == straight.history[:2]

    resumed = train(config, data, resume_from=taken[2])
    assert_same_run(resumed, straight)
    assert not resumed.interrupted


def test_checkpoint_now_at_the_final_epoch_just_finishes() -> None:
    config, data = setup()
    stop = threading.Event()

    def report(record: EpochRecord) -> bool:
        if record.epoch == config.max_epochs:
            stop.set()
        return False

    result, taken = train_collecting(
        config, data, on_epoch=report, checkpoint_now=stop, stop_after_checkpoint=True
    )
    assert not result.interrupted
    assert result.epochs_run == config.max_epochs
    assert taken == {}


def test_checkpoint_now_without_stop_forces_a_checkpoint_and_goes_on() -> None:
    config, data = setup()
    now = threading.Event()
    taken: list[int] = []

    def report(record: EpochRecord) -> bool:
        if record.epoch == 2:
            now.set()
        return False

    def keep(payload: bytes, epoch: int) -> None:
        taken.append(epoch)
        now.clear()  # the caller clears it: one checkpoint per request

    result = train(
        config, data, report, on_checkpoint=keep, checkpoint_every_s=NEVER, checkpoint_now=now
    )
    assert taken == [2]
    assert not result.interrupted
    assert result.epochs_run == config.max_epochs


def test_a_checkpoint_of_another_config_or_data_is_refused() -> None:
    config, data = setup(params={"hidden_units": 128})
    _, taken = train_collecting(config, data, checkpoint_every_s=0)
    payload = taken[1]

    narrower, _ = setup(params={"hidden_units": 64})
    with pytest.raises(ValueError, match=r"hidden is \(128,\) in the checkpoint but \(64,\) here"):
        train(narrower, data, resume_from=payload)

    _, iris = setup("iris", params={"hidden_units": 128})
    with pytest.raises(ValueError, match=r"n_features is 64 in the checkpoint but 4 here"):
        train(config, iris, resume_from=payload)

    with pytest.raises(ValueError, match="not a readable hpsearch checkpoint"):
        train(config, data, resume_from=b"not a checkpoint")


def test_checkpoint_history_lists_the_epochs_it_holds() -> None:
    config, data = setup()
    result, taken = train_collecting(config, data, checkpoint_every_s=0)
    assert checkpoint_history(taken[3]) == result.history[:3]
    assert checkpoint_history(taken[5]) == result.history[:5]
    assert Checkpoint.from_bytes(taken[5]).history == result.history[:5]


def stored(payload: bytes) -> dict[str, Any]:
    """A payload as the database holds it, read without the Checkpoint type."""
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts, lists and tensors equal to the last bit, in the same order."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_a_checkpoint_round_trips_through_bytes() -> None:
    config, data = setup(params={"dropout": 0.2}, optimizer="adam", scheduler="cosine")
    _, taken = train_collecting(config, data, checkpoint_every_s=0)
    checkpoint = Checkpoint.from_bytes(taken[3])
    assert checkpoint.epoch == 3 and checkpoint.config["dropout"] == 0.2
    assert all(isinstance(record, EpochRecord) for record in checkpoint.history)
    again = Checkpoint.from_bytes(checkpoint.to_bytes())
    for name in (f.name for f in fields(Checkpoint)):
        assert_equal(getattr(again, name), getattr(checkpoint, name), name)
    # Stored, the fields are the payload's keys in their order, after the format.
    assert_equal(stored(checkpoint.to_bytes()), stored(taken[3]))
    assert list(stored(taken[3])) == ["format", *(f.name for f in fields(Checkpoint))]
    resumed = train(config, data, resume_from=again.to_bytes())
    assert_same_run(resumed, train(config, data, resume_from=taken[3]))


def layout(value: Any) -> Any:
    """How a checkpoint's contents nest: every key, the type of every value, the dtype and
    shape of every tensor."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    if isinstance(value, dict):
        return {key: layout(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [layout(v) for v in value]
    return type(value).__name__


@pytest.mark.parametrize(
    ("optimizer", "scheduler"), [("adam", "plateau"), ("sgd", "cosine"), ("rmsprop", "none")]
)
def test_single_runs_and_packs_write_the_same_checkpoint(optimizer: str, scheduler: str) -> None:
    """Either path resumes the other's checkpoints only while both write the same one: the
    same keys down to every optimiser slot and random stream, the same tensors' shapes."""
    config, data = setup(params={"dropout": 0.2}, optimizer=optimizer, scheduler=scheduler)
    _, alone = train_collecting(config, data, checkpoint_every_s=0)
    packed: dict[tuple[int, int], bytes] = {}

    def keep(index: int, payload: bytes, epoch: int) -> None:
        packed[(index, epoch)] = payload

    other = replace(config, learning_rate=config.learning_rate / 2)
    train_pack([config, other], data, on_checkpoint=keep, checkpoint_every_s=0)
    single, member = stored(alone[2]), stored(packed[(0, 2)])
    assert list(single) == list(member) == ["format", *(f.name for f in fields(Checkpoint))]
    assert layout(member) == layout(single)
    assert member["config"] == single["config"] and member["data"] == single["data"]


def test_a_checkpoint_is_a_few_copies_of_the_weights() -> None:
    """Digits with 64-128-10 and Adam: 9,610 float32 weights held four times (the weights,
    the best weights, Adam's two moments) make 154 KB; the RNG states (5 KB for the CPU's),
    the history and the archive's records add about 20 KB, so 172 KB in all."""
    config, data = setup(params={"hidden_units": 128}, optimizer="adam")
    result, taken = train_collecting(config, data, checkpoint_every_s=0)
    assert result.model is not None
    weight_bytes = sum(p.numel() * p.element_size() for p in result.model.parameters())
    assert weight_bytes == 9610 * 4
    size = len(taken[3])
    assert 4 * weight_bytes < size < 4 * weight_bytes + 40_000
    assert size < 200_000


@pytest.mark.cuda
def test_a_checkpoint_moves_between_cuda_and_cpu() -> None:
    """Exact on one device; across devices the random streams restart (train's docstring),
    so the run continues and learns but draws other numbers."""
    config, cpu_data = setup(params={"dropout": 0.2})
    _, cuda_data = setup(params={"dropout": 0.2}, device="cuda")
    straight = train(config, cuda_data)
    _, on_cuda = train_collecting(config, cuda_data, checkpoint_every_s=0)
    assert_same_run(train(config, cuda_data, resume_from=on_cuda[3]), straight)

    on_cpu = train(config, cpu_data, resume_from=on_cuda[3])
    assert on_cpu.history[:3] == straight.history[:3]
    assert on_cpu.epochs_run == config.max_epochs
    _, from_cpu = train_collecting(config, cpu_data, checkpoint_every_s=0)
    back = train(config, cuda_data, resume_from=from_cpu[3])
    assert back.epochs_run == config.max_epochs
    assert back.value > 0.8
