"""Does `torch.compile` pay for hpsearch's single-trial training loop?

hpsearch trains a trial with `hpsearch.training.train.train`: `_train_epoch` every epoch, `evaluate`
after it. This measures that loop eager and compiled, on bench/throughput.py's workloads
(digits: 1,257 training rows x 64; a synthetic MNIST-sized set: 42,000 x 784; one hidden
layer of 128, dropout 0.1, Adam) at batch sizes 64 and 200, in three compiled variants:

- `compile`: `torch.compile(model)` with default settings;
- `dynamic=False`: `torch.compile(model, dynamic=False)`, one graph per input size;
- whole step: forward, loss, `zero_grad`, backward and the optimiser step as one compiled
  function in place of `_train_epoch`'s batch body (same permutation, same loss and norms).

Every measurement is its own subprocess (fresh dynamo state, its own inductor cache), and
the variants alternate (eager, compile, ..., eager, compile, ...) so drift on a shared
machine falls on all of them. Each subprocess runs the project's own `train()` three times:
1. a trial in the fresh process: s/epoch is `_train_epoch`'s median over epochs 2..5;
   its wall time less trial 2's is the compilation a new process pays;
2. the same trial again in that process, as a long-lived worker runs its next trial;
3. a 1-epoch trial with dropout 0.2: does a new hyperparameter value recompile?
Each (workload, batch, variant) runs twice: with an empty inductor cache (cold), then with
the cache the first run filled (warm: a second worker process on the same host). Finally
eager and compiled losses are compared after 3 epochs from the same seed.

Run: .venv/bin/python bench/compile.py [--device cuda] [--threads 1] [--quick] [--json PATH]
     .venv/bin/python bench/compile.py --from-json PATH   (the section of a saved run)
On a CPU pin it for stable figures: OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python ...
It prints a Markdown section; `--write` also puts it into BENCHMARKS.md as "## torch.compile
on CPU" or "on GPU", replacing the earlier run on that device kind. `--quick`
(digits, batch 64, 2 epochs, eager and `compile` only) is a smoke test of about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
from report import environment, markdown_table, write_section
from throughput import configs_for
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters

import hpsearch.training.train as hp_train
from hpsearch.data.tensors import TensorData, load_dataset
from hpsearch.training.train import TrialConfig

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ["digits", "mnist-sized"]
BATCHES = [64, 200]
VARIANTS = ["eager", "compile", "compile_static", "step"]
LABELS = {
    "eager": "eager",
    "compile": "`compile`",
    "compile_static": "`dynamic=False`",
    "step": "whole step",
}
EPOCHS = 10
EQUALITY_EPOCHS = 3
NEW_DROPOUT = "t3_dropout0.2"  # the third trial's key in the results
CHILD_TIMEOUT_S = 900

Results = dict[str, Any]


# --- in the subprocess -------------------------------------------------------------------


def compiled(model: nn.Module, **options: Any) -> nn.Module:
    """`torch.compile(model, **options)`, made usable where hpsearch uses its model.

    `_train_epoch` finds the Linear layers for its gradient norms by iterating the model
    (`for m in model`). The `OptimizedModule` that `torch.compile` returns forwards attribute
    access to the wrapped `nn.Sequential`, but not iteration: Python looks `__iter__` up on
    the type, so `for m in compiled_model` raises TypeError. Giving the wrapper type an
    `__iter__` over the wrapped module is this benchmark's one change to torch, and the one
    fix hpsearch's loop needs to run a compiled model; `install` only swaps the model, adds
    timers and (whole step) replaces the epoch.
    """
    OptimizedModule.__iter__ = _iterate_wrapped  # type: ignore[attr-defined]
    return torch.compile(model, **options)


def _iterate_wrapped(self: OptimizedModule) -> Iterator[nn.Module]:
    return iter(self._orig_mod)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(job: dict[str, Any], dropout: float = 0.1) -> tuple[TrialConfig, TensorData]:
    """throughput.py's workload as one trial: its spec, our batch size and dropout."""
    if job["device"] == "cpu":
        torch.set_num_threads(job["threads"])
    params = {
        "learning_rate": 1e-3,
        "batch_size": job["batch"],
        "dropout": dropout,
        "weight_decay": 0.0,
    }
    configs, spec = configs_for(job["workload"], [params], job["epochs"])
    return configs[0], load_dataset(spec, job["device"])


