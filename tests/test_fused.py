"""A fused pack trains each member as it would train alone: same batches, same update rule,
its own learning rate, dropout, batch size, early stopping, pruning and divergence."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from hpsearch.data.tensors import load_dataset
from hpsearch.runtime.trials import Claim, packs
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.service.studies import submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store
from hpsearch.training.checkpoint import Checkpoint
from hpsearch.training.fused import train_pack
from hpsearch.training.train import TrainResult, TrialConfig, train

pytestmark = pytest.mark.integration  # packs of real trainings against the same trained alone: slow

MEMBERS: list[dict[str, Any]] = [
    {"learning_rate": 3e-3, "batch_size": 32, "dropout": 0.0},
    {"learning_rate": 1e-3, "batch_size": 50, "dropout": 0.1},
    {"learning_rate": 1e-2, "batch_size": 256, "dropout": 0.2, "weight_decay": 1e-4},
    {"learning_rate": 3e-3, "batch_size": 128, "dropout": 0.0, "grad_clip_norm": 0.5},
]


def make(dataset: dict[str, Any], **training: Any) -> Any:
    return parse_spec(
        {
            "name": "fused",
            "dataset": dataset,
            "split": {"val": 0.2, "test": 0.2},
            "model": {"hidden": [32]},
            "training": {"max_epochs": 6, **training},
            "budget": {"n_trials": 4},
        }
    )


SYNTHETIC = {"source": "synthetic", "n_samples": 10_000, "n_features": 20, "n_classes": 3}


def configs_of(spec: Any, members: list[dict[str, Any]] = MEMBERS) -> list[TrialConfig]:
    return [TrialConfig.from_spec(spec, params) for params in members]


def test_a_pack_of_four_matches_the_same_trials_trained_alone() -> None:
    spec = make(SYNTHETIC, max_epochs=10)
    data = load_dataset(spec)
    configs = configs_of(spec)
    alone = [train(config, data) for config in configs]
    packed = train_pack(configs, data)
    for single, member in zip(alone, packed, strict=True):
        gap = abs(single.test_metrics["test_accuracy"] - member.test_metrics["test_accuracy"])
        assert gap <= 0.01  # within 1 point, on 2,000 test rows
        assert member.epochs_run == single.epochs_run == 10
        assert [r.epoch for r in member.history] == list(range(1, 11))
    # Without dropout a member sees exactly the batches and updates it would alone; only
    # the summation order of batched matmuls differs.
    for k in (0, 3):
        assert packed[k].value == pytest.approx(alone[k].value, abs=2e-3)
        assert packed[k].history[-1].train_loss == pytest.approx(
            alone[k].history[-1].train_loss, rel=1e-2
        )


def test_bf16_autocast_keeps_accuracy_alone_and_in_a_pack() -> None:
    fp32 = make(SYNTHETIC, max_epochs=10)
    bf16 = make(SYNTHETIC, max_epochs=10, precision="bf16")
    data = load_dataset(fp32)
    reference = [train(config, data) for config in configs_of(fp32)]
    alone = [train(config, data) for config in configs_of(bf16)]
    packed = train_pack(configs_of(bf16), data)
    gaps = []
    for full, single, member in zip(reference, alone, packed, strict=True):
        assert single.history != full.history  # the forward pass did run in bf16
        accuracy = [r.test_metrics["test_accuracy"] for r in (full, single, member)]
        assert abs(accuracy[0] - accuracy[1]) <= 0.015
        assert abs(accuracy[0] - accuracy[2]) <= 0.015
        gaps.append(abs(accuracy[1] - accuracy[2]))
    # bf16 rounds a batched matmul differently from a single one, and how depends on the
    # host's kernels (AVX2 here put one member 0.0105 apart, 21 of 2,000 rows): alone and
    # packed differ by noise, not by a bias, so their mean gap stays within a point.
    assert sum(gaps) / len(gaps) <= 0.01


COMPILED_MEMBERS: list[dict[str, Any]] = [
    *MEMBERS[:3],
    {"learning_rate": 3e-3, "batch_size": 128, "dropout": 0.3, "grad_clip_norm": 0.5},
]


def assert_same_training(eager: list[TrainResult], other: list[TrainResult]) -> None:
    """Same epochs and, to float rounding, the same losses and values."""
    for first, second in zip(eager, other, strict=True):
        assert [r.epoch for r in first.history] == [r.epoch for r in second.history]
        assert [r.train_loss for r in second.history] == pytest.approx(
            [r.train_loss for r in first.history], rel=1e-4
        )
        assert second.value == pytest.approx(first.value, abs=1e-3)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_compiled_step_trains_as_the_eager_one_in_one_graph(optimizer: str) -> None:
    from torch._dynamo.utils import counters

    spec = make(SYNTHETIC, max_epochs=3, optimizer=optimizer)
    data = load_dataset(spec)
    configs = configs_of(spec, COMPILED_MEMBERS)  # dropout, clipping, decay, four batch sizes
    eager = train_pack(configs, data)
    counters.clear()
    compiled = train_pack(configs, data, compiled=True)
    assert dict(counters["graph_break"]) == {}  # dynamo traced the step whole
    assert counters["stats"]["unique_graphs"] >= 2  # gradients and descent were compiled
    assert_same_training(eager, compiled)


def test_a_worker_told_to_compile_trains_its_packs_compiled(tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    store = Store.open(f"sqlite:///{tmp_path / 'compiled.db'}")
    spec = make(SYNTHETIC, max_epochs=2).model_copy(update={"name": "compiled"})
    raw = spec.model_dump()
    raw["search_space"] = {"learning_rate": {"low": 1e-3, "high": 1e-1, "log": True}}
    submit_study(store, parse_spec(raw))
    counters.clear()
    options = WorkerOptions(store, "cpu", pack=4, max_trials=4, compiled=True)
    assert Worker(options).run() == 0
    assert counters["stats"]["calls_captured"] > 0  # the step went through dynamo
    study = optuna.load_study(study_name="compiled", storage=store.optuna())
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4


@pytest.mark.cuda
def test_a_pack_step_never_waits_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside an epoch the host only queues work: a step that read a value back from the
    device would stall the queue at every batch."""
    from hpsearch.training import fused

    original = fused._Pack._step

    def strict_step(self: Any, *args: Any) -> torch.Tensor:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(fused._Pack, "_step", strict_step)
    spec = make(SYNTHETIC, max_epochs=2)
    results = train_pack(configs_of(spec, COMPILED_MEMBERS), load_dataset(spec, "cuda"))
    assert all(r.epochs_run == 2 for r in results)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_compiled_step_on_a_gpu_trains_as_the_eager_one(precision: str) -> None:
    spec = make(SYNTHETIC, max_epochs=3, precision=precision)
    data = load_dataset(spec, "cuda")
    configs = configs_of(spec, COMPILED_MEMBERS)
    eager = train_pack(configs, data)
    assert_same_training(eager, train_pack(configs, data, compiled=True))
    assert torch.get_float32_matmul_precision() == "highest"  # tf32 was put back


