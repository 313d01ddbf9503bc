"""Everything hpsearch wants to know from a GPU node, in one command under a time limit.

A GPU node may be lent for minutes only, without a package index (bench/gpu.sh installs the
wheels of bench/gpu_wheels.sh first), so this runs three stages, each in its own process
with its own share of `--limit-s`, and writes every stage's figures into gpu.json as soon as
the stage ends: a stage stopped at its share keeps what it reported, and the later stages
still get theirs (a stage also gets whatever the earlier ones left unused).

1. cuda-tests: the tests marked `cuda` (`pytest -m cuda`), in the modules that use the
   marker (collecting every module would import the API's packages, which such a node need
   not have): passed, failed, skipped, and the failures' names, read from pytest's lines as
   they come, so that a run stopped at its share keeps the tests it finished.
2. throughput: bench/throughput.py on the GPU, the MNIST-sized workload first (the goal's)
   and then digits: (a) the DataLoader baseline and (b) one at a time on a few trials, (c)
   fused, (d) fused bf16 and (e) fused compiled on all 32. The goal: the fastest fused
   method at least 20x (a) in trials per hour on the MNIST-sized workload, and within 10x of
   the FLOP floor.
3. worker: examples/mnist-mlp.yaml with a smaller budget, submitted into a new SQLite
   database, then `hpsearch worker --device all --pack 32` until it is idle: trials
   finished, wall time, trials per hour, the pack size it claimed, the best value.

Output (--out, default bench/gpu-results/): gpu.json, gpu-section.md and each stage's log;
the section "## GPU check" of BENCHMARKS.md; a short summary, printed last.

`--dry-run` runs every stage at tiny sizes on the CPU (the CUDA tests only collected and
counted, the throughput on digits with 4 trials of 2 epochs, a worker on an 8-trial digits
study), writes into a temporary folder unless --out is given, and never into
BENCHMARKS.md: the test suite runs it so that this script keeps working.

Run: bash bench/gpu.sh [--out DIR] [--dry-run] [--limit-s 480]
     python bench/gpu.py --from-json PATH   (BENCHMARKS.md's section from a saved gpu.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from report import environment, markdown_table, package_version, write_section
from throughput import BASELINE, render

REPO = Path(__file__).resolve().parent.parent
SECTION = "## GPU check"
DEFAULT_OUT = REPO / "bench" / "gpu-results"
MARGIN_S = 20.0  # kept at the end of --limit-s for the last stage's queries and the writing
MIN_STAGE_S = 10.0  # a stage given less than this does not start
STOP_GRACE_S = 15.0  # between SIGTERM and SIGKILL: a worker checkpoints and hands back
QUERIES_S = 15.0  # the worker stage's status and leaderboard, after the worker
GOAL_FUSED_VS_BASELINE = 20.0  # fastest fused / (a), trials per hour, at least
GOAL_FLOOR_RATIO = 10.0  # best fused seconds / FLOP floor, at most
GOAL_WORKLOAD = "mnist-sized"
VERSIONS = ("torch", "optuna", "numpy", "sqlalchemy", "pydantic")

Results = dict[str, Any]


class StageFailed(Exception):
    """A stage that could not produce its figures; `results` keeps what it had."""

    def __init__(self, message: str, results: Results | None = None) -> None:
        super().__init__(message)
        self.results = results or {}


@dataclass
class Context:
    """What every stage needs: where to write, a scratch folder, and how to run."""

    out: Path
    work: Path
    dry_run: bool

    @property
    def python(self) -> str:
        return sys.executable

    def log(self, stage: str) -> Path:
        """The stage's log, one of the few files that come back with gpu.json."""
        return self.out / f"{stage}.log"


@dataclass
class Stage:
    name: str
    share: float  # of --limit-s
    run: Callable[[Context, float], Results]  # its figures; "cut": True if stopped at budget


# --- running commands ------------------------------------------------------------------


