"""A kept model stands on its own: studies run to the end by an in-process worker, then
their model files are downloaded (service, REST, CLI), loaded with `hpsearch.load_model`
and used on raw rows of the original data, which must score exactly what training stored;
exported, the model gives the same answers in a Python that has only torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split
from typer.testing import CliRunner

import hpsearch
from hpsearch.api import Settings
from hpsearch.cli.commands import app
from hpsearch.errors import DatasetError, HpsearchError, ModelFileError
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.service import results
from hpsearch.service.studies import submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store
from hpsearch.training.modelfile import TrainedModel
from tests.conftest import REPO
from tests.served import served

FLOWERS = REPO / "examples" / "data" / "flowers.csv"
SPLIT = {"val": 0.25, "test": 0.15, "seed": 0}
SPECS: dict[str, dict[str, Any]] = {
    # examples/flowers-csv.yaml, smaller: string labels and a categorical column; 6 trials,
    # so that one at least keeps no model (the best 5 do).
    "flowers": {
        "name": "flowers",
        "dataset": {"source": "file", "path": "examples/data/flowers.csv", "target": "species"},
        "split": SPLIT,
        "model": {"hidden": [32]},
        "search_space": {
            "learning_rate": {"low": 1.0e-3, "high": 1.0e-1, "log": True},
            "batch_size": {"choices": [16, 32]},
            "activation": {"choices": ["relu", "tanh", "elu"]},
        },
        "training": {"max_epochs": 10, "early_stopping_patience": 5},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 6},
    },
    "wine": {  # numeric features only, class names from scikit-learn; batch norm, dropout
        "name": "wine",
        "dataset": {"source": "builtin", "name": "wine"},
        "split": SPLIT,
        "model": {"hidden": [16, 8], "batch_norm": True},
        "search_space": {"learning_rate": {"low": 1.0e-3, "high": 1.0e-1, "log": True}},
        "training": {"max_epochs": 10, "dropout": 0.2},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 2},
    },
    "diabetes": {  # regression: standardised targets
        "name": "diabetes",
        "dataset": {"source": "builtin", "name": "diabetes"},
        "split": SPLIT,
        "model": {"hidden": [16]},
        "training": {"max_epochs": 10, "learning_rate": 0.01},
        "objective": {"metric": "val_rmse"},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 1},
    },
    "labels": {  # multilabel
        "name": "labels",
        "dataset": {
            "source": "synthetic",
            "task": "multilabel",
            "n_samples": 300,
            "n_features": 6,
            "n_classes": 3,
            "seed": 0,
        },
        "split": SPLIT,
        "model": {"hidden": [16]},
        "training": {"max_epochs": 5, "learning_rate": 0.01},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 1},
    },
}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database of the SPECS studies, each run to the end."""
    url = f"sqlite:///{tmp_path_factory.mktemp('models') / 'models.db'}"
    store = Store.open(url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HPSEARCH_DATA_DIR", str(REPO))
        for spec in SPECS.values():
            submit_study(store, parse_spec(spec))
        assert Worker(WorkerOptions(store, idle_exit_s=0)).run() == 0
    return url


def best_model(url: str, study: str) -> tuple[TrainedModel, Any]:
    """The best trial's kept model, loaded from its bytes, and the trial."""
    store = Store.open(url)
    best = results.leaderboard(store, study, 1)[0]
    model = hpsearch.load_model(results.model_weights(store, study, best.number))
    return model, results.trial_detail(store, study, best.number)


def held_out(labels: np.ndarray) -> np.ndarray:
    """The test rows as `tensors._split_indices` draws them: stratified by class index."""
    _, y = np.unique(labels, return_inverse=True)
    rows = np.arange(len(labels))
    split = {"test_size": SPLIT["test"], "random_state": SPLIT["seed"]}
    return train_test_split(rows, stratify=y, **split)[1]


def accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """As training computes it: a float32 mean of 0/1."""
    right = np.float32((predicted == truth).sum())
    return float(right / np.float32(len(truth)))


# --- load_model on raw rows -------------------------------------------------------------


def test_a_kept_model_scores_the_stored_test_accuracy_on_raw_csv_rows(studies: str) -> None:
    model, trial = best_model(studies, "flowers")
    frame = pd.read_csv(FLOWERS)
    test = model.test_rows(frame)  # with its target column
    assert list(test.index) == list(held_out(frame["species"].to_numpy()))
    predicted = model.predict(test)
    assert accuracy(predicted, test["species"].to_numpy()) == trial.metrics["test_accuracy"]
    assert set(predicted) <= set(frame["species"])
    assert model.labels == ["setosa", "versicolor", "virginica"]
    assert (model.study, model.trial) == ("flowers", trial.number)
    assert model.params == trial.params
    assert model.metrics == {k: v for k, v in trial.metrics.items() if k[:4] in ("val_", "test")}
    assert model.columns == list(frame.columns[:-1]) and model.target == ["species"]
    assert model.versions == {"hpsearch": hpsearch.__version__, "torch": str(torch.__version__)}
    proba = model.predict_proba(test)
    assert proba.shape == (len(test), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)
    assert isinstance(model.module, torch.nn.Module)


def test_test_rows_need_the_target_and_known_labels(studies: str) -> None:
    model, _ = best_model(studies, "flowers")
    frame = pd.read_csv(FLOWERS)
    with pytest.raises(DatasetError, match="no target column 'species'"):
        model.test_rows(frame.drop(columns="species"))
    with pytest.raises(DatasetError, match="labels the model was not trained on: 'tulip'"):
        model.test_rows(frame.assign(species="tulip"))
    regression, trial = best_model(studies, "diabetes")
    data = sk_datasets.load_diabetes(as_frame=True).frame
    rows = regression.test_rows(data)
    residual = regression.predict(rows) - rows["target"].to_numpy()
    rmse = float(np.sqrt(np.mean(residual.astype(np.float64) ** 2)))
    assert rmse == pytest.approx(trial.metrics["test_rmse"], rel=1e-5)


def test_a_builtin_model_takes_numpy_rows_in_the_original_column_order(studies: str) -> None:
    model, trial = best_model(studies, "wine")
    wine = sk_datasets.load_wine()
    test = held_out(wine.target)
    truth = wine.target_names[wine.target[test]]
    predicted = model.predict(wine.data[test])
    assert accuracy(predicted, truth) == trial.metrics["test_accuracy"]
    with_target = np.column_stack([wine.data[test], wine.target[test]])  # the target ignored
    np.testing.assert_array_equal(model.predict(with_target), predicted)
    assert model.labels == list(wine.target_names)


def test_a_regression_model_predicts_in_the_targets_units(studies: str) -> None:
    model, trial = best_model(studies, "diabetes")
    diabetes = sk_datasets.load_diabetes()
    rows = np.arange(len(diabetes.target))
    test = train_test_split(rows, test_size=SPLIT["test"], random_state=SPLIT["seed"])[1]
    residual = model.predict(diabetes.data[test]) - diabetes.target[test]
    rmse = float(np.sqrt(np.mean(residual.astype(np.float64) ** 2)))
    assert rmse == pytest.approx(trial.metrics["test_rmse"], rel=1e-5)
    with pytest.raises(HpsearchError, match="not probabilities"):
        model.predict_proba(diabetes.data[:2])


def test_a_multilabel_model_predicts_one_bit_per_label(studies: str) -> None:
    model, _ = best_model(studies, "labels")
    rows = np.random.default_rng(0).normal(size=(4, 6))
    predicted = model.predict(rows)
    assert predicted.shape == (4, 3) and set(np.unique(predicted)) <= {0, 1}
    np.testing.assert_array_equal(predicted, model.predict_proba(rows) > 0.5)
    assert model.labels == ["label_0", "label_1", "label_2"]


def test_rows_without_a_column_are_refused_naming_it(studies: str) -> None:
    model, _ = best_model(studies, "flowers")
    frame = pd.read_csv(FLOWERS)
    with pytest.raises(DatasetError, match=r"no column 'garden'; the model reads"):
        model.predict(frame.drop(columns=["garden"]))
    with pytest.raises(DatasetError, match="the rows have 3 columns; the model reads 5"):
        model.predict(frame.iloc[:, :3].to_numpy())
    with pytest.raises(DatasetError, match="column 'sepal_width' has 1 missing values"):
        model.predict(frame.assign(sepal_width=[np.nan] + [1.0] * (len(frame) - 1)))


def test_an_unknown_category_gets_all_zeros_and_extra_columns_are_ignored(studies: str) -> None:
    model, _ = best_model(studies, "flowers")
    row = pd.read_csv(FLOWERS).iloc[:1].assign(garden="west", comment="ignored")
    assert model.encoding.categories == {"garden": ("east", "north", "south")}
    garden = [model.encoding.feature_names.index(f"garden_{g}") for g in ("east", "north")]
    features = model.features(row)
    assert model.mean is not None and model.std is not None
    unscaled = features * model.std + model.mean
    np.testing.assert_allclose(unscaled[0, garden], 0, atol=1e-6)
    assert model.predict(row)[0] in model.labels


def test_a_bare_state_dict_from_before_model_files_is_a_clear_error() -> None:
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(3, 2).state_dict(), buffer)
    with pytest.raises(ModelFileError, match="bare state_dict"):
        hpsearch.load_model(buffer.getvalue())
    with pytest.raises(ModelFileError, match="not a model file"):
        hpsearch.load_model(b"not a torch file")


