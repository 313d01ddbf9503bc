"""Trials per hour: the loop users write beside Optuna, hpsearch one trial at a time, and
hpsearch training the trials as one fused pack, on the same trials in one run.

The same 32 trials (learning rate, dropout, weight decay and batch size drawn once with a
seed; batch sizes across 32..256), 10 epochs each, no pruning or early stopping, each
evaluated on the validation set after every epoch (a pruner needs that value):

- (a) baseline: a fresh `nn.Sequential` per trial, `TensorDataset` + `DataLoader(shuffle=True)`,
      every batch copied to the device, Adam, `loss.item()` per step as tutorials log it;
- (b) hpsearch, one trial at a time: `hpsearch.training.train.train` on device-resident data;
- (c) hpsearch fused: `hpsearch.training.fused.train_pack` on all 32 at once;
- (d) hpsearch fused, bf16: (c) with the forward pass under bf16 autocast (`--no-bf16` skips it);
- (e) hpsearch fused, compiled: (c) with the fused step under torch.compile (`--compiled`;
      skipped where `train_pack` has no `compiled` parameter). Its seconds leave out a
      1-epoch warm-up of the same pack, which pays the compilation and is reported apart.

`--slow-trials N` runs (a) and (b) on N of the trials only, chosen across the batch sizes
(a trial's time depends mostly on its batch size): trials per hour are per trial run, so
the methods still compare, and the table's "trials run" column says how many each ran.

Workloads: digits (1,797 x 64, a 64-128-10 network) and a synthetic MNIST-sized set (60,000 x
784, 10 classes, 784-128-10). Accuracy agreement is the best validation accuracy per trial,
over the trials both methods ran. On a GPU the floor is a method's floating-point work over
the device's measured fp32 matmul rate: no implementation of these trials can be faster.

Run: .venv/bin/python bench/throughput.py [--device cuda] [--trials 32] [--epochs 10]
It rewrites the section "## Throughput" of BENCHMARKS.md (one subsection per device kind)
unless `--no-write`; `--json PATH` keeps the figures, rewritten after every method so that a
run stopped early keeps the methods it finished.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import RESULTS, environment, markdown_table, write_section
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hpsearch.data.tensors import TensorData, load_dataset
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.training.fused import train_pack
from hpsearch.training.model import build_mlp
from hpsearch.training.train import TrialConfig, train

SECTION = "## Throughput"
WORKLOADS = {
    "digits": ({"source": "builtin", "name": "digits"}, [128]),
    "mnist-sized": (
        {"source": "synthetic", "n_samples": 60_000, "n_features": 784, "n_classes": 10},
        [128],
    ),
}
BASELINE, FUSED, COMPILED = "(a) baseline", "(c) fused", "(e) fused, compiled"
# Methods run in this order (by their letter): the ones the goal compares first and (e),
# whose compilation takes longest, last, so that a run stopped early has the most.
RUN_ORDER = "cadbe"

Record = dict[str, Any]  # one workload's figures, as --json writes them


@dataclass
class Method:
    """One way of training the trials: which of them it runs, and how (the best validation
    accuracy of each); `warm_up`, if any, runs first on the same trials, untimed in
    `seconds` (torch.compile's compilation)."""

    name: str
    trials: list[int]
    train: Callable[[list[TrialConfig]], list[float]]
    warm_up: Callable[[list[TrialConfig]], object] | None = None


@dataclass
class Outcome:
    seconds: float
    best_val_accuracy: dict[int, float]  # by the trial's index among the drawn ones
    warm_up_s: float | None = None

    def trials_per_hour(self) -> float:
        return len(self.best_val_accuracy) * 3600 / self.seconds


def draw_params(n: int, seed: int) -> list[dict[str, float | int]]:
    """The trials, drawn once: log-uniform learning rate and batch size, uniform dropout."""
    rng = np.random.default_rng(seed)
    return [
        {
            "learning_rate": float(10 ** rng.uniform(-4, -2)),
            "batch_size": round(2 ** rng.uniform(5, 8)),
            "dropout": float(rng.uniform(0, 0.5)),
            "weight_decay": float(10 ** rng.uniform(-6, -3)),
        }
        for _ in range(n)
    ]


def configs_for(
    workload: str, params: list[dict[str, float | int]], epochs: int
) -> tuple[list[TrialConfig], StudySpec]:
    dataset, hidden = WORKLOADS[workload]
    spec = parse_spec(
        {
            "name": "throughput",
            "dataset": dataset,
            "model": {"hidden": hidden},
            "training": {
                "max_epochs": epochs,
                "early_stopping_patience": None,
                "scheduler": "none",
                "grad_clip_norm": None,
            },
            "budget": {"n_trials": len(params)},
        }
    )
    return [TrialConfig.from_spec(spec, p) for p in params], spec


def spread(configs: list[TrialConfig], n: int | None) -> list[int]:
    """`n` of the trials, evenly across their batch sizes (all of them if `n` is None): a
    trial's time depends mostly on its batch size, so these stand for the whole set."""
    if n is None or n >= len(configs):
        return list(range(len(configs)))
    by_batch = sorted(range(len(configs)), key=lambda i: configs[i].batch_size)
    step = len(configs) / n
    return sorted(by_batch[int(step * k + step / 2)] for k in range(n))


def baseline(configs: list[TrialConfig], data: TensorData, device: torch.device) -> list[float]:
    """(a): what an Optuna objective usually looks like, data on the host."""
    x_train, y_train = data.x_train.cpu(), data.y_train.cpu()
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    best = []
    for config in configs:
        torch.manual_seed(config.seed)
        model = build_mlp(
            data.n_features, data.n_outputs, list(config.hidden), dropout=config.dropout
        ).to(device)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        loader = DataLoader(
            TensorDataset(x_train, y_train), batch_size=config.batch_size, shuffle=True
        )
        loss_fn, accuracy = nn.CrossEntropyLoss(), []
        for _ in range(config.max_epochs):
            model.train()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                loss.item()
            model.eval()
            with torch.no_grad():
                accuracy.append((model(x_val).argmax(1) == y_val).float().mean().item())
        best.append(max(accuracy))
    return best


def one_at_a_time(configs: list[TrialConfig], data: TensorData) -> list[float]:
    """(b): hpsearch's trainer, one trial after the other."""
    return [train(config, data).value for config in configs]


def fused(configs: list[TrialConfig], data: TensorData, **options: Any) -> list[float]:
    """(c), (d), (e): all trials as one fused pack."""
    return [r.value for r in train_pack(configs, data, **options)]


def compiled_unsupported() -> str | None:
    """Why (e) cannot run here, or None: the compiled fused step may be newer than this
    benchmark, which then says so instead of failing."""
    if "compiled" not in inspect.signature(train_pack).parameters:
        return "hpsearch.training.fused.train_pack has no `compiled` parameter yet"
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: Method, configs: list[TrialConfig], device: torch.device) -> Outcome:
    """Time `method` on its trials, after its warm-up if it has one."""
    chosen = [configs[i] for i in method.trials]
    warm_up_s = None
    if method.warm_up is not None:
        synchronize(device)
        started = time.perf_counter()
        method.warm_up(chosen)
        synchronize(device)
        warm_up_s = time.perf_counter() - started
    synchronize(device)
    started = time.perf_counter()
    values = method.train(chosen)
    synchronize(device)
    seconds = time.perf_counter() - started
    return Outcome(seconds, dict(zip(method.trials, values, strict=True)), warm_up_s)