def test_tf32_is_fp32_on_a_cpu_and_leaves_the_process_setting_alone() -> None:
    fp32, tf32 = make(SYNTHETIC, max_epochs=2), make(SYNTHETIC, max_epochs=2, precision="tf32")
    data = load_dataset(fp32)
    losses = [
        [[r.train_loss for r in result.history] for result in train_pack(configs_of(spec), data)]
        for spec in (fp32, tf32)
    ]
    assert losses[0] == losses[1]
    assert torch.get_float32_matmul_precision() == "highest"


def test_the_member_network_holds_the_best_weights_and_scores_its_metrics() -> None:
    spec = make({"source": "builtin", "name": "iris"})
    data = load_dataset(spec)
    (result, *_) = train_pack(configs_of(spec), data)
    model = result.model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
    assert accuracy == pytest.approx(result.val_metrics["val_accuracy"])
    assert result.value == pytest.approx(result.val_metrics["val_accuracy"])


def test_a_pruned_member_leaves_at_once_and_the_others_finish() -> None:
    spec = make({**SYNTHETIC, "n_samples": 2000})
    data = load_dataset(spec)
    events: list[tuple[str, int, int]] = []

    def on_epoch(index: int, record: Any) -> bool:
        events.append(("epoch", index, record.epoch))
        return index == 1 and record.epoch == 2

    def on_done(index: int, result: TrainResult) -> None:
        events.append(("done", index, result.epochs_run))

    results = train_pack(configs_of(spec), data, on_epoch=on_epoch, on_done=on_done)
    assert results[1].pruned and results[1].epochs_run == 2
    assert ("done", 1, 2) in events
    assert events.index(("done", 1, 2)) < events.index(("epoch", 0, 3))  # told before epoch 3
    assert ("epoch", 1, 3) not in events
    for k in (0, 2, 3):
        assert not results[k].pruned and results[k].epochs_run == 6


def test_divergence_and_early_stopping_are_per_member() -> None:
    iris = {"source": "builtin", "name": "iris"}
    spec = make(iris, max_epochs=300, early_stopping_patience=3, optimizer="sgd")
    data = load_dataset(spec)
    members = [{"learning_rate": 50.0, "batch_size": 16}, {"learning_rate": 0.05, "batch_size": 16}]
    exploding, healthy = train_pack(configs_of(spec, members), data)
    assert exploding.diverged and exploding.epochs_run <= 3
    assert healthy.stopped_early and not healthy.diverged
    assert healthy.epochs_run - healthy.best_epoch == 3
    assert healthy.epochs_run < 300
    assert healthy.value > exploding.value