# --- REST and CLI -----------------------------------------------------------------------


def test_the_rest_download_is_the_model_file(studies: str) -> None:
    client = served(Settings(database_url=studies))
    store = Store.open(studies)
    best = results.leaderboard(store, "flowers", 1)[0]
    response = client.get(f"/api/v1/studies/flowers/trials/{best.number}/model")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    content = torch.load(io.BytesIO(response.content), weights_only=True)
    assert content["format"] == 1 and content["labels"] == ["setosa", "versicolor", "virginica"]
    downloaded = hpsearch.load_model(response.content).predict(pd.read_csv(FLOWERS))
    kept = best_model(studies, "flowers")[0].predict(pd.read_csv(FLOWERS))
    np.testing.assert_array_equal(downloaded, kept)
    unkept = without_model(store)
    missing = client.get(f"/api/v1/studies/flowers/trials/{unkept}/model")
    assert missing.status_code == 404
    assert f"no weights kept for trial {unkept}" in missing.json()["detail"]


def without_model(store: Store) -> int:
    """A trial of the flowers study that keeps no model (it ranks below the best 5)."""
    numbers = range(SPECS["flowers"]["budget"]["n_trials"])
    unkept = [n for n in numbers if not results.trial_detail(store, "flowers", n).has_model]
    assert unkept
    return unkept[0]


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_predict_writes_labels_of_the_original_vocabulary(studies: str, tmp_path: Path) -> None:
    frame = pd.read_csv(FLOWERS)
    test_rows = tmp_path / "test.csv"
    frame.iloc[held_out(frame["species"].to_numpy())].to_csv(test_rows, index=False)
    written = tmp_path / "predictions.csv"
    ran = cli("predict", "flowers", str(test_rows), "--output", str(written), "--db", studies)
    assert ran.exit_code == 0, ran.output
    _, trial = best_model(studies, "flowers")
    assert f"predictions of trial {trial.number} of flowers written" in ran.stdout
    predictions = pd.read_csv(written)
    assert list(predictions.columns) == [
        "prediction", "proba_setosa", "proba_versicolor", "proba_virginica",
    ]  # fmt: skip
    assert set(predictions["prediction"]) <= set(frame["species"])
    truth = pd.read_csv(test_rows)["species"].to_numpy()
    assert accuracy(predictions["prediction"].to_numpy(), truth) == trial.metrics["test_accuracy"]

    store = Store.open(studies)
    second = str(results.leaderboard(store, "flowers", 2)[1].number)  # kept, not the best
    to_stdout = cli("predict", "flowers", str(FLOWERS), "--trial", second, "--db", studies)
    assert to_stdout.exit_code == 0, to_stdout.output
    printed = pd.read_csv(io.StringIO(to_stdout.stdout))
    model = hpsearch.load_model(results.model_weights(store, "flowers", int(second)))
    assert list(printed["prediction"]) == list(model.predict(frame))