def flops(configs: list[TrialConfig], data: TensorData) -> float:
    """Multiply-adds x 2 of the run: forward + backward (3 matmuls per layer) on the
    training rows and a forward pass on the validation rows, every epoch."""
    widths = [data.n_features, *configs[0].hidden, data.n_outputs]
    per_row = sum(a * b for a, b in itertools.pairwise(widths)) * 2
    rows = 3 * data.x_train.shape[0] + data.x_val.shape[0]
    return sum(per_row * rows * c.max_epochs for c in configs)


def matmul_rate(device: torch.device) -> float:
    """FLOP/s of a large fp32 matmul with the precision settings training uses."""
    n = 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 10 * 2 * n**3 / (time.perf_counter() - started)


def floor_rate(device: torch.device) -> float | None:
    """The rate the floor is computed at: a GPU's measured one; none on a CPU, where the
    large matmul would take minutes and the floor says little."""
    return matmul_rate(device) if device.type == "cuda" else None


def methods_for(
    configs: list[TrialConfig], data: TensorData, device: torch.device, args: argparse.Namespace
) -> tuple[list[Method], dict[str, str]]:
    """The methods to run, and those skipped with the reason."""
    every, slow = list(range(len(configs))), spread(configs, args.slow_trials)
    methods = [
        Method(BASELINE, slow, lambda c: baseline(c, data, device)),
        Method("(b) one at a time", slow, lambda c: one_at_a_time(c, data)),
        Method(FUSED, every, lambda c: fused(c, data)),
    ]
    if args.bf16:
        methods.append(
            Method(
                "(d) fused, bf16",
                every,
                lambda c: fused([replace(x, precision="bf16") for x in c], data),
            )
        )
    skipped = {}
    if not args.compiled:
        skipped[COMPILED] = "not asked for (--compiled runs it)"
    elif (why := compiled_unsupported()) is not None:
        skipped[COMPILED] = why
    else:
        methods.append(
            Method(
                COMPILED,
                every,
                lambda c: fused(c, data, compiled=True),
                warm_up=lambda c: fused([replace(x, max_epochs=1) for x in c], data, compiled=True),
            )
        )
    return sorted(methods, key=lambda m: RUN_ORDER.index(m.name[1])), skipped


