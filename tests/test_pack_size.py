"""How many trials a worker claims and trains at once: --pack when given, one on a CPU, and
on a GPU as many as its free memory holds, bounded so that the sampler keeps learning."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hpsearch.data import memory
from hpsearch.data.facts import BUILTIN_FACTS, DataFacts
from hpsearch.runtime import worker as worker_module
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.service.studies import StudyState
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store

GIB = 1024**3
MNIST_SIZED = DataFacts("classification", 60_000, 784, 10)


def spec_of(n_trials: int = 1000, **changes: Any) -> StudySpec:
    raw: dict[str, Any] = {
        "name": "packs",
        "dataset": {"source": "builtin", "name": "digits"},
        "search_space": {
            "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
            "batch_size": {"choices": [32, 64, 128]},
        },
        "model": {"hidden": [128]},
        "budget": {"n_trials": n_trials},
    }
    raw.update(changes)
    return parse_spec(raw)


def state_of(spec: StudySpec) -> StudyState:
    return StudyState(1, spec.name, "running", spec.budget.n_trials, spec)


@pytest.fixture
def pack_size(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """The pack a worker on `device` claims from a study of `spec`, with `free_gib` of device
    memory free (CUDA's answer, stood in for here)."""

    def size(spec: StudySpec, device: str, free_gib: float = 100.0, **options: Any) -> int:
        monkeypatch.setattr(worker_module, "free_device_bytes", lambda _: free_gib * GIB)
        worker = Worker(WorkerOptions(Store("sqlite://"), device, **options))  # never opened
        return worker._pack_size(state_of(spec))

    return size


def test_the_estimate_counts_a_packs_input_rows_and_every_copy_of_its_weights() -> None:
    estimate = memory.estimate(spec_of(), MNIST_SIZED)
    parameters = (784 + 1) * 128 + (128 + 1) * 10
    assert estimate.network == parameters * 6 * 4  # weights, grads, 2 moments, scratch, best
    assert estimate.batch_size == 128
    training = 128 * (784 + 3 * (128 + 10)) * 4
    evaluation = 60_000 * 2 * 128 * 4
    assert estimate.activations == max(training, evaluation)
    assert estimate.data == 60_000 * (784 + 10) * 4


def test_a_gpu_pack_fills_its_share_of_free_memory_up_to_the_caps() -> None:
    estimate = memory.MemoryEstimate(
        data=GIB, network=GIB // 4, activations=GIB // 4, batch_size=64
    )
    # 0.8 x 11 GiB = 8.8 GiB: 1 GiB of data and 15 trials of half a GiB.
    assert memory.gpu_pack(estimate, 11 * GIB, n_trials=1000) == 15
    assert memory.gpu_pack(estimate, 1000 * GIB, n_trials=1000) == memory.MAX_GPU_PACK
    assert memory.gpu_pack(estimate, 1000 * GIB, n_trials=30) == math.ceil(30 / memory.MIN_ROUNDS)
    assert memory.gpu_pack(estimate, 0.5 * GIB, n_trials=1000) == 1  # one trial was admitted


def test_a_cpu_worker_claims_one_trial_unless_told_otherwise(pack_size: Callable[..., int]) -> None:
    assert pack_size(spec_of(), "cpu") == 1
    assert pack_size(spec_of(), "cpu", pack=4) == 4
    assert pack_size(spec_of(), "cpu", pack=4, max_trials=3) == 3


def test_a_gpu_worker_sizes_its_pack_from_free_memory_the_network_and_the_budget(
    pack_size: Callable[..., int],
) -> None:
    assert pack_size(spec_of(), "cuda:0", free_gib=100) == memory.MAX_GPU_PACK
    assert pack_size(spec_of(n_trials=20), "cuda:0", free_gib=100) == 5
    wide = spec_of(model={"hidden": [4096, 4096]})
    per_trial = memory.estimate(wide, BUILTIN_FACTS["digits"]).per_trial
    fit = int(0.8 * 2 * GIB // per_trial)  # digits' data is a rounding error here
    assert 1 < pack_size(wide, "cuda:0", free_gib=2) == fit < memory.MAX_GPU_PACK
    assert pack_size(spec_of(), "cuda:0", free_gib=100, pack=8) == 8  # --pack wins
    assert pack_size(spec_of(), "cuda:0", free_gib=100, max_trials=10) == 10


def test_a_gpu_worker_claims_one_trial_of_data_it_cannot_read(
    pack_size: Callable[..., int], tmp_path: Path
) -> None:
    missing = spec_of(dataset={"source": "file", "path": str(tmp_path / "gone.csv"), "target": "y"})
    assert pack_size(missing, "cuda:0") == 1  # its load fails that trial with the reason


@pytest.mark.cuda
def test_a_packs_estimate_covers_what_it_allocates_on_a_gpu() -> None:
    from hpsearch.data.tensors import load_dataset
    from hpsearch.training.fused import train_pack
    from hpsearch.training.train import TrialConfig

    spec = parse_spec(
        {
            "name": "measured",
            "dataset": {"source": "synthetic", "n_samples": 60_000, "n_features": 784},
            "model": {"hidden": [512, 512]},
            "training": {"max_epochs": 1, "batch_size": 256},
            "budget": {"n_trials": 32},
        }
    )
    data = load_dataset(spec, "cuda")
    estimate = memory.estimate(spec, data.facts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_pack([TrialConfig.from_spec(spec, {}) for _ in range(32)], data)
    used = torch.cuda.max_memory_allocated() - before + estimate.data  # data was loaded
    assert used <= estimate.pack(32) <= 4 * used, (used, estimate.pack(32))