def run_logged(command: list[str], log: Path, timeout_s: float) -> int | None:
    """Run `command` in the repository with its output appended to `log`; its exit code,
    or None if it was stopped at `timeout_s`. It runs in a process group of its own, so that
    stopping it (SIGTERM, then SIGKILL) also stops the processes it started, and so does
    leaving early (Ctrl-C here)."""
    with log.open("a") as sink:
        sink.write(f"$ {shlex.join(command)}\n")
        sink.flush()
        process = subprocess.Popen(
            command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            sink.write(f"\n[stopped after {timeout_s:.0f} s, its share of --limit-s]\n")
            return None
        finally:
            stop(process)  # what is left of its group; nothing if it ended cleanly


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group we started, then SIGKILL whatever is left of it after a
    grace period (a worker checkpoints and hands its trials back)."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 15) -> str:
    """The end of a log, for an error message."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def hpsearch_json(context: Context, *args: str) -> Any:
    """A client command's --json answer."""
    command = [context.python, "-m", "hpsearch", *args, "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise StageFailed(f"{shlex.join(args)} exited {done.returncode}: {done.stderr[-800:]}")
    return json.loads(done.stdout)


# --- stage 1: CUDA tests ---------------------------------------------------------------


def cuda_test_files() -> list[str]:
    """The test modules that use the `cuda` marker."""
    tests = sorted((REPO / "tests").glob("test_*.py"))
    return [str(p.relative_to(REPO)) for p in tests if "mark.cuda" in p.read_text()]


def cuda_tests(context: Context, budget_s: float) -> Results:
    files, log = cuda_test_files(), context.log("cuda-tests")
    pytest = [context.python, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider"]
    pytest.append("--continue-on-collection-errors")  # one module's error stops no other
    if context.dry_run:  # nothing can run without a device: collect and count them
        code = run_logged([*pytest, "--collect-only", "-q", *files], log, budget_s)
        if code is None:
            return {"files": files, "cut": True}
        if code != 0:
            raise StageFailed(f"pytest --collect-only exited {code}: {tail(log)}")
        names = [line for line in log.read_text().splitlines() if "::" in line]
        return {"files": files, "collected": len(names), "tests": names}
    code = run_logged([*pytest, "-v", *files], log, budget_s)
    results = {"files": files, **outcomes_of(log.read_text(errors="replace"))}
    if code not in (0, 1, 5, None):  # 1: tests failed (figures); others: pytest failed
        raise StageFailed(f"pytest exited {code}: {tail(log)}", results)
    return results | {"cut": code is None}


VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (\S+)")  # -ra's; collection errors too


def outcomes_of(output: str) -> Results:
    """Passed, failed (failures and errors) and skipped tests, and the failures' names,
    from pytest -v's lines as they came: a run stopped midway keeps the tests it finished."""
    outcomes: dict[str, str] = {}
    for line in output.splitlines():
        if found := VERBOSE_LINE.match(line):
            test, outcome = found[1], found[2]
        elif found := SUMMARY_LINE.match(line):
            outcome, test = found[1], found[2]
        else:
            continue
        if outcomes.get(test) not in ("FAILED", "ERROR"):  # a teardown's error after a pass
            outcomes[test] = outcome
    failures = [test for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    return {
        "passed": sum(outcome in ("PASSED", "XFAIL", "XPASS") for outcome in outcomes.values()),
        "failed": len(failures),
        "skipped": sum(outcome == "SKIPPED" for outcome in outcomes.values()),
        "failures": failures,
    }


# --- stage 2: throughput ---------------------------------------------------------------


def throughput_options(dry_run: bool) -> list[str]:
    """Sizes that fit the stage's share: on an H200 the baseline (a) takes seconds per
    MNIST-sized trial, so (a) and (b) run 4 trials, the fused methods all 32."""
    if dry_run:
        return ["--device", "cpu", "--workloads", "digits", "--trials", "4"]
    return ["--device", "cuda", "--workloads", GOAL_WORKLOAD, "digits", "--trials", "32"]


def throughput(context: Context, budget_s: float) -> Results:
    figures_path, log = context.work / "throughput.json", context.log("throughput")
    sizes = ["--slow-trials", "2", "--epochs", "2"] if context.dry_run else ["--slow-trials", "4"]
    compiled = "--no-compiled" if context.dry_run else "--compiled"  # compiling takes a minute
    command = [context.python, "bench/throughput.py", *throughput_options(context.dry_run)]
    command += [*sizes, compiled, "--no-write", "--json", str(figures_path)]
    code = run_logged(command, log, budget_s)
    figures = json.loads(figures_path.read_text()) if figures_path.exists() else {}
    results = {"command": shlex.join(command[1:]), "workloads": figures.get("workloads", {})}
    if code not in (0, None):
        raise StageFailed(f"throughput.py exited {code}: {tail(log)}", results)
    return results | {"cut": code is None}


def goal_check(workloads: dict[str, Results], judged: bool) -> Results | None:
    """The goal's two ratios for the fastest fused method (the one a worker would run) on
    the MNIST-sized workload (digits if it alone ran), and whether each is met (None where
    not measured, or not `judged`: a dry run's are not)."""
    name = GOAL_WORKLOAD if GOAL_WORKLOAD in workloads else next(iter(workloads), None)
    if name is None:
        return None
    methods = workloads[name]["methods"]
    fused = {n: m for n, m in methods.items() if "fused" in n}
    best = max(fused, key=lambda n: fused[n]["trials_per_hour"], default=None)
    ratio = floor = None
    if best and BASELINE in methods:
        ratio = fused[best]["trials_per_hour"] / methods[BASELINE]["trials_per_hour"]
    if best:
        floor = fused[best]["floor_ratio"]
    return {
        "workload": name,
        "fused_vs_baseline": ratio,
        "fused_vs_baseline_met": ratio >= GOAL_FUSED_VS_BASELINE if judged and ratio else None,
        "best_fused": best,
        "best_fused_floor_ratio": floor,
        "floor_met": floor <= GOAL_FLOOR_RATIO if judged and floor else None,
    }


# --- stage 3: a real worker -------------------------------------------------------------


def worker_plan(dry_run: bool) -> Results:
    """The study and the worker's options: on the GPU, enough packs of 32 for a steady rate
    within the stage's share; on the CPU, two packs of 4 tiny trials."""
    if dry_run:
        return {"example": "digits.yaml", "n_trials": 8, "max_epochs": 2, "device": "cpu"}
    return {"example": "mnist-mlp.yaml", "n_trials": 96, "max_epochs": None, "device": "all"}


def worker(context: Context, budget_s: float) -> Results:
    plan = worker_plan(context.dry_run)
    pack, idle_exit = (4, 1) if context.dry_run else (32, 3)
    spec = yaml.safe_load((REPO / "examples" / plan["example"]).read_text())
    spec["budget"] = {"n_trials": plan["n_trials"]}
    if plan["max_epochs"] is not None:
        spec["training"]["max_epochs"] = plan["max_epochs"]
    spec_path = context.work / "study.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    db, log = f"sqlite:///{context.work / 'worker.db'}", context.log("worker")
    hpsearch = [context.python, "-m", "hpsearch"]
    if run_logged([*hpsearch, "submit", "--db", db, str(spec_path)], log, 120) != 0:
        raise StageFailed(f"hpsearch submit failed: {tail(log)}")
    options = ["--device", plan["device"], "--pack", str(pack), "--idle-exit", str(idle_exit)]
    command = [*hpsearch, "worker", "--db", db, *options, "--log-format", "json"]
    started = time.monotonic()
    code = run_logged(command, log, budget_s - STOP_GRACE_S - QUERIES_S)
    wall_s = time.monotonic() - started
    if code not in (0, None):
        raise StageFailed(f"hpsearch worker exited {code}: {tail(log)}")
    results = {
        "example": plan["example"],
        "budget": plan["n_trials"],
        "command": shlex.join(["python", *command[1:]]).replace(db, "sqlite:///worker.db"),
        "pack": pack,
        "wall_s": wall_s,
    }
    return results | worker_results(context, db, spec["name"], log, wall_s) | {"cut": code is None}


def worker_results(context: Context, db: str, study: str, log: Path, wall_s: float) -> Results:
    """What the worker did: the study's progress and best value, its claims and rates."""
    status = hpsearch_json(context, "status", "--db", db, study)
    board = hpsearch_json(context, "leaderboard", "--db", db, study, "--top", "1")
    logged = worker_log(log)
    finished, training_s = status["progress"]["finished"], logged["training_s"]
    return {
        "progress": status["progress"],
        "finished": finished,
        "trials_per_hour": finished * 3600 / wall_s,
        "training_s": training_s,
        "trials_per_hour_training": finished * 3600 / training_s if training_s else None,
        "claims": logged["claims"],
        "pack_used": max(logged["claims"], default=0),
        "metric": status["metric"],
        "best_value": board[0]["value"] if board else None,
    }


def worker_log(log: Path) -> Results:
    """From the worker's JSON log: how many trials each claim took, and the seconds from
    the first claim to the last trial's end (the rate without the worker's start)."""
    claims, times = [], []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line) if line.startswith("{") else {}
        except json.JSONDecodeError:  # a line cut short by a stop
            continue
        if "claimed trial" in entry.get("message", "") and "trials" in entry:
            claims.append(len(entry["trials"]))
        elif entry.get("state") not in ("complete", "pruned"):
            continue
        times.append(datetime.fromisoformat(entry["time"]).timestamp())
    return {"claims": claims, "training_s": max(times) - min(times) if times else None}


# --- the run ---------------------------------------------------------------------------

STAGES = [
    Stage("cuda-tests", 0.25, cuda_tests),  # compiled steps in them compile for a minute
    Stage("throughput", 0.45, throughput),
    Stage("worker", 0.2, worker),
]


def device_name(dry_run: bool) -> str:
    if dry_run or not torch.cuda.is_available():
        return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return torch.cuda.get_device_name(0)


def run_stage(stage: Stage, context: Context, budget_s: float) -> Results:
    """One stage as gpu.json records it: status ok, cut, failed (with the error) or
    not_run, its figures, and its seconds."""
    if budget_s < MIN_STAGE_S:
        return {"status": "not_run", "reason": f"only {budget_s:.0f} s of --limit-s left"}
    print(f"{stage.name}: started, {budget_s:.0f} s at most", flush=True)
    context.log(stage.name).write_text("")  # not an earlier run's
    started = time.monotonic()
    try:
        results = stage.run(context, budget_s)
        entry = {"status": "cut" if results.pop("cut", False) else "ok", **results}
    except Exception as exc:
        results = exc.results if isinstance(exc, StageFailed) else {}
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", **results}
    entry |= {"seconds": time.monotonic() - started, "budget_s": budget_s}
    print(f"{stage.name}: {entry['status']} after {entry['seconds']:.0f} s", flush=True)
    return entry


def run_all(args: argparse.Namespace, out: Path) -> Results:
    """Every stage in turn within --limit-s, gpu.json rewritten after each."""
    started = float(os.environ.get("HPSEARCH_GPU_STARTED", time.time()))  # set by gpu.sh
    deadline = started + args.limit_s
    device = device_name(args.dry_run)
    command = "bash bench/gpu.sh" + (" --dry-run" if args.dry_run else "")
    command += f" --limit-s {args.limit_s:g}"
    run: Results = {
        "device": device,
        "dry_run": args.dry_run,
        "limit_s": args.limit_s,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,  # with its build (+cu130), unlike the distribution's
        "versions": {name: package_version(name) for name in VERSIONS},
        "environment": environment(command, VERSIONS, None if args.dry_run else device),
        "stages": {stage.name: {"status": "pending"} for stage in STAGES},
    }
    save(run, out)
    with tempfile.TemporaryDirectory(prefix="hpsearch-gpu-") as work:
        context = Context(out, Path(work), args.dry_run)
        for i, stage in enumerate(STAGES):
            later = sum(s.share for s in STAGES[i + 1 :]) * args.limit_s
            budget_s = deadline - time.time() - MARGIN_S - later
            run["stages"][stage.name] = run_stage(stage, context, budget_s)
            save(run, out)
    run["goal"] = judge(run)
    run["not_run"] = [n for n, s in run["stages"].items() if s["status"] == "not_run"]
    run["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    run["seconds"] = time.time() - started
    save(run, out)
    return run


def save(run: Results, out: Path) -> None:
    (out / "gpu.json").write_text(json.dumps(run, indent=2, default=str))


# --- the report ------------------------------------------------------------------------


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}x"


def met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value]


def goal_table(goal: Results | None) -> str:
    if goal is None:
        return "No throughput figures: the goal could not be checked."
    return markdown_table(
        [f"goal, {goal['workload']}", "measured", "goal", "met"],
        [
            [
                f"{goal['best_fused'] or 'best fused'} / (a) baseline, trials per hour",
                times(goal["fused_vs_baseline"]),
                f"≥ {GOAL_FUSED_VS_BASELINE:g}x",
                met(goal["fused_vs_baseline_met"]),
            ],
            [
                f"{goal['best_fused'] or 'best fused'} / FLOP floor, seconds",
                times(goal["best_fused_floor_ratio"]),
                f"≤ {GOAL_FLOOR_RATIO:g}x",
                met(goal["floor_met"]),
            ],
        ],
    )


def cuda_text(stage: Results) -> str:
    files = ", ".join(f"`{f}`" for f in stage.get("files", [])) or "no module"
    if "collected" in stage:
        return f"Collected only (no device): {stage['collected']} tests in {files}."
    if "passed" not in stage:
        return f"No figures ({stage['status']}): {stage.get('error', stage.get('reason', ''))}"
    text = (
        f"`python -m pytest -m cuda` on {files}: {stage['passed']} passed, "
        f"{stage['failed']} failed, {stage['skipped']} skipped."
    )
    return text + "".join(f"\n- failed: `{name}`" for name in stage["failures"])


def worker_text(stage: Results) -> str:
    if "progress" not in stage:
        return f"No figures ({stage['status']}): {stage.get('error', stage.get('reason', ''))}"
    p = stage["progress"]
    best = "-" if stage["best_value"] is None else f"{stage['best_value']:.4f}"
    training = stage["trials_per_hour_training"]
    rate = "-" if training is None else f"{training:,.0f}"
    return (
        f"`examples/{stage['example']}` with a budget of {stage['budget']} trials, submitted "
        f"into a new SQLite database, then `{stage['command']}`: {stage['finished']} trials "
        f"finished ({p['complete']} complete, {p['pruned']} pruned, {p['failed']} failed) in "
        f"{stage['wall_s']:.0f} s of wall time with the worker's start = "
        f"{stage['trials_per_hour']:,.0f} trials per hour ({rate} from the first claim to "
        "the last trial's end); claims of "
        f"{', '.join(map(str, stage['claims'])) or 'none'} trials (largest {stage['pack_used']}"
        f", --pack {stage['pack']}); best {stage['metric']} {best}."
    )


def section(run: Results) -> str:
    """The Markdown section "## GPU check" from a run's results."""
    stages = run["stages"]
    states = ", ".join(
        f"{name} {s['status']}" + (f" ({s['seconds']:.0f} s)" if "seconds" in s else "")
        for name, s in stages.items()
    )
    workloads = stages["throughput"].get("workloads", {})
    parts = [
        f"{SECTION}\n",
        "`bash bench/gpu.sh` (`bench/gpu.py`): the CUDA tests, throughput and a real worker "
        "on one GPU in one command under a time limit, each stage with its share of it "
        "(see the script's docstring).\n",
        run["environment"],
        f"- Device: {run['device']}, torch {run['torch']}; run time "
        f"{run.get('seconds', 0):.0f} s of {run['limit_s']:g} s; stages: {states}\n",
        "### Goal\n",
        goal_table(run.get("goal")) + "\n",
        "### CUDA tests\n",
        cuda_text(stages["cuda-tests"]) + "\n",
        "### Throughput\n",
        "\n".join(render(record) for record in workloads.values()) or "No figures.\n",
        "### A real worker\n",
        worker_text(stages["worker"]) + "\n",
    ]
    return "\n".join(parts)


def summary(run: Results) -> str:
    """A few lines: the device, each stage's headline figure, the goal."""
    stages = run["stages"]
    lines = [
        f"GPU check on {run['device']} (torch {run['torch']}): {run.get('seconds', 0):.0f} s "
        f"of {run['limit_s']:g}"
    ]
    for name, stage in stages.items():
        lines.append(f"  {name}: {stage['status']}, {headline(name, stage)}")
    goal = run.get("goal")
    if goal:
        where = "dry run on the CPU, not judged" if run["dry_run"] else goal["workload"]
        lines.append(
            f"  goal ({where}): {goal['best_fused']} / baseline {times(goal['fused_vs_baseline'])} "
            f"(>= {GOAL_FUSED_VS_BASELINE:g}x: {verdict(goal['fused_vs_baseline_met'])}), "
            f"/ floor {times(goal['best_fused_floor_ratio'])} "
            f"(<= {GOAL_FLOOR_RATIO:g}x: {verdict(goal['floor_met'])})"
        )
    return "\n".join(lines)


def verdict(value: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "-"}[value]


def headline(name: str, stage: Results) -> str:
    """One stage's figure for the summary."""
    if stage["status"] in ("failed", "not_run"):
        why = stage.get("error") or stage.get("reason") or "no reason given"
        return why.splitlines()[0][:200]
    if name == "cuda-tests":
        return cuda_headline(stage)
    if name == "throughput":
        return throughput_headline(stage)
    if "finished" not in stage:
        return "no figures"
    best = "-" if stage["best_value"] is None else f"{stage['best_value']:.4g}"
    return (
        f"{stage['finished']} trials in {stage['wall_s']:.0f} s = {stage['trials_per_hour']:,.0f}"
        f" trials/h, pack {stage['pack_used']}, best {stage['metric']} {best}"
    )


def cuda_headline(stage: Results) -> str:
    if "collected" in stage:
        return f"{stage['collected']} collected (dry run: not run)"
    if "passed" not in stage:
        return "no figures"
    failures = f" ({', '.join(stage['failures'])})" if stage["failures"] else ""
    return (
        f"{stage['passed']} passed, {stage['failed']} failed{failures}, {stage['skipped']} skipped"
    )


def throughput_headline(stage: Results) -> str:
    """Per workload: the fastest fused method's trials per hour, against (a) and the floor."""
    figures = []
    for workload, record in stage["workloads"].items():
        check = goal_check({workload: record}, judged=False) or {}
        best = check.get("best_fused")
        text = workload
        if best:
            rate = record["methods"][best]["trials_per_hour"]
            text += f": {best} {rate:,.0f} trials/h"
        if check.get("fused_vs_baseline"):
            text += f" = {times(check['fused_vs_baseline'])} (a)"
        if check.get("best_fused_floor_ratio"):
            text += f", {times(check['best_fused_floor_ratio'])} the floor"
        figures.append(text)
    return "; ".join(figures) or "no figures"


# --- the command -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results folder (default bench/gpu-results)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, on the CPU")
    parser.add_argument("--limit-s", type=float, default=480.0, help="stop before this")
    parser.add_argument("--from-json", type=Path, help="only rewrite BENCHMARKS.md's section")
    return parser.parse_args(argv)


def judge(run: Results) -> Results | None:
    """The goal's check of a run's throughput figures (a dry run's are not judged)."""
    workloads = run["stages"].get("throughput", {}).get("workloads", {})
    return goal_check(workloads, judged=not run["dry_run"])


def from_json(path: Path) -> str:
    """BENCHMARKS.md's section from a gpu.json that came back from a GPU node, the goal
    checked again by today's rule; its summary."""
    run = json.loads(path.read_text())
    run["goal"] = judge(run)
    write_section(SECTION, section(run))
    return summary(run)


def main() -> None:
    args = parse_args()
    if args.from_json is not None:
        print(from_json(args.from_json))
        return
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device here: bench/gpu.sh --dry-run runs the stages on the CPU")
    out = args.out or DEFAULT_OUT
    if args.dry_run and args.out is None:  # never over a real run's results
        out = Path(tempfile.mkdtemp(prefix="hpsearch-gpu-dry-"))
    out.mkdir(parents=True, exist_ok=True)
    run = run_all(args, out)
    text = section(run)
    (out / "gpu-section.md").write_text(text)
    written = [out / "gpu.json", out / "gpu-section.md"]
    if not run["dry_run"]:
        write_section(SECTION, text)
        written.append(REPO / "BENCHMARKS.md")
    print("results: " + ", ".join(map(str, written)))
    print(summary(run))


if __name__ == "__main__":
    main()