def test_predict_errors_are_one_line(studies: str, tmp_path: Path) -> None:
    unkept = without_model(Store.open(studies))
    no_model = cli("predict", "flowers", str(FLOWERS), "--trial", str(unkept), "--db", studies)
    assert no_model.exit_code == 2
    assert f"error: no weights kept for trial {unkept} of 'flowers'" in no_model.stderr
    partial = tmp_path / "partial.csv"
    pd.read_csv(FLOWERS).drop(columns=["petal_width"]).to_csv(partial, index=False)
    missing = cli("predict", "flowers", str(partial), "--db", studies)
    assert missing.exit_code == 2 and "no column 'petal_width'" in missing.stderr
    absent = cli("predict", "flowers", str(tmp_path / "absent.csv"), "--db", studies)
    assert absent.exit_code == 2 and "absent.csv not found" in absent.stderr
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    submit_study(Store.open(empty), parse_spec(SPECS["wine"]))  # queued: nothing kept yet
    untrained = cli("predict", "wine", str(FLOWERS), "--db", empty)
    assert untrained.exit_code == 2
    assert "no trial of study 'wine' has a kept model yet" in untrained.stderr
    for ran in (no_model, missing, absent, untrained):
        assert "Traceback" not in ran.output and len(ran.stderr.strip().splitlines()) == 1


