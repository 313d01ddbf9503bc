"""Export for serving without hpsearch: a TorchScript file and a JSON file beside it.

The TorchScript module (`torch.jit.load` alone reads it) takes a float tensor of raw rows,
one column per feature column in the original order (`columns` in the JSON), a categorical
column holding the index of its value in `categories[column]` (-1 for a value not listed,
which gets all zeros as in `TrainedModel`). Everything numeric happens inside: the one-hot
encoding, the standardisation by the training rows' mean and std, the network, and the
output: class or label probabilities (columns in the order of `labels`), or regression
values in the target's units. Only the text of a categorical value must be looked up in
the JSON, which TorchScript cannot take as input.

Recent torch releases deprecate TorchScript in favour of torch.export, but `torch.jit.load`
still reads it, in Python or in C++ (libtorch).
"""

# No `from __future__ import annotations`: TorchScript reads the class annotations of
# ServingModule as types, not as strings.
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from hpsearch.training.modelfile import TrainedModel


class ServingModule(nn.Module):
    """A trained model's preprocessing, network and output activation, scriptable."""

    task: str
    one_hot: list[tuple[int, int]]  # (column, number of categories) of each one-hot column
    divisor: float
    target_mean: float
    target_std: float

    def __init__(self, model: "TrainedModel") -> None:
        super().__init__()
        encoding, columns = model.encoding, model.columns
        self.network = model.module
        self.task = model.task
        numeric = [i for i, c in enumerate(columns) if c not in encoding.categories]
        self.register_buffer("numeric", torch.tensor(numeric, dtype=torch.long))
        self.one_hot = [(columns.index(c), len(v)) for c, v in encoding.categories.items()]
        self.divisor = float(encoding.divisor)
        n_features = len(encoding.feature_names)
        # Without standardisation, x - 0 and x / 1 leave every value as it is.
        mean = torch.zeros(n_features) if model.mean is None else torch.tensor(model.mean)
        std = torch.ones(n_features) if model.std is None else torch.tensor(model.std)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.target_mean, self.target_std = model.target_scale or (0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Numbers reach float32 as pandas takes them there: from float64, divided first.
        numeric = (x.index_select(1, self.numeric).double() / self.divisor).float()
        parts = [numeric]
        for column, size in self.one_hot:
            codes = x[:, column : column + 1]
            values = torch.arange(size, dtype=codes.dtype, device=codes.device)
            parts.append((codes == values).float())
        out = self.network((torch.cat(parts, dim=1) - self.mean) / self.std)
        if self.task == "classification":
            return torch.softmax(out, dim=1)
        if self.task == "multilabel":
            return torch.sigmoid(out)
        return out * self.target_std + self.target_mean


def export(model: "TrainedModel", path: Path) -> tuple[Path, Path]:
    """Write the TorchScript module to `path` and its JSON to `path` with suffix .json."""
    scripted = torch.jit.script(ServingModule(model).eval())
    torch.jit.save(scripted, str(path))
    described = path.with_suffix(".json")
    described.write_text(json.dumps(serving_json(model), indent=2) + "\n")
    return path, described


def serving_json(model: "TrainedModel") -> dict[str, Any]:
    """What a caller of the TorchScript module needs to know besides torch."""
    return {
        "format": 1,
        "study": model.study,
        "trial": model.trial,
        "task": model.task,
        "columns": model.columns,
        "categories": {c: list(v) for c, v in model.encoding.categories.items()},
        "unknown_category": -1,
        "outputs": "values" if model.task == "regression" else "probabilities",
        "labels": model.labels,
        "target": model.target,
        "params": model.params,
        "metrics": model.metrics,
        "hpsearch_version": model.versions["hpsearch"],
        "torch_version": model.versions["torch"],
    }
