"""What a worker tells its operator: Python's `logging`, to stderr, as text or JSON lines.

Every hpsearch module logs under the `hpsearch` logger; a worker process sets it up once
with `LogSettings.apply`. The JSON format gives log collectors one object per line with the
fields a query needs (study, trial, state, value, ...) passed as `extra`.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


@dataclass(frozen=True)
class LogSettings:
    """How a process logs; picklable, so worker processes started by spawn get the same."""

    level: str = "info"
    format: LogFormat = "text"

    def apply(self) -> None:
        """Send the `hpsearch` logger's records at `level` and above to stderr, replacing
        what an earlier call set up."""
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            JsonFormatter() if self.format == "json" else logging.Formatter(TEXT_FORMAT)
        )
        logger = logging.getLogger("hpsearch")
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(self.level.upper())
        logger.propagate = False
        quiet_optuna()


def quiet_optuna() -> None:
    """Optuna's own INFO lines (a study created, each trial's end) repeat what hpsearch
    shows and logs: keep its warnings only."""
    import optuna  # here: the command line's --help must not load it

    optuna.logging.set_verbosity(optuna.logging.WARNING)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, host, pid, message,
    the `extra` fields, and the exception's text if any."""

    host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "host": self.host,
            "pid": record.process,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
