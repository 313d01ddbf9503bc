"""The `hpsearch` command (and `python -m hpsearch`).

Ctrl-C is handled before anything else is imported: whenever it comes (while torch loads,
while workers start, while a table prints), the command ends with one line and exit code
130, never a traceback. The handler is installed even when the process started with SIGINT
ignored, as a shell does for background jobs.
"""

from __future__ import annotations

import sys

from hpsearch import signals
from hpsearch.errors import Interrupted


def main() -> None:
    signals.install()
    try:
        from hpsearch.cli import app

        app()
    except Interrupted as stop:
        end(stop.exit_code)
    except SystemExit as ended:
        if ended.code not in (0, None) or not signals.received:
            raise
        end(Interrupted(signals.received[0]).exit_code)  # its exception was swallowed


def end(code: int) -> None:
    print("interrupted", file=sys.stderr)
    raise SystemExit(code) from None


if __name__ == "__main__":
    main()
