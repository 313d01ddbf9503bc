"""Start-up: how long the commands a user types take, end to end, in fresh processes.

Measured in one run, each the median of several (`--repeats`), every command in a fresh
interpreter on a SQLite file, as a user runs them:

- `hpsearch --help`; `status` and `leaderboard` of a study with trained trials;
- `hpsearch run` of 1 trial, 1 epoch of iris, `--jobs 1`: on a new database (its tables
  created first) and on an existing one (a new study); then the same command again, with
  nothing left to run;
- the floor of a run that trains: a bare interpreter importing what training needs
  (torch, what torch loads at a first optimiser step, scikit-learn, Optuna, SQLAlchemy);
- where the seconds of that run go (a fresh process that imports first, then runs the
  command with its phases timed);
- a user's plain Optuna + DataLoader script against `hpsearch run` on the same 8 trials of
  4 epochs on 20,000 x 784 synthetic rows (learning rate, batch size and dropout searched by
  TPE, seed 0), end to end, one trial at a time and as one fused pack (`--pack 8`).

Run: .venv/bin/python bench/startup.py [--repeats 5]
It rewrites the section "## Start-up" of BENCHMARKS.md and prints a JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from report import environment, markdown_table, write_section

SECTION = "## Start-up"
IRIS = {
    "dataset": {"source": "builtin", "name": "iris"},
    "search_space": {"learning_rate": {"low": 0.001, "high": 0.1, "log": True}},
    "training": {"max_epochs": 1},
    "budget": {"n_trials": 1},
}
N_ROWS, N_FEATURES, N_CLASSES, N_TRIALS, EPOCHS = 20_000, 784, 10, 8, 4
COMPARED = {
    "name": "compared",
    "dataset": {
        "source": "synthetic",
        "n_samples": N_ROWS,
        "n_features": N_FEATURES,
        "n_classes": N_CLASSES,
        "seed": 0,
    },
    "model": {"hidden": [128]},
    "search_space": {
        "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
        "batch_size": {"low": 32, "high": 256, "log": True},
        "dropout": {"low": 0.0, "high": 0.5},
    },
    "training": {"max_epochs": EPOCHS, "early_stopping_patience": None, "scheduler": "none"},
    "objective": {"metric": "val_accuracy"},
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "none"},
    "budget": {"n_trials": N_TRIALS},
}
# The script a user writes beside Optuna: same data, network, space and sampler.
PLAIN_SCRIPT = f"""
import optuna, torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

x, y = make_classification(n_samples={N_ROWS}, n_features={N_FEATURES}, n_informative=392,
    n_redundant=0, n_classes={N_CLASSES}, n_clusters_per_class=1, random_state=0)
x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=0,
    stratify=y)
scaler = StandardScaler().fit(x_train)
x_train = torch.tensor(scaler.transform(x_train), dtype=torch.float32)
x_val = torch.tensor(scaler.transform(x_val), dtype=torch.float32)
y_train, y_val = torch.tensor(y_train), torch.tensor(y_val)

def objective(trial):
    lr = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
    batch_size = trial.suggest_int("batch_size", 32, 256, log=True)
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    model = nn.Sequential(nn.Linear({N_FEATURES}, 128), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(128, {N_CLASSES}))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
    for epoch in range({EPOCHS}):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
        trial.report(accuracy, epoch)
    return accuracy

optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
study.optimize(objective, n_trials={N_TRIALS})
print(study.best_value)
"""
# What any run that trains imports, in a bare interpreter: the floor of `hpsearch run`.
FLOOR = (
    "import torch, torch._dynamo, sklearn.datasets, sklearn.model_selection, "
    "optuna.storages._rdb.models, typer, pydantic"
)
# A fresh process that imports first, then runs `hpsearch run` with its phases timed.
PHASES = """
import json, os, sys, time
from collections import defaultdict
started = time.perf_counter()
import torch._dynamo
from hpsearch.cli import commands as cli
from hpsearch.runtime import embedded
from hpsearch.service import results
from hpsearch.service import studies as service
from hpsearch.runtime import trials as study
from hpsearch.runtime import worker
imported = time.perf_counter() - started
spent = defaultdict(float)

def timed(module, name, phase):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - began
    setattr(module, name, wrapper)

timed(service, "submit_study", "submit: schema, admission, study")
timed(worker, "load_dataset", "data")
timed(study, "train", "training")
timed(embedded, "run_workers", "worker")
timed(results, "leaderboard", "results")
timed(results, "study_summary", "results")
try:
    cli.app(sys.argv[1:])
except SystemExit:
    pass
spent["worker"] -= spent["data"] + spent["training"]
print(json.dumps({"imports": imported, **spent}), flush=True)
os._exit(0)  # as the command ends (hpsearch.__main__.leave)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="hpsearch-startup-"))
    figures = measure(home, args.repeats)
    command = f"python bench/startup.py --repeats {args.repeats}"
    write_section(SECTION, report(figures, command))
    print(json.dumps(figures, indent=2))


