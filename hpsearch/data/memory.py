"""How much device memory a trial takes, estimated from its spec and its data's size before
anything is allocated.

Admission refuses a study whose largest trial cannot fit (`refusal`), naming the field to
change, so a spec that would fail every trial on every worker never reaches one; a worker
trains no more trials at once in a fused pack than fit together (`largest_pack`), and on a
GPU sizes its packs from the memory free there (`gpu_pack`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from hpsearch.data.facts import DataFacts, split_sizes
from hpsearch.spec import StudySpec

GIB = 1024**3
EVAL_CHUNK_ROWS = 65536  # rows per forward pass when evaluating, to bound memory on big sets
# A fifth of an 80 GB GPU, or all of a 16 GB one: room for a pack of small networks, or a
# handful of large ones, beside whatever else shares the device.
DEFAULT_MAX_TRIAL_GB = 16.0
BYTES_PER_VALUE = 4  # float32 data, weights, optimiser state and activations
# Copies of every parameter a trial holds: the weights, their gradients, two moments of
# Adam (the most of any optimiser offered), the update's intermediate, and the best epoch's
# weights kept for the end.
COPIES_PER_PARAMETER = 6
# Values per hidden unit and row that a training step keeps for the backward pass: the
# linear output, the activation, and the dropout mask or batch norm's normalised input.
SAVED_PER_UNIT = 3
# A GPU pack may fill this share of the device memory free when it is claimed: the rest is
# room for the estimate's error, the allocator's fragmentation and the CUDA context.
GPU_PACK_SHARE = 0.8
# At most this many trials in a pack chosen for a GPU: a pack's points are drawn from one
# history, so a sampler learns nothing between its members.
MAX_GPU_PACK = 64
# And at most the study's budget over this many: the sampler sees at least this many rounds.
MIN_ROUNDS = 4


def max_trial_bytes() -> float:
    """The most device memory one trial may take ($HPSEARCH_MAX_TRIAL_GB, in GiB)."""
    return float(os.environ.get("HPSEARCH_MAX_TRIAL_GB", DEFAULT_MAX_TRIAL_GB)) * GIB


@dataclass(frozen=True)
class MemoryEstimate:
    """The device memory of the largest trial a spec allows, in bytes."""

    data: int  # the data set on the device, shared by every trial of a pack
    network: int  # parameters with their gradients, optimiser state and best copy
    activations: int  # what the largest batch keeps for the backward pass
    batch_size: int

    @property
    def per_trial(self) -> int:
        return self.network + self.activations

    def pack(self, size: int) -> int:
        """A fused pack of `size` trials: one copy of the data, the rest per trial."""
        return self.data + size * self.per_trial


def estimate(spec: StudySpec, facts: DataFacts) -> MemoryEstimate:
    """The largest trial of the spec: the widest and deepest network and the largest batch
    its search space allows, on data of the size `facts` gives."""
    widest = {
        key: _largest(spec, key, 0)
        for key in ("n_layers", "hidden_units")
        if key in spec.search_space.dimensions()
    }
    widths = [*spec.model.hidden_layers(widest), facts.n_outputs]
    inputs = [facts.n_features, *widths[:-1]]
    parameters = sum((n_in + 1) * n_out for n_in, n_out in zip(inputs, widths, strict=True))
    n_train = max(1, split_sizes(facts.n_rows, spec.split)[0])
    batch = min(_largest(spec, "batch_size", spec.training.batch_size), n_train)
    # The batch's own rows (gathered from the data set, kept for the first layer's gradient)
    # and what every layer keeps.
    training = batch * (facts.n_features + SAVED_PER_UNIT * sum(widths))
    evaluation = min(facts.n_rows, EVAL_CHUNK_ROWS) * 2 * max(widths)
    return MemoryEstimate(
        data=facts.n_rows * (facts.n_features + facts.n_outputs) * BYTES_PER_VALUE,
        network=parameters * COPIES_PER_PARAMETER * BYTES_PER_VALUE,
        activations=max(training, evaluation) * BYTES_PER_VALUE,
        batch_size=batch,
    )


def refusal(spec: StudySpec, memory: MemoryEstimate, limit: float) -> tuple[str, str] | None:
    """(field, reason) when a single trial needs more than `limit` bytes: the field is the
    one behind the largest part of the estimate, so the user knows what to shrink."""
    total = memory.pack(1)
    if total <= limit:
        return None
    parts = {
        _network_field(spec): memory.network,
        _searched_or(spec, "batch_size", "training.batch_size"): memory.activations,
        "dataset": memory.data,
    }
    field = max(parts, key=lambda name: parts[name])
    reason = (
        f"a trial needs about {_gib(total)} of device memory (data {_gib(memory.data)}, "
        f"network and optimiser state {_gib(memory.network)}, activations "
        f"{_gib(memory.activations)} at batch size {memory.batch_size:,}), more than the "
        f"{_gib(limit)} a trial may take (HPSEARCH_MAX_TRIAL_GB)"
    )
    return field, reason


def largest_pack(memory: MemoryEstimate, limit: float) -> int:
    """How many trials fit in `limit` bytes as one pack (at least 1: a single trial was
    admitted against the same limit)."""
    return max(1, int((limit - memory.data) // max(memory.per_trial, 1)))


def gpu_pack(memory: MemoryEstimate, free: float, n_trials: int) -> int:
    """Trials to train at once on a GPU when the user names no pack size.

    As many of the spec's largest trial as fit in GPU_PACK_SHARE of the `free` device
    memory (a big GPU trains many small networks at once: one kernel does the work of all),
    but no more than MAX_GPU_PACK, nor than the budget `n_trials` over MIN_ROUNDS, so the
    sampler still learns from earlier trials when it draws later ones.
    """
    fit = largest_pack(memory, free * GPU_PACK_SHARE)
    return max(1, min(fit, MAX_GPU_PACK, math.ceil(n_trials / MIN_ROUNDS)))


def _largest(spec: StudySpec, key: str, default: int) -> int:
    """The largest value a searched integer key can take, else its fixed value."""
    dim = spec.search_space.dimensions().get(key)
    if dim is None:
        return int(default)
    return int(max(dim.choices) if dim.choices is not None else dim.high)


def _network_field(spec: StudySpec) -> str:
    searched = spec.search_space.dimensions()
    if "hidden_units" in searched:
        return "search_space.hidden_units"
    return "search_space.n_layers" if "n_layers" in searched else "model.hidden"


def _searched_or(spec: StudySpec, key: str, fixed: str) -> str:
    return f"search_space.{key}" if key in spec.search_space.dimensions() else fixed


def _gib(size: float) -> str:
    return f"{size / GIB:,.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:,.1f} MiB"