@pytest.mark.parametrize(
    ("dataset", "metric"),
    [
        ({"source": "builtin", "name": "diabetes"}, "val_rmse"),
        (
            {"source": "synthetic", "task": "multilabel", "n_samples": 600, "n_classes": 4},
            "val_f1",
        ),
    ],
)
def test_regression_and_multilabel_packs(dataset: dict[str, Any], metric: str) -> None:
    spec = make(dataset)
    data = load_dataset(spec)
    members = [{"learning_rate": 3e-3, "batch_size": 32}, {"learning_rate": 1e-3, "batch_size": 64}]
    configs = configs_of(spec, members)
    packed = train_pack(configs, data)
    alone = [train(config, data) for config in configs]
    for member, single in zip(packed, alone, strict=True):
        assert member.val_metrics[metric] == pytest.approx(single.val_metrics[metric], rel=1e-2)


def test_a_pack_refuses_trials_of_different_networks() -> None:
    spec = make({"source": "builtin", "name": "iris"})
    wide = TrialConfig.from_spec(spec, {"hidden_units": 64, "n_layers": 1})
    with pytest.raises(ValueError, match="one architecture"):
        train_pack([*configs_of(spec)[:1], wide], load_dataset(spec))


def interrupted_pack(spec: Any, data: Any, at_epoch: int) -> tuple[list[TrainResult], dict]:
    """Run the pack until `at_epoch`, then checkpoint every member and stop."""
    stop, payloads = threading.Event(), {}

    def on_epoch(index: int, record: Any) -> bool:
        if record.epoch == at_epoch:
            stop.set()
        return False

    def on_checkpoint(index: int, payload: bytes, epoch: int) -> None:
        payloads[index] = (payload, epoch)

    results = train_pack(
        configs_of(spec),
        data,
        on_epoch,
        on_checkpoint=on_checkpoint,
        checkpoint_every_s=3600,
        checkpoint_now=stop,
        stop_after_checkpoint=True,
    )
    return results, payloads


def test_members_checkpoint_and_resume_in_a_pack_or_alone() -> None:
    spec = make({**SYNTHETIC, "n_samples": 3000}, max_epochs=6, early_stopping_patience=None)
    data = load_dataset(spec)
    configs = configs_of(spec)
    whole = train_pack(configs, data)
    stopped, payloads = interrupted_pack(spec, data, at_epoch=3)
    assert all(r.interrupted and r.epochs_run == 3 for r in stopped)
    assert sorted(payloads) == [0, 1, 2, 3] and {e for _, e in payloads.values()} == {3}
    assert all(Checkpoint.from_bytes(p).epoch == 3 for p, _ in payloads.values())
    resumed = train_pack(configs, data, resume_from=[payloads[i][0] for i in range(4)])
    alone = [train(c, data, resume_from=payloads[i][0]) for i, c in enumerate(configs)]
    for k in range(4):
        for result in (resumed[k], alone[k]):
            assert result.resumed_from_epoch == 3 and result.epochs_run == 6
            assert [r.epoch for r in result.history] == list(range(1, 7))
            assert result.history[:3] == stopped[k].history
    for k in (0, 3):  # no dropout: the resumed runs continue the same batches and moments
        assert resumed[k].value == pytest.approx(whole[k].value, abs=2e-3)
        assert alone[k].history[-1].train_loss == pytest.approx(
            whole[k].history[-1].train_loss, rel=1e-2
        )


def test_a_single_runs_checkpoint_resumes_in_a_pack() -> None:
    spec = make({**SYNTHETIC, "n_samples": 3000}, max_epochs=5, early_stopping_patience=None)
    data = load_dataset(spec)
    configs = configs_of(spec)
    saved: list[bytes] = []
    train(configs[0], data, on_checkpoint=lambda p, e: saved.append(p), checkpoint_every_s=0)
    payload = saved[1]  # after epoch 2
    assert Checkpoint.from_bytes(payload).epoch == 2
    whole = train(configs[0], data)
    (resumed, fresh) = train_pack(configs[:1] + configs[3:], data, resume_from=[payload, None])
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 5
    assert fresh.resumed_from_epoch is None and fresh.epochs_run == 5
    assert resumed.value == pytest.approx(whole.value, abs=2e-3)


def test_claimed_trials_are_grouped_by_network_and_batch_norm_trains_alone() -> None:
    spec = parse_spec(
        {
            "name": "grouped",
            "dataset": {"source": "builtin", "name": "iris"},
            "search_space": {
                "hidden_units": {"choices": [8, 16]},
                "learning_rate": {"low": 1e-3, "high": 1e-1, "log": True},
            },
            "sampler": {"name": "random", "seed": 1},
            "budget": {"n_trials": 8},
        }
    )
    study = optuna.create_study(direction="maximize")
    claims = [Claim.of(study.ask(), spec) for _ in range(8)]
    groups = packs(claims)
    assert sorted(c.trial.number for g in groups for c in g) == list(range(8))
    assert len(groups) == 2
    for group in groups:
        assert len({c.trial.params["hidden_units"] for c in group}) == 1
    with_batch_norm = spec.model_copy(
        update={"model": spec.model.model_copy(update={"batch_norm": True})}
    )
    alone = [Claim.of(c.trial, with_batch_norm) for c in claims]
    assert [len(g) for g in packs(alone)] == [1] * 8
