"""The `hpsearch` command (and `python -m hpsearch`).

Ctrl-C is handled before anything else is imported: whenever it comes (while torch loads,
while workers start, while a table prints), the command ends with one line and exit code
130, never a traceback. The handler is installed even when the process started with SIGINT
ignored, as a shell does for background jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn

from hpsearch import signals
from hpsearch.errors import Interrupted


def main() -> NoReturn:
    signals.install()
    try:
        from hpsearch.cli.commands import app

        app()
        code: object = 0
    except Interrupted as stop:
        code = _interrupted(stop.exit_code)
    except SystemExit as ended:
        code = ended.code
        if code in (0, None) and signals.received:  # its exception was swallowed
            code = _interrupted(Interrupted(signals.received[0]).exit_code)
    leave(code)


def _interrupted(code: int) -> int:
    print("interrupted", file=sys.stderr)
    return code


def leave(code: object) -> NoReturn:
    """End the process with `code` once what it wrote is flushed, skipping the interpreter's
    teardown: once torch is loaded, finalising its modules takes a second, and nothing is
    left to clean up (every transaction is committed, every worker process joined)."""
    if isinstance(code, str):  # SystemExit's message form
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`) or stream
            stream.flush()
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
