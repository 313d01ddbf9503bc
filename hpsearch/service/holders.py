"""Which process holds a running trial, and whether that process is certainly dead.

A claimed trial records its holder: host, boot, PID namespace, PID and the process's start
time. Another process on the same machine and in the same PID namespace can then tell for
sure that the holder died (no process with that PID, or one started at another time: the
PID was reused), and free its trials at once instead of waiting for their heartbeats to go
stale. Anywhere else (another host, another container, no /proc) nothing is certain, and
only heartbeats decide.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path

HOLDER_ATTR = "hpsearch:holder"  # the trial system attribute that names its holder
PROC = Path("/proc")


@dataclass(frozen=True)
class Holder:
    host: str
    boot: str  # the kernel's boot id: a PID means nothing across reboots or machines
    pid_namespace: str  # containers on one host may reuse each other's PIDs
    pid: int
    started: str  # the process's start time in clock ticks since boot, against PID reuse

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"

    def as_attr(self) -> str:
        return "/".join((self.host, self.boot, self.pid_namespace, str(self.pid), self.started))

    @classmethod
    def from_attr(cls, value: object) -> Holder | None:
        """The holder a trial recorded; None for one written otherwise (or by hand)."""
        parts = value.split("/") if isinstance(value, str) else []
        if len(parts) != 5 or not parts[3].isdigit():
            return None
        host, boot, namespace, pid, started = parts
        return cls(host, boot, namespace, int(pid), started)

    def certainly_dead(self) -> bool:
        """True only when this process can prove the holder is gone: same machine since
        its boot, same PID namespace, and no live process of that PID and start time (a
        zombie has exited too). A process it may not look at counts as alive."""
        me = this_process()
        if me is None or (self.boot, self.pid_namespace) != (me.boot, me.pid_namespace):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        found = _stat(self.pid)
        return found is not None and (found[0] in "ZX" or found[1] != self.started)


@functools.cache
def this_process() -> Holder | None:
    """This process as a holder; None where /proc cannot say (not Linux)."""
    try:
        boot = (PROC / "sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink(PROC / "self/ns/pid")
    except OSError:
        return None
    found = _stat(os.getpid())
    if found is None:
        return None
    return Holder(socket.gethostname(), boot, namespace, os.getpid(), found[1])


def _stat(pid: int) -> tuple[str, str] | None:
    """The state and the start time (fields 3 and 22 of /proc/PID/stat, after the command
    name, which may hold spaces and parentheses); None when it cannot be read."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], fields[19]
