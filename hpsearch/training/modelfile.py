"""The model file: one trial's trained network with everything needed to use it on raw rows.

A worker writes it for each of a study's best trials (`model_file`), the API and the CLI
serve its bytes as they are, and `hpsearch.load_model` reads it back as a `TrainedModel`
that predicts from the rows of the original table. It is a `torch.save`d dict of plain
values and tensors, so `torch.load(..., weights_only=True)` reads it and loading a file
from elsewhere can run no code. Format 1 (docs/architecture.md, "Model files"):

- `format` (1), `hpsearch_version`, `torch_version`, `study`, `trial`, `task`;
- `network`: `build_mlp`'s arguments (`n_features`, `n_outputs`, `hidden`, `activation`,
  `batch_norm`, `dropout`) and `state_dict`, the weights as CPU tensors;
- `encoding`: `tables.Encoding` (feature columns, one-hot categories, every column of the
  table, the targets, the labels' type, a divisor);
- `standardize`: the training rows' `mean` and `std` per encoded feature, or None;
- `labels`: the classes in their original type, the label columns (multilabel), or [];
- `target_scale`: regression's training-target `mean` and `std`, else None;
- `params` and `metrics` (val_* and test_*) of the trial.

Weights kept before model files existed are a bare `state_dict`; reading one is a
ModelFileError that says so (the download itself still answers its bytes).
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import hpsearch
from hpsearch.data.tables import Encoding, check_finite, standardize
from hpsearch.errors import DatasetError, HpsearchError, ModelFileError
from hpsearch.spec import SplitSpec, Task
from hpsearch.training.model import build_mlp

if TYPE_CHECKING:
    from hpsearch.data.tensors import TensorData
    from hpsearch.training.train import TrainResult

FORMAT = 1
_LABEL_TYPES = {"str": str, "int": int, "float": float}


def model_file(result: TrainResult, *, study: str, trial: int, params: dict[str, Any]) -> bytes:
    """The model file of a trained trial, as a worker keeps it."""
    model, config, data = result.model, result.config, result.data
    assert model is not None and config is not None and data is not None
    content = {
        "format": FORMAT,
        "hpsearch_version": hpsearch.__version__,
        "torch_version": str(torch.__version__),  # not its TorchVersion: plain types only
        "study": study,
        "trial": trial,
        "task": data.task,
        "network": {
            "n_features": data.n_features,
            "n_outputs": data.n_outputs,
            "hidden": list(config.hidden),
            "activation": config.activation,
            "batch_norm": config.batch_norm,
            "dropout": config.dropout,
        },
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "encoding": {k: _plain(v) for k, v in asdict(data.encoding).items()},
        "standardize": _standardization(data),
        "labels": _labels(data),
        "target_scale": _target_scale(data),
        "params": dict(params),
        "metrics": result.val_metrics | result.test_metrics,
        "split": None if data.split is None else data.split.model_dump(),
    }
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def _standardization(data: TensorData) -> dict[str, torch.Tensor] | None:
    if data.x_mean is None or data.x_std is None:
        return None  # the spec turned it off
    return {"mean": torch.tensor(data.x_mean), "std": torch.tensor(data.x_std)}


def _target_scale(data: TensorData) -> dict[str, float] | None:
    """Regression trains on standardised targets; predictions are scaled back by these."""
    return {"mean": data.y_mean, "std": data.y_std} if data.task == "regression" else None


def _labels(data: TensorData) -> list[Any]:
    """The classes as the target column held them (3, not "3"); multilabel: the label
    columns; regression: none."""
    if data.task == "classification":
        return [_LABEL_TYPES[data.encoding.label_type](c) for c in data.classes]
    return list(data.classes)


def _plain(value: Any) -> Any:
    """Tuples as lists, so the file holds only the plainest types."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trial's network with its preprocessing: `predict` and `predict_proba` take raw rows,
    as a numpy array in the original column order or a DataFrame with the original column
    names (other columns, the target among them, are ignored).

    Rows are encoded exactly as training encoded them (`tables.Encoding`), then scaled by
    the training rows' mean and std. A categorical value not seen in training has no
    one-hot column of its own: its columns are all zeros, as if the value were absent.
    """

    module: nn.Module  # the torch network, on the CPU, in eval mode
    task: Task
    labels: list[Any]  # the classes (original type and vocabulary), or the label columns
    encoding: Encoding
    mean: np.ndarray | None  # float32 per encoded feature; None: not standardised
    std: np.ndarray | None
    target_scale: tuple[float, float] | None  # regression: (mean, std) of training targets
    params: dict[str, Any]
    metrics: dict[str, float]
    study: str
    trial: int
    versions: dict[str, str]  # hpsearch and torch, as they wrote the file
    split: SplitSpec | None = None  # how training split its table's rows

    @property
    def columns(self) -> list[str]:
        """The feature columns the rows must have, in their original order."""
        return list(self.encoding.columns)

    @property
    def target(self) -> list[str]:
        return list(self.encoding.targets)

    def predict(self, rows: Any) -> np.ndarray:
        """Classification: the labels; multilabel: 0/1 per label column; regression: values."""
        return self._predicted(self.outputs(rows))

    def predict_proba(self, rows: Any) -> np.ndarray:
        """Each class's probability (columns in the order of `labels`); multilabel: each
        label's own probability."""
        if self.task == "regression":
            raise HpsearchError("a regression model predicts values, not probabilities")
        return self._probabilities(self.outputs(rows))

    def prediction_table(self, rows: Any) -> pd.DataFrame:
        """The predictions as `hpsearch predict` writes them, one row per row:
        classification: `prediction` (the label) and `proba_<label>` per class;
        multilabel: 0/1 per label column and `proba_<label>`; regression: `prediction`."""
        out = self.outputs(rows)
        predicted = self._predicted(out)
        if self.task == "regression":
            return pd.DataFrame({"prediction": predicted})
        if self.task == "multilabel":
            chosen = pd.DataFrame(predicted, columns=self.labels)
        else:
            chosen = pd.DataFrame({"prediction": predicted})
        names = [f"proba_{label}" for label in self.labels]
        return pd.concat([chosen, pd.DataFrame(self._probabilities(out), columns=names)], axis=1)

    def _predicted(self, out: torch.Tensor) -> np.ndarray:
        """As training scored them: the largest logit, a positive one, or the value in the
        target's units."""
        if self.task == "classification":
            return np.asarray(self.labels)[out.argmax(dim=1).numpy()]
        if self.task == "multilabel":
            return (out > 0).to(torch.int64).numpy()
        mean, std = self.target_scale or (0.0, 1.0)
        return (out * std + mean).numpy()

    def _probabilities(self, out: torch.Tensor) -> np.ndarray:
        if self.task == "multilabel":
            return torch.sigmoid(out).numpy()
        return torch.softmax(out, dim=1).numpy()

    @torch.no_grad()
    def outputs(self, rows: Any) -> torch.Tensor:
        """The network's raw outputs (logits; standardised values for regression)."""
        return self.module(torch.from_numpy(self.features(rows)))

    def features(self, rows: Any) -> np.ndarray:
        """The rows as the network reads them: encoded and standardised, float32."""
        frame = self._frame(rows)
        check_finite(frame[self.columns], "the rows")
        # A copy: the encoded rows may be a view of the caller's array, scaled in place next.
        x = self.encoding.encode(frame).copy()
        if self.mean is not None and self.std is not None:
            standardize(x, self.mean, self.std)
        return x

    def test_rows(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows of `table` that training held out as its test split, where the stored
        test metrics were measured: `table` is the study's training table, whole and in its
        order (the split is stratified by its target column for classification)."""
        if self.split is None:
            raise HpsearchError("this model file does not record how its rows were split")
        from hpsearch.data.tensors import split_rows  # scikit-learn: only where asked for

        labels = self._class_indices(table) if self.task == "classification" else None
        return table.iloc[split_rows(len(table), labels, self.split)[2]]

    def _class_indices(self, table: pd.DataFrame) -> np.ndarray:
        target = self.target[0]
        if target not in table.columns:
            raise DatasetError(f"the table has no target column '{target}' to split it by")
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted({str(v) for v in table[target] if v not in index})
        if unknown:
            raise DatasetError(
                f"column '{target}' holds labels the model was not trained on: {_names(unknown)}"
            )
        return np.array([index[v] for v in table[target]])

    def export(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """A TorchScript file for serving without hpsearch, and its JSON (`export`)."""
        from hpsearch.training.export import export

        return export(self, Path(path))

    def _frame(self, rows: Any) -> pd.DataFrame:
        """The rows as a table with the feature columns by name, or an error that says which
        columns are missing."""
        if isinstance(rows, pd.DataFrame):
            frame = rows.rename(columns=str)
            missing = [c for c in self.columns if c not in frame.columns]
            if missing:
                raise DatasetError(
                    f"the rows have no column{'s' if len(missing) > 1 else ''} "
                    f"{_names(missing)}; the model reads {_names(self.columns)}"
                )
            return frame
        array = np.asarray(rows)
        if array.ndim != 2:
            raise DatasetError(
                f"give the rows as a 2-D array (rows x columns) or a DataFrame, not an array "
                f"of shape {array.shape}"
            )
        for names in (self.columns, list(self.encoding.source_columns)):
            if array.shape[1] == len(names):  # the features alone, or with the target
                return pd.DataFrame(array, columns=names)
        raise DatasetError(
            f"the rows have {array.shape[1]} columns; the model reads {len(self.columns)}: "
            f"{_names(self.columns)}"
        )


def _names(columns: list[str], limit: int = 20) -> str:
    shown = ", ".join(f"'{c}'" for c in columns[:limit])
    return shown if len(columns) <= limit else f"{shown}, ... ({len(columns)} in all)"


def load_model(source: str | os.PathLike[str] | bytes) -> TrainedModel:
    """A model file downloaded from a study (`GET .../trials/{n}/model`; its path or its
    bytes) as a `TrainedModel` that predicts on raw rows: `predict`, `predict_proba`,
    `module` (the torch network), `labels`, `metrics`, `params`."""
    payload = source if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    content = _read(bytes(payload))
    try:
        return _trained_model(content)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"a damaged model file: {type(exc).__name__}: {exc}") from None


def _read(payload: bytes) -> dict[str, Any]:
    """The file's dict, once it is known to be a model file this hpsearch can read."""
    try:
        content = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelFileError(f"not a model file (torch.load: {exc})") from None
    if not isinstance(content, dict):
        raise ModelFileError("not a model file: it holds no dict")
    if "format" not in content:
        if content and all(isinstance(v, torch.Tensor) for v in content.values()):
            raise ModelFileError(
                "this is a bare state_dict, the weights alone, as trials kept them before "
                "model files: it has no architecture, preprocessing or labels to predict "
                "with. Train the study further (hpsearch extend) to keep model files"
            )
        raise ModelFileError("not a model file: it has no 'format'")
    if content["format"] != FORMAT:
        raise ModelFileError(
            f"a model file of format {content['format']!r}; this hpsearch "
            f"({hpsearch.__version__}) reads format {FORMAT}: upgrade hpsearch"
        )
    return content


def _trained_model(content: dict[str, Any]) -> TrainedModel:
    task = content["task"]
    encoding = content["encoding"]
    scaled = content["standardize"]
    target_scale = content["target_scale"]
    return TrainedModel(
        module=_network(content["network"], task, content["state_dict"]),
        task=task,
        labels=list(content["labels"]),
        encoding=Encoding(
            columns=tuple(encoding["columns"]),
            categories={c: tuple(v) for c, v in encoding["categories"].items()},
            source_columns=tuple(encoding["source_columns"]),
            targets=tuple(encoding["targets"]),
            label_type=encoding["label_type"],
            divisor=encoding["divisor"],
        ),
        mean=None if scaled is None else scaled["mean"].numpy(),
        std=None if scaled is None else scaled["std"].numpy(),
        target_scale=None if target_scale is None else (target_scale["mean"], target_scale["std"]),
        params=dict(content["params"]),
        metrics=dict(content["metrics"]),
        study=content["study"],
        trial=content["trial"],
        versions={"hpsearch": content["hpsearch_version"], "torch": content["torch_version"]},
        split=None if content.get("split") is None else SplitSpec(**content["split"]),
    )


def _network(network: dict[str, Any], task: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The trial's network (`train.build_model`'s) holding the file's weights. Built on the
    meta device, then given the weights: no memory or random draws for a throwaway init."""
    with torch.device("meta"):
        model = build_mlp(
            network["n_features"],
            network["n_outputs"],
            list(network["hidden"]),
            activation=network["activation"],
            init="default",
            batch_norm=network["batch_norm"],
            dropout=network["dropout"],
        )
    if task == "regression":
        model.append(nn.Flatten(start_dim=0))
    model.load_state_dict(state, assign=True)
    return model.eval()
