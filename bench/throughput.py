"""Trials per hour: the loop users write beside Optuna, hpsearch one trial at a time, and
hpsearch training the trials as one fused pack, on the same trials in one run.

The same 32 trials (learning rate, dropout, weight decay and batch size drawn once with a
seed; batch sizes across 32..256), 10 epochs each, no pruning or early stopping, each
evaluated on the validation set after every epoch (a pruner needs that value):

- (a) baseline: a fresh `nn.Sequential` per trial, `TensorDataset` + `DataLoader(shuffle=True)`,
      every batch copied to the device, Adam, `loss.item()` per step as tutorials log it;
- (b) hpsearch, one trial at a time: `hpsearch.training.train.train` on device-resident data;
- (c) hpsearch fused: `hpsearch.training.fused.train_pack` on all 32 at once;
- (d) hpsearch fused, bf16: (c) with the forward pass under bf16 autocast (`--no-bf16` skips it).

Workloads: digits (1,797 x 64, a 64-128-10 network) and a synthetic MNIST-sized set (60,000 x
784, 10 classes, 784-128-10). Accuracy agreement is the best validation accuracy per trial.
On a GPU the floor is the run's floating-point work over the device's measured fp32 matmul
rate: no implementation of these trials can be faster.

Run: .venv/bin/python bench/throughput.py [--device cuda] [--trials 32] [--epochs 10]
It rewrites the section "## Throughput" of BENCHMARKS.md (one subsection per device kind).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from report import RESULTS, environment, write_section
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


@dataclass
class Outcome:
    seconds: float
    best_val_accuracy: list[float]

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


def baseline(configs: list[TrialConfig], data: TensorData, device: torch.device) -> Outcome:
    """(a): what an Optuna objective usually looks like, data on the host."""
    x_train, y_train = data.x_train.cpu(), data.y_train.cpu()
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    started, best = time.perf_counter(), []
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
    return Outcome(time.perf_counter() - started, best)


def one_at_a_time(configs: list[TrialConfig], data: TensorData) -> Outcome:
    """(b): hpsearch's trainer, one trial after the other."""
    started = time.perf_counter()
    results = [train(config, data) for config in configs]
    return Outcome(time.perf_counter() - started, [r.value for r in results])


def fused(configs: list[TrialConfig], data: TensorData) -> Outcome:
    """(c): all trials as one fused pack."""
    started = time.perf_counter()
    results = train_pack(configs, data)
    return Outcome(time.perf_counter() - started, [r.value for r in results])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def run(workload: str, args: argparse.Namespace, device: torch.device) -> str:
    configs, spec = configs_for(workload, draw_params(args.trials, args.seed), args.epochs)
    data = load_dataset(spec, device)
    # Warm-up: allocator, kernels, threads; not timed.
    fused(configs[:2], data), one_at_a_time(configs[:1], data)
    methods = {
        "(a) baseline": lambda: baseline(configs, data, device),
        "(b) one at a time": lambda: one_at_a_time(configs, data),
        "(c) fused": lambda: fused(configs, data),
    }
    if args.bf16:
        bf16 = [replace(config, precision="bf16") for config in configs]
        methods["(d) fused, bf16"] = lambda: fused(bf16, data)
    outcomes = {}
    for name, method in methods.items():
        synchronize(device)
        outcomes[name] = method()
        synchronize(device)
        print(f"{workload} {name}: {outcomes[name].seconds:.1f} s", flush=True)
    base = outcomes["(a) baseline"]
    rows = [
        f"| {name} | {o.seconds:.1f} | {o.trials_per_hour():,.0f} | "
        f"{o.trials_per_hour() / base.trials_per_hour():.2f} |"
        for name, o in outcomes.items()
    ]
    table = "| method | seconds | trials per hour | ratio to (a) |\n|---|---:|---:|---:|\n"
    table += "\n".join(rows)
    agreement = []
    names = list(outcomes)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            gaps = [
                abs(p - q) * 100
                for p, q in zip(
                    outcomes[first].best_val_accuracy,
                    outcomes[second].best_val_accuracy,
                    strict=True,
                )
            ]
            agreement.append(
                f"| {first[:3]} vs {second[:3]} | {statistics.mean(gaps):.2f} | {max(gaps):.2f} |"
            )
    table += (
        "\n\n| best val accuracy, points | mean abs difference | max abs difference |\n"
        "|---|---:|---:|\n" + "\n".join(agreement)
    )
    if device.type == "cuda":
        work, rate = flops(configs, data), matmul_rate(device)
        floor = work / rate
        fused_s = outcomes["(c) fused"].seconds
        table += (
            f"\n\nFloor: {work / 1e12:.2f} TFLOP of work at the measured {rate / 1e12:.1f} "
            f"TFLOP/s fp32 matmul rate = {floor * 1000:.1f} ms; (c) takes "
            f"{fused_s / floor:,.0f}x the floor."
        )
    n_train = data.x_train.shape[0]
    batch = [c.batch_size for c in configs]
    return (
        f"#### {workload}: {n_train:,} training rows x {data.n_features}, "
        f"network {'-'.join(map(str, [data.n_features, *configs[0].hidden, data.n_outputs]))}, "
        f"{len(configs)} trials x {args.epochs} epochs, batch sizes {min(batch)}..{max(batch)}\n\n"
        f"{table}\n"
    )


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also (d): fused with the forward pass under bf16 autocast",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    started, load = time.perf_counter(), os.getloadavg()[0]
    parts = [run(workload, args, device) for workload in args.workloads]
    label = device_label(device)
    command = "python bench/throughput.py " + " ".join(
        (f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k} {v}"
        for k, v in vars(args).items()
        if k != "workloads"
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
        "`bench/throughput.py`: the same trials three ways (see its docstring). (c) trains "
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
