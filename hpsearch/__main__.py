"""The `hpsearch` command (and `python -m hpsearch`).

Ctrl-C is handled before anything else is imported: whenever it comes (while torch loads,
while workers start, while a table prints), the command ends with one line and exit code
130, never a traceback. The handler is installed even when the process started with SIGINT
ignored, as a shell does for background jobs.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from hpsearch.errors import Interrupted


def interrupt(signum: int, frame: FrameType | None) -> None:
    """Raise Interrupted where the main thread is: the command decides how to end."""
    raise Interrupted(signum)


def main() -> None:
    signal.signal(signal.SIGINT, interrupt)
    try:
        from hpsearch.cli import app

        app()
    except Interrupted as stop:
        print("interrupted", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None


if __name__ == "__main__":
    main()