class Recompiles(logging.Handler):
    """Dynamo's recompile messages: the function and the guards that failed, shortened."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().splitlines()
        if lines and "ecompil" in lines[0]:
            reasons = [line.strip() for line in lines if re.match(r"\s*- \d+/\d+:", line)]
            self.messages.append(lines[0].split(" in ")[0] + " <- " + "; ".join(reasons)[:200])

    @classmethod
    def install(cls) -> Recompiles:
        handler = cls()
        torch._logging.set_logs(recompiles=True)
        logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(handler)
        return handler


def step_epoch(
    model: nn.Module,
    data: TensorData,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrialConfig,
    generator: torch.Generator,
    steps: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
) -> tuple[float, tuple[float, ...]]:
    """`_train_epoch` with the batch body as one compiled function (one per model, kept in
    `steps`). These trials use neither autocast, gradient clipping nor batch norm, so the
    parts of `_train_epoch` left out here would do nothing."""
    if id(model) not in steps:

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        steps[id(model)] = torch.compile(step)
    step = steps[id(model)]
    model.train()
    n = data.x_train.shape[0]
    order = torch.randperm(n, device=data.device, generator=generator)
    total = torch.zeros((), device=data.device)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    last_full = max(0, n - config.batch_size) // config.batch_size * config.batch_size
    norms = torch.zeros(len(weights), device=data.device)
    for start in range(0, n, config.batch_size):
        index = order[start : start + config.batch_size]
        loss = step(data.x_train[index], data.y_train[index])
        if start == last_full:  # the gradients outlive step(); zero_grad is in the next one
            norms = torch.stack([w.grad.detach().norm() for w in weights])
        total += loss * index.numel()
    loss_value, *layer_norms = torch.cat([(total / n).view(1), norms.float()]).tolist()
    return loss_value, tuple(layer_norms)


def install(variant: str, timings: dict[str, list[float]], device: torch.device) -> None:
    """Patch training in this process: the variant's model or epoch, and timers around
    `_train_epoch` (with the graphs each epoch compiled) and `evaluate`."""
    build, epoch, evaluate = hp_train.build_model, hp_train._train_epoch, hp_train.evaluate
    options = {"compile": {}, "compile_static": {"dynamic": False}}.get(variant)
    steps: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}

    def build_model(config: TrialConfig, data: TensorData) -> nn.Module:
        model = build(config, data)
        return model if options is None else compiled(model, **options)

    def timed_epoch(*args: Any) -> tuple[float, tuple[float, ...]]:
        graphs = counters["stats"]["unique_graphs"]
        synchronize(device)
        started = time.perf_counter()
        out = step_epoch(*args, steps=steps) if variant == "step" else epoch(*args)
        synchronize(device)
        timings["train"].append(time.perf_counter() - started)
        timings["graphs"].append(counters["stats"]["unique_graphs"] - graphs)
        return out

    def timed_evaluate(*args: Any) -> dict[str, float]:
        synchronize(device)
        started = time.perf_counter()
        out = evaluate(*args)
        synchronize(device)
        timings["eval"].append(time.perf_counter() - started)
        return out

    hp_train.build_model, hp_train._train_epoch = build_model, timed_epoch
    hp_train.evaluate = timed_evaluate


def measure_trials(job: dict[str, Any]) -> Results:
    """Trials 1-3 (see the module docstring) of one variant in this fresh process."""
    handler = Recompiles.install()
    config, data = setup(job)
    timings: dict[str, list[float]] = {}
    install(job["variant"], timings, data.device)
    out: Results = {"n_train": data.x_train.shape[0]}
    trials = {
        "t1": config,
        "t2": config,
        NEW_DROPOUT: replace(config, dropout=0.2, max_epochs=1),
    }
    for name, trial in trials.items():
        timings.update(train=[], eval=[], graphs=[])
        handler.messages.clear()
        graphs = counters["stats"]["unique_graphs"]
        synchronize(data.device)
        started = time.perf_counter()
        result = hp_train.train(trial, data)
        synchronize(data.device)
        out[name] = {
            "wall": time.perf_counter() - started,
            "train": timings["train"],
            "eval": timings["eval"],
            "graphs_per_epoch": timings["graphs"],
            "graphs": counters["stats"]["unique_graphs"] - graphs,
            "recompiles": list(handler.messages),
            "train_loss": [r.train_loss for r in result.history],
            "val_acc": result.value,
        }
    out["graph_breaks"] = sum(counters["graph_break"].values())
    return out


def measure_equality(job: dict[str, Any]) -> Results:
    """Eager against `torch.compile(model)`: the training losses of 3 epochs and the last
    validation loss, from the same seed, with dropout 0.1 and with dropout 0.

    With dropout, inductor draws the masks with its own generated random-number code, not
    eager's generator, so the compiled trial sees other masks and its losses differ as any
    other draw of masks would. `torch._inductor.config.fallback_random = True` makes the
    compiled code call eager's random ops (a testing aid, slower): with it, and with dropout
    0, the losses must agree to floating-point rounding.
    """
    build, out = hp_train.build_model, {}
    runs = [("eager", False, False), ("compiled", True, False)]
    for dropout in (0.1, 0.0):
        config, data = setup(job | {"epochs": EQUALITY_EPOCHS}, dropout)
        fallback = [("compiled_fallback_random", True, True)] if dropout else []
        for label, compile_it, fallback_random in runs + fallback:
            inductor_config.fallback_random = fallback_random
            torch._dynamo.reset()
            if compile_it:
                hp_train.build_model = lambda c, d: compiled(build(c, d))
            try:
                result = hp_train.train(config, data)
            finally:
                hp_train.build_model = build
            losses = [r.train_loss for r in result.history] + [result.history[-1].val_loss]
            out[f"dropout{dropout}_{label}"] = losses
    return out


def child_main(job: dict[str, Any]) -> None:
    """A subprocess's one measurement, printed as one `RESULT {json}` line."""
    result = measure_equality(job) if job["task"] == "equality" else measure_trials(job)
    print("RESULT " + json.dumps(result), flush=True)