def measure(home: Path, repeats: int) -> dict[str, object]:
    db = f"sqlite:///{home / 'existing.db'}"
    spec = write(home / "iris.yaml", {"name": "iris", **IRIS})
    run(hpsearch_command("run", str(spec), "--db", db), home)
    figures: dict[str, object] = {
        "help": median(repeats, lambda i: hpsearch("--help", cwd=home)),
        "status": median(repeats, lambda i: hpsearch("status", "iris", "--db", db, cwd=home)),
        "leaderboard": median(
            repeats, lambda i: hpsearch("leaderboard", "iris", "--db", db, cwd=home)
        ),
        "run_new_database": median(
            repeats,
            lambda i: hpsearch("run", str(spec), "--db", f"sqlite:///{home}/new{i}.db", cwd=home),
        ),
        "run_existing_database": median(
            repeats,
            lambda i: hpsearch(
                "run",
                str(write(home / f"s{i}.yaml", {"name": f"s{i}", **IRIS})),
                "--db",
                db,
                cwd=home,
            ),
        ),
        "run_nothing_left": median(
            repeats, lambda i: hpsearch("run", str(spec), "--db", db, cwd=home)
        ),
        "floor_imports": median(repeats, lambda i: timed([sys.executable, "-c", FLOOR], home)),
        "phases": phases(home, db),
    }
    figures["compared"] = compare(home)
    return figures


def phases(home: Path, db: str) -> dict[str, float]:
    """Where a 1-trial run's seconds go, from a fresh process's own clock and the wall."""
    spec = write(home / "phases.yaml", {"name": "phases", **IRIS})
    began = time.perf_counter()
    done = run([sys.executable, "-c", PHASES, "run", str(spec), "--db", db], home)
    wall = time.perf_counter() - began
    spent = json.loads(done.stdout.strip().splitlines()[-1])
    spent["interpreter, Typer, Rich, progress bar, exit"] = wall - sum(spent.values())
    return {"wall": wall, **spent}


def compare(home: Path) -> dict[str, float]:
    """The plain script against `hpsearch run`, one at a time and as one fused pack."""
    script = home / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    figures = {"plain_optuna_dataloader": timed([sys.executable, str(script)], home)}
    for label, extra in (("hpsearch_run", []), ("hpsearch_run_pack_8", ["--pack", "8"])):
        spec = write(home / f"{label}.yaml", COMPARED)
        db = f"sqlite:///{home / label}.db"
        figures[label] = timed(hpsearch_command("run", str(spec), "--db", db, *extra), home)
    return figures


def report(figures: dict, command: str) -> str:
    compared = figures["compared"]
    plain = compared["plain_optuna_dataloader"]
    commands = [
        ("`hpsearch --help`", figures["help"], "< 0.5"),
        ("`hpsearch status` (SQLite)", figures["status"], "< 1"),
        ("`hpsearch leaderboard` (SQLite)", figures["leaderboard"], "< 1"),
        (
            "`hpsearch run`, 1 trial x 1 epoch of iris, new database",
            figures["run_new_database"],
            "< 5",
        ),
        ("the same, existing database, new study", figures["run_existing_database"], "< 5"),
        ("the same command again, nothing left to run", figures["run_nothing_left"], "< 1.5"),
        ("floor: importing what training needs, bare interpreter", figures["floor_imports"], ""),
    ]
    phase_rows = [[name, f"{seconds:.2f}"] for name, seconds in figures["phases"].items()]
    comparison = [
        ["plain Optuna + DataLoader script", f"{plain:.1f}", "1.00"],
        [
            "`hpsearch run` (one trial at a time)",
            f"{compared['hpsearch_run']:.1f}",
            f"{plain / compared['hpsearch_run']:.2f}",
        ],
        [
            "`hpsearch run --pack 8`",
            f"{compared['hpsearch_run_pack_8']:.1f}",
            f"{plain / compared['hpsearch_run_pack_8']:.2f}",
        ],
    ]
    return (
        f"{SECTION}\n\n"
        "`bench/startup.py`: wall time of the commands a user types, each in a fresh process, "
        "median of the repeats (see its docstring).\n\n"
        f"{environment(command, ('optuna', 'torch', 'scikit-learn', 'typer'))}\n\n"
        + markdown_table(
            ["command", "seconds", "goal"],
            [[name, f"{seconds:.2f}", goal] for name, seconds, goal in commands],
        )
        + "\n\nWhere the seconds of the 1-trial run go (existing database; one process that "
        "imports first, then runs the command with these phases timed):\n\n"
        + markdown_table(["phase", "seconds"], phase_rows)
        + f"\n\n{N_TRIALS} trials x {EPOCHS} epochs on {N_ROWS:,} x {N_FEATURES} synthetic "
        "rows, end to end (goal: hpsearch at least 1.5x faster than the plain script):\n\n"
        + markdown_table(["method", "seconds", "speed-up"], comparison)
        + "\n"
    )


def hpsearch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpsearch", *args]


def hpsearch(*args: str, cwd: Path) -> float:
    return timed(hpsearch_command(*args), cwd)


def timed(command: list[str], cwd: Path) -> float:
    began = time.perf_counter()
    run(command, cwd)
    return time.perf_counter() - began


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HPSEARCH_DATA_DIR": str(cwd)}
    return check(subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True))


def check(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(done.args)} failed:\n{done.stderr}")
    return done


def median(repeats: int, measure_once) -> float:
    return statistics.median(measure_once(i) for i in range(repeats))


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


if __name__ == "__main__":
    main()