# --- export -----------------------------------------------------------------------------

# Serves an exported model with torch, json and numpy alone, as docs/architecture.md says.
SERVE = """
import json, sys
import numpy as np
import torch

module = torch.jit.load(sys.argv[1])
meta = json.load(open(sys.argv[2]))
rows = json.load(open(sys.argv[3]))


def value(column, raw):
    values = meta["categories"].get(column)
    if values is None:
        return float(raw)
    return float(values.index(str(raw))) if str(raw) in values else -1.0


x = [[value(c, row[c]) for c in meta["columns"]] for row in rows]
x = torch.tensor(x, dtype=torch.float64)
with torch.no_grad():
    out = module(x).numpy()
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"out": np.asarray(out).tolist(), "loaded": loaded}))
"""


def raw_rows(study: str) -> pd.DataFrame:
    if study == "flowers":
        flowers = pd.read_csv(FLOWERS)
        flowers.loc[0, "garden"] = "west"  # not a garden of training: all zeros
        return flowers
    if study == "diabetes":
        return sk_datasets.load_diabetes(as_frame=True).frame
    rng = np.random.default_rng(1)
    return pd.DataFrame(rng.normal(size=(40, 6)), columns=[f"x{i}" for i in range(6)])


@pytest.mark.integration  # the exported model runs in a fresh Python process
@pytest.mark.parametrize("study", ["flowers", "diabetes", "labels"])
def test_an_exported_model_answers_as_load_model_in_a_python_without_hpsearch(
    studies: str, tmp_path: Path, study: str
) -> None:
    exported = tmp_path / "model.pt"
    ran = cli("export", study, "--output", str(exported), "--db", studies)
    assert ran.exit_code == 0, ran.output
    model, _ = best_model(studies, study)
    rows = raw_rows(study)
    # json.dumps writes floats exactly (DataFrame.to_json rounds them to 10 digits).
    (tmp_path / "rows.json").write_text(json.dumps(rows.to_dict(orient="records")))
    files = [str(exported), str(tmp_path / "model.json"), str(tmp_path / "rows.json")]
    served = subprocess.run(
        [sys.executable, "-c", SERVE, *files],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert served.returncode == 0, served.stderr
    answer = json.loads(served.stdout)
    assert "hpsearch" not in answer["loaded"] and "pandas" not in answer["loaded"]
    out = np.asarray(answer["out"], dtype=np.float32)
    if model.task == "regression":
        np.testing.assert_allclose(out, model.predict(rows), rtol=1e-6)
        return
    np.testing.assert_allclose(out, model.predict_proba(rows), atol=1e-6)
    if model.task == "classification":
        labels = np.asarray(json.loads((tmp_path / "model.json").read_text())["labels"])
        np.testing.assert_array_equal(labels[out.argmax(axis=1)], model.predict(rows))