def run(
    workload: str, args: argparse.Namespace, device: torch.device, keep: Callable[[Record], None]
) -> Record:
    """Every method on one workload; `keep` gets the record after each method."""
    configs, spec = configs_for(workload, draw_params(args.trials, args.seed), args.epochs)
    data = load_dataset(spec, device)
    # Warm-up: allocator, kernels, threads; not timed.
    fused(configs[:2], data), one_at_a_time(configs[:1], data)
    rate = floor_rate(device)
    batch = [c.batch_size for c in configs]
    record: Record = {
        "workload": workload,
        "training_rows": data.x_train.shape[0],
        "features": data.n_features,
        "network": "-".join(map(str, [data.n_features, *configs[0].hidden, data.n_outputs])),
        "trials": len(configs),
        "epochs": args.epochs,
        "batch_sizes": [min(batch), max(batch)],
        "matmul_tflops": None if rate is None else rate / 1e12,
        "floor_s": None if rate is None else flops(configs, data) / rate,
        "methods": {},
        "skipped": {},
        "agreement": [],
    }
    methods, record["skipped"] = methods_for(configs, data, device, args)
    for name, why in record["skipped"].items():
        print(f"{workload} {name}: skipped, {why}", flush=True)
    outcomes: dict[str, Outcome] = {}
    for method in methods:
        outcome = outcomes[method.name] = measure(method, configs, device)
        chosen = [configs[i] for i in method.trials]
        record["methods"][method.name] = {
            "trials_run": len(method.trials),
            "seconds": outcome.seconds,
            "trials_per_hour": outcome.trials_per_hour(),
            "warm_up_s": outcome.warm_up_s,
            "floor_ratio": None if rate is None else outcome.seconds * rate / flops(chosen, data),
        }
        record["agreement"] = agreement(outcomes)
        keep(record)
        print(f"{workload} {method.name}: {outcome.seconds:.1f} s", flush=True)
    return record


