"""Tables: read a user's data (a file or an upload), check it, and encode it as numbers.

Everything here needs only numpy and pandas, never torch or scikit-learn: admitting a
study (the API, `hpsearch submit`) checks its data through this module, and those paths
must start at once. Preparing the tensors a worker trains on is `hpsearch.data.tensors`'s.
Every problem with the data is a DatasetError whose message names the file, column or
setting to fix, because the user who reads it wrote a spec, not our code.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import numpy as np
import pandas as pd

from hpsearch.data.facts import DataFacts
from hpsearch.errors import DatasetError, DatasetTooLarge
from hpsearch.spec import (
    FileDataset,
    StudySpec,
    Task,
    UploadedDataset,
)

DatasetFormat = Literal["csv", "parquet", "npz"]


@dataclass(frozen=True)
class Upload:
    """An uploaded dataset as its store keeps it: everything reading it needs."""

    id: int
    name: str
    content: bytes
    format: DatasetFormat
    target: str | list[str]
    task: Task | None


class Uploads(Protocol):
    """Where uploaded datasets are read from, by id (the service's store implements it).

    Data code reads uploads only through this, so it never touches the database; an
    implementation must be hashable and equal for the same store, because loaded data is
    cached per store.
    """

    def __call__(self, dataset_id: int) -> Upload:
        """The upload, or a DatasetError naming the id when the store has none."""
        ...


MAX_CATEGORIES = 50  # a text column with more distinct values is an id or free text, not a category
MAX_INFERRED_CLASSES = 50  # an integer target with more distinct values is taken as a quantity


LabelType = Literal["str", "int", "float"]


@dataclass(frozen=True)
class Encoding:
    """How a table's raw rows became the numbers a network reads: kept with the trained
    weights (`hpsearch.training.modelfile`), so that new rows are encoded exactly as the
    training rows were, by this same code.

    The features are the numeric columns as they are (divided by `divisor`), then each
    categorical column one-hot: one 0/1 column per value of `categories[column]`, in the
    order pandas' get_dummies gives them. A value a column did not hold in training gets
    all zeros. Values are matched as text, so a CSV read again matches its own categories.
    """

    columns: tuple[str, ...]  # the feature columns, in the table's order
    categories: dict[str, tuple[str, ...]]  # each one-hot column's values, as text
    source_columns: tuple[str, ...]  # every column of the table, the targets included
    targets: tuple[str, ...]
    label_type: LabelType = "str"  # what a class label was before it became text
    divisor: float = 1.0  # numeric features were divided by it (pixels by 255)

    @classmethod
    def numeric(
        cls,
        names: list[str],
        targets: list[str],
        divisor: float = 1.0,
        label_type: LabelType = "str",
    ) -> Encoding:
        """A table of numeric features only, its targets after them (scikit-learn's frames)."""
        return cls(tuple(names), {}, (*names, *targets), tuple(targets), label_type, divisor)

    @classmethod
    def fit(
        cls, frame: pd.DataFrame, targets: list[str], label_type: LabelType, shown: str
    ) -> Encoding:
        """The encoding of a whole table: which columns are one-hot, with which values."""
        features = frame.drop(columns=targets)
        categories = {}
        for column in _categorical_columns(features, shown):
            values = [str(v) for v in pd.Categorical(features[column]).categories]
            if len(set(values)) < len(values):
                raise DatasetError(
                    f"column '{column}' in {shown} holds values that read the same as text "
                    "(like 1 and '1'); make them one type"
                )
            categories[str(column)] = tuple(values)
        return cls(
            tuple(str(c) for c in features.columns),
            categories,
            tuple(str(c) for c in frame.columns),
            tuple(targets),
            label_type,
        )

    @property
    def feature_names(self) -> list[str]:
        """The network's input columns, named as get_dummies names them."""
        numeric = [c for c in self.columns if c not in self.categories]
        one_hot = [f"{c}_{v}" for c, values in self.categories.items() for v in values]
        return numeric + one_hot

    def encode(self, features: pd.DataFrame) -> np.ndarray:
        """The rows of `features` (which hold at least `columns`) as float32 network inputs."""
        named = features.rename(columns=str).reset_index(drop=True)
        frame = pd.DataFrame({c: self._prepared(named[c]) for c in self.columns})
        encoded = pd.get_dummies(frame, columns=list(self.categories), dtype=float)
        return encoded.to_numpy(np.float32)

    def _prepared(self, column: pd.Series) -> pd.Series | pd.Categorical:
        """A categorical column with its training values as categories (others become
        missing, hence all-zero one-hot); a numeric one as numbers."""
        if column.name in self.categories:
            values, known = column.astype(str), self.categories[column.name]
            return pd.Categorical(values.where(values.isin(known)), categories=known)
        if not pd.api.types.is_numeric_dtype(column.dtype):
            try:
                column = pd.to_numeric(column)
            except (ValueError, TypeError):
                raise DatasetError(
                    f"column '{column.name}' must hold numbers; it holds values like "
                    f"'{column.iloc[0]}'"
                ) from None
        return column if self.divisor == 1 else column.astype(np.float64) / self.divisor


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """Scale float32 rows in place, in float32: training rows and new rows alike (with the
    training rows' mean and std), so that the same row always gets the same bits."""
    x -= mean
    x /= std


@dataclass(frozen=True)
class Table:
    """A whole dataset encoded as numbers, before it is split."""

    x: np.ndarray  # float32 [n, n_features]
    y: np.ndarray  # int64 [n] | float32 [n, L] | float64 [n]
    task: Task
    classes: list[str]
    encoding: Encoding

    @property
    def feature_names(self) -> list[str]:
        return self.encoding.feature_names


def data_dir() -> Path:
    """Where file datasets live: $HPSEARCH_DATA_DIR, else the current working directory."""
    return Path(os.environ.get("HPSEARCH_DATA_DIR") or Path.cwd())


def table_facts(spec: StudySpec, uploads: Uploads | None) -> DataFacts:
    """The facts of a file's or an upload's table (`facts.inspect_dataset`)."""
    dataset = spec.dataset
    if isinstance(dataset, UploadedDataset):  # checked when it was uploaded; must still exist
        frame, upload, shown = _read_upload(dataset, uploads)
        return frame_facts(frame, upload.target, spec.task or upload.task, shown)
    assert isinstance(dataset, FileDataset)
    return frame_facts(_read_file(dataset), dataset.target, spec.task, dataset.path)


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
        y, classes, _ = _class_indices(frame[target], shown)
        check_stratifiable(y, classes)
        n_outputs = len(classes)
    features = frame.drop(columns=targets)
    categorical = _categorical_columns(features, shown)
    width = len(features.columns) - len(categorical)
    width += sum(features[column].nunique() for column in categorical)
    return DataFacts(task, len(frame), width, n_outputs)


# --- files -----------------------------------------------------------------------------


def file_table(dataset: FileDataset, task: Task | None) -> Table:
    frame = _read_file(dataset)
    return labelled_table(frame, dataset.target, task, dataset.path)


def uploaded_table(dataset: UploadedDataset, task: Task | None, uploads: Uploads | None) -> Table:
    frame, upload, shown = _read_upload(dataset, uploads)
    return labelled_table(frame, upload.target, task or upload.task, shown)


def _read_upload(
    dataset: UploadedDataset, uploads: Uploads | None
) -> tuple[pd.DataFrame, Upload, str]:
    if uploads is None:
        raise DatasetError("an uploaded dataset is read from the database: give its URL")
    upload = uploads(dataset.id)
    shown = f"uploaded dataset {upload.id} ({upload.name})"
    return (
        read_table(io.BytesIO(upload.content), upload.format, upload.target, shown),
        upload,
        shown,
    )


def labelled_table(
    frame: pd.DataFrame, target: str | list[str], task: Task | None, shown: str
) -> Table:
    task = task or _infer_task(frame, target, shown)
    targets = _targets(target)
    label_type: LabelType = "str"
    if task == "multilabel":
        y, classes = _multilabel_target(frame, targets, shown), targets
    elif task == "regression":
        y, classes = _regression_target(frame[target], shown), []
    else:
        y, classes, label_type = _class_indices(frame[target], shown)
    encoding = Encoding.fit(frame, targets, label_type, shown)
    return Table(encoding.encode(frame), y, task, classes, encoding)


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
    frame = _read_any(source, fmt, shown, max_cells)
    _check_columns(frame, _targets(target), shown)
    check_finite(frame, shown)
    return frame


def read_rows(path: Path) -> pd.DataFrame:
    """A file of rows to predict on, read as a training table of its format would be
    (the model checks the columns it needs)."""
    if not path.is_file():
        raise DatasetError(f"data file {path} not found")
    return _read_any(path, _format_of(path.name), str(path), None)


def _read_any(
    source: Path | BinaryIO, fmt: DatasetFormat, shown: str, max_cells: int | None
) -> pd.DataFrame:
    try:
        return _read_format(source, fmt, shown, max_cells)
    except (
        ValueError,
        OSError,
        NotImplementedError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
    ) as exc:
        raise DatasetError(f"cannot read {shown} as {fmt}: {exc}") from None


_FORMATS: dict[str, DatasetFormat] = {
    ".csv": "csv",
    ".npz": "npz",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def _format_of(filename: str) -> DatasetFormat:
    suffix = Path(filename).suffix.lower()
    if suffix not in _FORMATS:
        raise DatasetError(f"cannot read {filename}: give a .csv, .parquet or .npz file")
    return _FORMATS[suffix]


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
        import pyarrow.parquet as pq  # only Parquet needs it

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


def check_finite(frame: pd.DataFrame, shown: str) -> None:
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


def _class_values(column: pd.Series, shown: str) -> np.ndarray:
    """A class column's labels: text, or numbers (integers when every one is whole)."""
    if _kind(column, shown) == "categorical":
        return column.astype(str).to_numpy()
    values = column.to_numpy(np.float64)
    if np.array_equal(values, np.round(values)):
        return values.astype(np.int64)  # class "3", not "3.0"
    return values


def _class_indices(column: pd.Series, shown: str) -> tuple[np.ndarray, list[str], LabelType]:
    """Labels as indices 0..K-1 into the sorted distinct values, which become the class
    names; and the labels' type before they became names."""
    values = _class_values(column, shown)
    classes, y = np.unique(values, return_inverse=True)
    if len(classes) < 2:
        raise DatasetError(
            f"target column '{column.name}' in {shown} has the single value '{classes[0]}'; "
            "classification needs at least two classes"
        )
    return y.astype(np.int64), [str(c) for c in classes], label_type_of(values)


def label_type_of(labels: np.ndarray) -> LabelType:
    """What class labels are, so that a prediction gives them back as they were."""
    kind = labels.dtype.kind
    return "int" if kind in "iu" else "float" if kind == "f" else "str"


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


def check_stratifiable(labels: np.ndarray, classes: list[str]) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    present = np.flatnonzero(counts)
    rarest = present[np.argmin(counts[present])]
    if counts[rarest] < 2:
        raise DatasetError(
            f"class '{classes[rarest]}' has only {counts[rarest]} row; splitting by class "
            "needs at least 2 rows of every class"
        )