# --- in the driver -----------------------------------------------------------------------


def run_child(job: dict[str, Any], cache: Path) -> Results:
    """One measurement in a fresh interpreter whose inductor (and Triton) caches are `cache`."""
    env = dict(
        os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton")
    )
    if job["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(job["threads"])
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(job)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {CHILD_TIMEOUT_S} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr[-3000:]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def measure(
    args: argparse.Namespace, plan: dict[str, Any], save: Callable[[Results], None]
) -> Results:
    """Every (workload, batch, cold/warm, variant) run, then the equality runs; the results
    are saved after each run, so a run cut short keeps what it measured."""
    results: Results = {"meta": plan["meta"]}
    started = time.perf_counter()
    base = {"device": args.device, "threads": args.threads, "epochs": plan["epochs"]}
    with tempfile.TemporaryDirectory(prefix="hpsearch-compile-") as caches:
        for workload in plan["workloads"]:
            for batch in plan["batches"]:
                for rep in (1, 2):  # rep 1 fills an empty cache, rep 2 reuses it
                    for variant in plan["variants"]:
                        cache = Path(caches) / f"{workload}_{batch}_{variant}"
                        job = base | {"task": "trials", "workload": workload, "batch": batch}
                        key = f"{workload}|{batch}|{variant}|{rep}"
                        results[key] = run_child(job | {"variant": variant}, cache)
                        save(results)
                        log(started, key, results[key])
        for workload in plan["workloads"]:
            job = base | {"task": "equality", "workload": workload, "batch": plan["batches"][0]}
            results[f"equality|{workload}"] = run_child(job, Path(caches) / "equality")
            save(results)
            log(started, f"equality|{workload}", results[f"equality|{workload}"])
    return results


def log(started: float, key: str, result: Results) -> None:
    """One progress line on stderr (the section goes to stdout)."""
    if "error" in result:
        summary = "ERROR " + result["error"][-400:]
    elif "t1" in result:
        epochs = " ".join(f"{x:.3f}" for x in result["t1"]["train"])
        summary = f"trial 1 {result['t1']['wall']:.2f} s, epochs {epochs}"
    else:
        summary = "losses " + json.dumps(result)[:300]
    print(f"[{time.perf_counter() - started:5.0f} s] {key}: {summary}", file=sys.stderr, flush=True)


def device_label(device: str, threads: int) -> str:
    if device == "cuda":
        return f"GPU: {torch.cuda.get_device_name()}"
    return f"CPU: {threads} thread{'s' * (threads != 1)}"


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """What the section says about the run besides its figures, saved with them."""
    label = device_label(args.device, args.threads)
    gpu = label.removeprefix("GPU: ") if args.device == "cuda" else None
    command = "python bench/compile.py " + " ".join(sys.argv[1:])
    if args.device == "cpu":
        cores = sorted(os.sched_getaffinity(0))
        threads = (
            f"{args.threads} per process (`torch.set_num_threads`, OMP_NUM_THREADS), "
            f"pinned to core(s) {','.join(map(str, cores))} of {os.cpu_count()}"
        )
    else:
        threads = "torch's default (not set on a GPU run)"
    return {
        "device": label,
        "device_type": args.device,
        "threads": threads,
        "environment": environment(command, ("torch",), gpu),
        "load": [os.getloadavg()[0]],
    }


# --- the section -------------------------------------------------------------------------


def runs_of(results: Results) -> tuple[list[str], list[int], list[str]]:
    """The workloads, batch sizes and variants a results file holds, in run order."""
    keys = [k.split("|") for k in results if k.count("|") == 3]
    workloads = list(dict.fromkeys(k[0] for k in keys))
    batches = list(dict.fromkeys(int(k[1]) for k in keys))
    present = {k[2] for k in keys}
    return workloads, batches, [v for v in VARIANTS if v in present]


def steady(runs: dict[int, Results]) -> float:
    """s/epoch: the median of epochs 2..5 of trial 1, the median over the cold and warm runs
    (epoch 1 compiles; later epochs of a shared machine drift)."""
    return statistics.median(statistics.median(r["t1"]["train"][1:5]) for r in runs.values())


def compile_cost(run: Results) -> float:
    """Trial 1 less the same trial run again in that process: the compilation (in training
    and in evaluation) a new process pays."""
    return run["t1"]["wall"] - run["t2"]["wall"]


def table(results: Results, workloads: list[str], batches: list[int], variants: list[str]) -> str:
    """One row per workload and batch size."""
    compiled_variants = variants[1:]
    header = [
        "workload",
        "batch",
        "eager s/epoch",
        *(f"{LABELS[v]} s/epoch (ratio)" for v in compiled_variants),
        "compile cost cold / warm, s",
        "trial in a fresh process, s: eager vs compiled",
    ]
    rows = []
    for workload in workloads:
        for batch in batches:
            runs = {
                v: {rep: results.get(f"{workload}|{batch}|{v}|{rep}") for rep in (1, 2)}
                for v in variants
            }
            if any(r is None or "error" in r for rv in runs.values() for r in rv.values()):
                rows.append([workload, str(batch), *["error"] * (len(header) - 2)])
                continue
            eager = steady(runs["eager"])
            per_epoch = [
                f"{steady(runs[v]):#.3g} ({steady(runs[v]) / eager:.2f})" for v in compiled_variants
            ]
            costs = " · ".join(
                f"{compile_cost(runs[v][1]):.1f} / {compile_cost(runs[v][2]):.1f}"
                for v in compiled_variants
            )
            trials = " · ".join(f"{runs[v][1]['t1']['wall']:#.3g}" for v in compiled_variants)
            eager_trial = f"{runs['eager'][1]['t1']['wall']:#.3g}"
            rows.append(
                [
                    workload,
                    str(batch),
                    f"{eager:#.3g}",
                    *per_epoch,
                    costs,
                    f"{eager_trial} vs {trials}",
                ]
            )
    return markdown_table(header, rows)


def verdict(results: Results, workloads: list[str], batches: list[int], variants: list[str]) -> str:
    """Whether any compiled variant beats eager per epoch anywhere, which is what it would
    take to pay back its compilation."""

    def per_epoch(workload: str, batch: int, variant: str) -> float | None:
        runs = {rep: results.get(f"{workload}|{batch}|{variant}|{rep}") for rep in (1, 2)}
        if any(run is None or "error" in run for run in runs.values()):
            return None
        return steady(runs)

    ratios = []
    for workload in workloads:
        for batch in batches:
            eager = per_epoch(workload, batch, "eager")
            for variant in variants[1:]:
                compiled = per_epoch(workload, batch, variant)
                if eager is not None and compiled is not None:
                    ratios.append(compiled / eager)
    if not ratios:
        return "Verdict: nothing was measured."
    faster = sum(ratio < 1 for ratio in ratios)
    return (
        f"Verdict: compiled is faster per epoch than eager in {faster} of {len(ratios)} "
        f"cells (compiled / eager {min(ratios):.2f}..{max(ratios):.2f}), before the "
        "compilation each new process and each new dropout value pays"
        + ("; hpsearch trains eager here." if faster == 0 else ".")
    )


def span(values: list[float], fmt: str = "{:#.3g}") -> str:
    """`a` or `a-b`, the range of a figure over runs."""
    if not values:
        return "?"
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def runs_by_variant(results: Results, variant: str, rep: int = 1) -> dict[str, Results]:
    """The error-free runs of a variant by "workload|batch"."""
    found = {}
    for key, run in results.items():
        parts = key.split("|")
        if len(parts) == 4 and parts[2:] == [variant, str(rep)] and "error" not in run:
            found["|".join(parts[:2])] = run
    return found


def guards(messages: list[str]) -> list[str]:
    """What the recompile messages say failed, in words."""
    found = {
        "the dropout probability": r"\.p == ",
        "the optimiser object": r"check_obj_id\((optimizer|args\[0\]),",
        "an input size": r"size mismatch",
        "grad mode (evaluation)": r"grad_mode",
    }
    return [
        words for words, pattern in found.items() if any(re.search(pattern, m) for m in messages)
    ]


def graphs_bullet(variant: str, runs: list[Results]) -> str:
    """Where a fresh process's first trial compiles."""
    first = [r["t1"]["graphs_per_epoch"][0] for r in runs]
    later = [sum(r["t1"]["graphs_per_epoch"][1:]) for r in runs]
    total = [r["t1"]["graphs"] for r in runs]
    breaks = [r["graph_breaks"] for r in runs]
    return (
        f"{LABELS[variant]}: trial 1 compiles {span(first, '{}')} graph(s) in its first "
        f"training epoch, {span(later, '{}')} in later ones, {span(total, '{}')} in all with "
        f"evaluation's; {span(breaks, '{}')} graph break(s) in the process"
    )


def later_trial(
    variant: str, runs: dict[str, Results], eager: dict[str, Results], trial: str
) -> str:
    """New graphs and wall time (and its ratio to eager's in the same setting) of trial 2 or
    3, and the guards that sent it to recompile."""
    reasons = guards([m for r in runs.values() for m in r[trial]["recompiles"]])
    because = f" (guards failed on {', '.join(reasons)})" if reasons else ""
    ratios = [r[trial]["wall"] / eager[k][trial]["wall"] for k, r in runs.items() if k in eager]
    return (
        f"{LABELS[variant]} {span([r[trial]['graphs'] for r in runs.values()], '{}')} new "
        f"graph(s), {span([r[trial]['wall'] for r in runs.values()])} s = "
        f"{span(ratios, '{:.1f}')}x eager's{because}"
    )


def recompile_bullets(results: Results, variants: list[str]) -> list[str]:
    """Graphs per trial, the last partial batch, the next trial, a new dropout value
    (figures of the cold-cache runs; ranges over workloads and batch sizes)."""
    graphs, partial, again, dropout = [], [], [], []
    eager = runs_by_variant(results, "eager")
    for v in variants[1:]:
        runs = runs_by_variant(results, v)
        if not runs:
            continue
        graphs.append(graphs_bullet(v, list(runs.values())))
        hits = [
            any(f"expected {b}, actual {r['n_train'] % b}" in m for m in r["t1"]["recompiles"])
            for b, r in ((int(k.split("|")[1]), r) for k, r in runs.items())
            if r["n_train"] % b
        ]
        partial.append(f"{LABELS[v]} recompiles in {sum(hits)} of {len(hits)} runs")
        again.append(later_trial(v, runs, eager, "t2"))
        dropout.append(later_trial(v, runs, eager, NEW_DROPOUT))
    return [
        *graphs,
        "Last partial batch of an epoch (where rows % batch is not 0): " + "; ".join(partial),
        "Same trial again in the same process: " + "; ".join(again),
        "New dropout value (0.2), a 1-epoch trial in the same process: " + "; ".join(dropout),
    ]


def equality_bullets(results: Results) -> list[str]:
    """The largest difference between eager and compiled losses, per workload."""
    bullets = []
    for key, losses in results.items():
        if not key.startswith("equality|"):
            continue
        workload = key.removeprefix("equality|")
        if "error" in losses:
            bullets.append(f"Equality, {workload}: error: {losses['error'][-300:]!r}")
            continue

        def gap(dropout: str, label: str, losses: Results = losses) -> str:
            pairs = zip(losses[f"{dropout}_eager"], losses[f"{dropout}_{label}"], strict=True)
            return f"{max(abs(a - b) for a, b in pairs):.1e}"

        bullets.append(
            f"Equality, {workload} (3 epochs' training losses and the last validation loss, "
            f"same seed; largest |eager - compiled|): dropout 0: {gap('dropout0.0', 'compiled')}; "
            f"dropout 0.1: {gap('dropout0.1', 'compiled')} (inductor draws its own dropout "
            f"masks), {gap('dropout0.1', 'compiled_fallback_random')} with "
            "`torch._inductor.config.fallback_random = True` (eager's random ops, so eager's masks)"
        )
    return bullets


def section_title(device_type: str) -> str:
    """One section per device kind, so a GPU run leaves the CPU figures in place."""
    return f"## torch.compile on {'GPU' if device_type == 'cuda' else 'CPU'}"


def section(results: Results, meta: dict[str, Any]) -> str:
    """The Markdown section: run details, the table, then recompiles and equality."""
    workloads, batches, variants = runs_of(results)
    first = next((r for k, r in results.items() if k.count("|") == 3 and "t1" in r), None)
    epochs = len(first["t1"]["train"]) if first else "?"
    load = meta.get("load", [])
    lines = [
        section_title(meta["device_type"]),
        "",
        f"- Device: {meta['device']}",
        meta["environment"],
        f"- Threads: {meta['threads']}",
    ]
    if "seconds" in meta:
        lines.append(
            f"- Run time: {meta['seconds']:.0f} s; load average "
            + " at the start, ".join(f"{x:.1f}" for x in load)
            + " at the end"
        )
    errors = [k for k, r in results.items() if k.count("|") == 3 and "error" in r]
    lines += [
        "",
        f"`bench/compile.py`: hpsearch's own `train()`, {epochs}-epoch trials, eager against "
        "compiled (see its docstring). s/epoch: `_train_epoch`'s median over epochs 2..5; "
        "ratio: compiled / eager, above 1 is slower. Compile cost: a new process's first "
        "trial less the same trial again in that process, with an empty (cold) and a filled "
        "(warm) inductor cache. The last two columns list the compiled variants in the order "
        "of the s/epoch columns.",
        "",
        table(results, workloads, batches, variants),
        "",
        verdict(results, workloads, batches, variants),
        "",
        *(f"- {b}" for b in recompile_bullets(results, variants)),
        *(f"- {b}" for b in equality_bullets(results)),
        *(f"- Error in {k}: {results[k]['error'][-300:]!r}" for k in errors),
    ]
    return "\n".join(lines) + "\n"


# --- command line ------------------------------------------------------------------------


def plan_of(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"workloads": ["digits"], "batches": [64], "variants": VARIANTS[:2], "epochs": 2}
    return {"workloads": WORKLOADS, "batches": BATCHES, "variants": VARIANTS, "epochs": EPOCHS}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child_main(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--quick", action="store_true", help="smoke test; --write refused")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(tempfile.gettempdir()) / "hpsearch-compile.json",
        help="where the raw results go (default: %(default)s)",
    )
    parser.add_argument("--from-json", type=Path, help="render a saved run; measure nothing")
    parser.add_argument("--write", action="store_true", help="put the section in BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick and args.write:
        parser.error("--quick results are a smoke test; --write refuses them")
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        meta = results["meta"]
    else:
        results, meta = run_all(args)
        print(f"raw results: {args.json}", file=sys.stderr)
    body = section(results, meta)
    print(body)
    if args.write:
        write_section(section_title(meta["device_type"]), body)


def run_all(args: argparse.Namespace) -> tuple[Results, dict[str, Any]]:
    """Measure everything, saving to --json as it goes; the run details go in "meta"."""
    started = time.perf_counter()
    plan = plan_of(args) | {"meta": run_meta(args)}

    def save(results: Results) -> None:
        args.json.write_text(json.dumps(results, indent=1))

    results = measure(args, plan, save)
    meta = results["meta"]
    meta["seconds"] = time.perf_counter() - started
    meta["load"].append(os.getloadavg()[0])
    save(results)
    return results, meta


if __name__ == "__main__":
    main()