def agreement(outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    """Best validation accuracy, method against method, over the trials both ran (points)."""
    pairs = []
    for first, second in itertools.combinations(sorted(outcomes), 2):
        one, other = outcomes[first].best_val_accuracy, outcomes[second].best_val_accuracy
        gaps = [abs(one[i] - other[i]) * 100 for i in sorted(one.keys() & other.keys())]
        if gaps:
            pairs.append(
                {
                    "pair": f"{first[:3]} vs {second[:3]}",
                    "trials": len(gaps),
                    "mean": statistics.mean(gaps),
                    "max": max(gaps),
                }
            )
    return pairs


def render(record: Record) -> str:
    """One workload's subsection of the Markdown section."""
    methods = dict(sorted(record["methods"].items()))
    base = methods.get(BASELINE)
    has_floor = record["floor_s"] is not None
    header = ["method", "trials run", "seconds", "trials per hour", "ratio to (a)"]
    header += ["x the floor"] if has_floor else []
    rows = []
    for name, m in methods.items():
        ratio = f"{m['trials_per_hour'] / base['trials_per_hour']:.2f}" if base else "-"
        row = [name, str(m["trials_run"]), f"{m['seconds']:.1f}", f"{m['trials_per_hour']:,.0f}"]
        rows.append(row + [ratio] + ([f"{m['floor_ratio']:,.1f}"] if has_floor else []))
    text = (
        f"#### {record['workload']}: {record['training_rows']:,} training rows x "
        f"{record['features']}, network {record['network']}, {record['trials']} trials x "
        f"{record['epochs']} epochs, batch sizes {record['batch_sizes'][0]}.."
        f"{record['batch_sizes'][1]}\n\n" + markdown_table(header, rows)
    )
    partial = {m["trials_run"] for m in methods.values()} - {record["trials"]}
    if partial:
        text += (
            "\n\nMethods that ran fewer trials (`--slow-trials`, chosen across the batch "
            "sizes) are scaled to trials per hour like the others; their seconds are for the "
            "trials they ran."
        )
    warm = {n: m["warm_up_s"] for n, m in methods.items() if m["warm_up_s"] is not None}
    text += "".join(
        f"\n\n{n}: a 1-epoch warm-up of the same pack, not counted above, took {s:.1f} s."
        for n, s in warm.items()
    )
    text += "".join(f"\n\n{n}: skipped, {why}." for n, why in record["skipped"].items())
    if record["agreement"]:
        text += "\n\n" + markdown_table(
            ["best val accuracy, points", "trials", "mean abs difference", "max abs difference"],
            [
                [p["pair"], str(p["trials"]), f"{p['mean']:.2f}", f"{p['max']:.2f}"]
                for p in record["agreement"]
            ],
        )
    if has_floor:
        text += (
            f"\n\nFloor: {record['floor_s'] * record['matmul_tflops']:.2f} TFLOP of work for "
            f"the {record['trials']} trials at the measured {record['matmul_tflops']:.1f} "
            f'TFLOP/s fp32 matmul rate = {record["floor_s"] * 1000:.1f} ms; "x the floor" '
            "is each method's seconds over the floor of the trials it ran."
        )
    return text + "\n"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {torch.get_num_threads()} threads"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument(
        "--slow-trials",
        type=int,
        default=None,
        help="run (a) and (b) on this many of the trials only (default: all)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also (d): fused with the forward pass under bf16 autocast",
    )
    parser.add_argument(
        "--compiled",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also (e): fused with the step under torch.compile",
    )
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rewrite the section of BENCHMARKS.md",
    )
    parser.add_argument("--json", type=Path, help="keep the figures in this JSON file")
    return parser.parse_args(argv)


def option(name: str, value: object) -> str:
    """An argument as it is typed on the command line."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    label = device_label(device)
    started, load = time.perf_counter(), os.getloadavg()[0]
    records: dict[str, Record] = {}

    def keep(record: Record) -> None:
        records[record["workload"]] = record
        if args.json is not None:
            figures = {"device": label, "torch": torch.__version__, "workloads": records}
            args.json.write_text(json.dumps(figures, indent=2))

    parts = [render(run(workload, args, device, keep)) for workload in args.workloads]
    command = "python bench/throughput.py " + " ".join(
        option(name, value)
        for name, value in vars(args).items()
        if name not in ("workloads", "json") and value is not None
    )
    gpu = label.removeprefix("GPU: ") if device.type == "cuda" else None
    body = (
        f"### {label}\n\n"
        f"{environment(command, ('torch', 'numpy'), gpu)}\n"
        f"- Run time: {time.perf_counter() - started:.0f} s; load average {load:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end (other processes slow every method)\n\n"
        + "\n".join(parts)
    )
    print(body)
    if args.write:
        write_section(SECTION, merged_section(body, device.type))


def merged_section(body: str, kind: str) -> str:
    """Our section with this device kind's subsection replaced and the other kept."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    match = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", old, re.MULTILINE | re.DOTALL)
    keep = ""
    other = "### CPU" if kind == "cuda" else "### GPU"
    if match:
        found = re.search(rf"^{other}.*?(?=^### |\Z)", match.group(1), re.MULTILINE | re.DOTALL)
        keep = found.group(0).rstrip() + "\n\n" if found else ""
    intro = (
        f"{SECTION}\n\n"
        "`bench/throughput.py`: the same trials several ways (see its docstring). (c) trains "
        "every member on exactly the batches it would see alone (each its own batch size and "
        "permutation); a fused step pads the members' batches to a common width (on a GPU the "
        "largest among the members still stepping, on a CPU the largest of each run of batch "
        "sizes within 1.5x of each other), so differing batch sizes cost padding, not "
        "correctness.\n\n"
    )
    parts = [body, keep] if kind == "cpu" else [keep, body]
    return intro + "\n".join(p.rstrip() + "\n" for p in parts if p)


if __name__ == "__main__":
    main()
