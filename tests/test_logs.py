"""A worker's log: what an operator needs, on stderr, as text or as JSON lines."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from hpsearch.logs import JsonFormatter, LogSettings
from tests.fleet import Workers, crash_spec, load_trials, submit


@pytest.mark.timeout(300)
@pytest.mark.system
def test_a_worker_logs_its_trials_as_json_lines(tmp_path: Path, workers: Workers) -> None:
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    submit(url, tmp_path, crash_spec("logged", 2, max_epochs=3))
    worker = workers.start(url, "--idle-exit", "1", "--log-format", "json")
    assert worker.wait(timeout=240) == 0, workers.report()

    entries = [json.loads(line) for line in workers.stderr(worker).splitlines()]
    messages = [entry["message"] for entry in entries]
    assert messages[0].startswith("worker 1 started on cpu"), messages
    assert all(entry["pid"] == worker.pid and entry["level"] == "info" for entry in entries)
    claimed = [e["trials"] for e in entries if e["message"].startswith("study logged: claimed")]
    assert claimed == [[0], [1]], messages
    ended = {e["trial"]: e for e in entries if e.get("state") == "complete"}
    trials = load_trials(url, "logged")
    assert {n: e["value"] for n, e in ended.items()} == {t.number: t.value for t in trials}
    assert all(e["study"] == "logged" and e["epochs"] == 3 for e in ended.values())
    assert messages[-1] == "exiting: nothing to claim for 1 s", messages


@pytest.mark.timeout(300)
@pytest.mark.system
def test_log_level_warning_leaves_only_what_went_wrong(tmp_path: Path, workers: Workers) -> None:
    url = f"sqlite:///{tmp_path / 'quiet.db'}"
    submit(url, tmp_path, crash_spec("quiet", 1, max_epochs=2))
    worker = workers.start(url, "--idle-exit", "1", "--log-level", "WARNING")
    assert worker.wait(timeout=240) == 0, workers.report()
    assert workers.stderr(worker) == ""
    assert [t.state.name for t in load_trials(url, "quiet")] == ["COMPLETE"]


def test_json_lines_carry_the_extra_fields_and_the_exception() -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        record = logging.LogRecord("hpsearch.x", logging.ERROR, "f.py", 1, "trial %d", (3,), None)
        record.exc_info = sys.exc_info()
    record.study = "s"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "trial 3" and entry["level"] == "error"
    assert entry["study"] == "s" and entry["logger"] == "hpsearch.x"
    assert "ValueError: bad value" in entry["exception"]


def test_settings_replace_the_handler_instead_of_adding_one() -> None:
    logger = logging.getLogger("hpsearch")
    before = (list(logger.handlers), logger.level, logger.propagate)
    try:
        LogSettings("debug", "json").apply()
        LogSettings("error").apply()
        assert len(logger.handlers) == 1 and logger.level == logging.ERROR
        assert not isinstance(logger.handlers[0].formatter, JsonFormatter)
    finally:
        logger.handlers[:], logger.level, logger.propagate = before
