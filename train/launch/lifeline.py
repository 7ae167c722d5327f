"""Workers never outlive their launcher.

torchrun starts every worker in a session of its own, so killing the launcher's process
group (Ctrl-C in some terminals, `kill -9 -- -PGID`, a scheduler killing the step) would
leave the workers training on, or waiting minutes on a dead rendezvous. The launchers export

    TRAIN_LIFELINE="<host>:<pid> <host>:<pid>"   launchers/lib.sh (the launcher's shell), then
                                                 launchers/node.sh (this node's task) append theirs

and the first import of the `train` package in a worker (train/__init__.py, before torch
loads) calls watch_launchers(), which
- sets PR_SET_PDEATHSIG=SIGKILL (prctl via ctypes, Linux): the kernel kills the worker as
  soon as the thread that started it dies; torchrun starts its workers from its main thread,
  so that is torchrun's death;
- starts a daemon thread that checks every POLL_S that each launcher process of this host
  is still the same process (its /proc start time); when one is gone it prints one line and
  kills the worker (SIGKILL: the launcher is gone, nobody would wait for a save). This also
  covers the moments before prctl and a launcher killed while torchrun lives on.
Stdlib only: it runs before anything else is imported.
"""

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

POLL_S = 1.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (/proc/<pid>/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def local_launchers(lifeline: str, host: str) -> list[int]:
    """The pids of TRAIN_LIFELINE that live on this host."""
    entries = (entry.rpartition(":") for entry in lifeline.split())
    return [int(pid) for entry_host, _, pid in entries if entry_host == host and pid.isdigit()]


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (AttributeError, OSError):  # not Linux
        return False


def die(reason: str) -> None:
    print(f"[worker pid {os.getpid()}] {reason}: stopping (train/launch/lifeline.py)", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_launchers(lifeline: str, poll_s: float = POLL_S) -> threading.Thread | None:
    pids = local_launchers(lifeline, socket.gethostname())
    if not pids:
        return None
    set_parent_death_signal()
    starts = {pid: process_start(pid) for pid in pids}
    for pid, start in starts.items():
        if start is None:  # died before this process got here
            die(f"launcher pid {pid} is gone")

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            for pid, start in starts.items():
                if process_start(pid) != start:
                    die(f"launcher pid {pid} is gone")

    thread = threading.Thread(target=watch, name="launcher-lifeline", daemon=True)
    thread.start()
    return thread
