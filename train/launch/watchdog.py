"""Hangs are named: a heartbeat per rank and a watchdog thread on every rank.

A rank that stops (SIGSTOP, a frozen host, a process stuck holding the GIL) leaves the other
ranks waiting in their next collective. Without help they wait for the process group's timeout
and die with a C++ traceback that names no one. So every rank runs one daemon thread
(HangWatchdog, started by the trainer at its loop) that

- every beat_s rewrites RUN_DIR/logs/heartbeats/rank<R>.json (atomically, tmp + rename):

      {"job": "<RUN_DATETIME>", "rank": 1, "host": "node02", "pid": 4242, "pid_start": "<ticks>",
       "beat": <count>, "time": <unix s>, "step": <last finished iteration>, "step_time": <unix s>}

- watches the loop's progress (progress(iteration) after each step): when no step finished for
  limit_s = timeout_s - 6 beats (parallel.timeout_s, DIST_TIMEOUT_S), the job hangs. Then each
  live rank writes every thread's Python stack to RUN_DIR/logs/stacks_<datetime>_rank<R>.txt
  (faulthandler), reads every heartbeat twice, 2.5 beats apart (beating meanwhile), and calls a
  rank whose beat count did not move stopped: counts, not clocks, since hosts' clocks differ.
  The lowest live rank prints one line naming the stopped rank(s) (rank, host, pid, last step,
  seconds since its heartbeat); every live rank kills stopped ranks on its own host (a stopped
  process ignores torchrun's SIGTERM for its 30 s grace) and exits with EXIT_HANG. The job ends
  about 2.5 beats before timeout_s after the last step; the process group's own timeout
  (timeout_s + backstop_seconds(), train/launch/job.py) is the backstop.

`kill -USR1 <worker pid>` (or to the launcher: lib.sh and node.sh forward it) appends every thread's
stack of a live worker to the same stacks file (dump_stacks_on_signal, at job start); SIGUSR2
and SIGTERM are the trainer's save-and-stop signals.
Stdlib only (torch only for the NCCL flight recorder, imported when a hang happens on CUDA).
"""

import atexit
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from train.launch.lifeline import process_start
from train.launch.torchrun import write_error_record

EXIT_HANG = 5  # exit code of a job ended by the watchdog (2 usage, 3 non-finite, 4 failed saves)
STACKS_SIGNAL = signal.SIGUSR1  # dump stacks by hand; USR2/TERM: the trainer's stop signals
_signal_stacks_file = None  # the file faulthandler writes to on STACKS_SIGNAL: open for the process's life


def beat_seconds(timeout_s: float) -> float:
    """Heartbeat period: a 30th of the timeout, 0.2-10 s (DIST_TIMEOUT_S=1800: every 10 s)."""
    return min(10.0, max(0.2, timeout_s / 30))


def backstop_seconds(timeout_s: float) -> float:
    """What the process group's timeout adds to timeout_s, so the watchdog speaks first."""
    return max(30.0, timeout_s / 10)


def stacks_path(logs_dir: Path, datetime: str, rank: int) -> Path:
    return Path(logs_dir) / f"stacks_{datetime}_rank{rank}.txt"


def dump_stacks_on_signal(logs_dir: Path, datetime: str, rank: int) -> Path:
    """kill -USR1 <worker pid>: every thread's Python stack appended to this rank's stacks file."""
    global _signal_stacks_file
    path = stacks_path(logs_dir, datetime, rank)
    _signal_stacks_file = open(path, "a")  # faulthandler writes from its C signal handler: it needs a file now
    faulthandler.register(STACKS_SIGNAL, file=_signal_stacks_file, all_threads=True, chain=False)
    atexit.register(remove_if_empty, path)  # a job that ends normally leaves no empty stacks file
    return path


def remove_if_empty(path: Path) -> None:
    try:
        if path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass


def flight_recorder_env(env: dict, logs_dir: Path | None) -> dict[str, str]:
    """NCCL's flight recorder (CUDA jobs): the last collectives of each rank, dumped on a timeout
    (and by the watchdog) to logs/nccl_trace_rank_<R> (without a plan file: torch's default, /tmp);
    read with `python -m torch.distributed.flight_recorder.fr_trace`. Values the conf set win."""
    wanted = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    if logs_dir is not None:
        wanted["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = str(Path(logs_dir) / "nccl_trace_rank_")
    return {key: value for key, value in wanted.items() if key not in env}


def read_heartbeats(directory: Path, job: str, world_size: int) -> dict[int, dict]:
    """{rank: its heartbeat} of this job's ranks; a rank without one (or an older job's) is absent."""
    beats = {}
    for rank in range(world_size):
        try:
            record = json.loads((Path(directory) / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            continue
        if record.get("job") == job:
            beats[rank] = record
    return beats


def stopped_ranks(before: dict[int, dict], after: dict[int, dict], me: int, world_size: int) -> list[int]:
    """Ranks whose beat count did not move between two readings (or that never beat); not me."""
    return [rank for rank in range(world_size) if rank != me and
            (rank not in after or before.get(rank, {}).get("beat") == after[rank]["beat"])]


def describe_stopped(rank: int, record: dict | None, now: float) -> str:
    if record is None:
        return f"rank {rank} (no heartbeat of this job: it never reached the training loop)"
    return (f"rank {rank} (host {record['host']}, pid {record['pid']}; last heartbeat {now - record['time']:.0f} s "
            f"ago, at step {record['step']})")


class HangWatchdog:
    """One per rank; start() at the loop, progress(iteration) after each step, stop() after it."""

    def __init__(self, logs_dir: Path, job: str, rank: int, world_size: int, timeout_s: float, device: str = "cpu"):
        self.logs_dir, self.job, self.rank, self.world_size = Path(logs_dir), job, rank, world_size
        self.heartbeats = self.logs_dir / "heartbeats"
        self.timeout_s, self.device = timeout_s, device
        self.beat_s = beat_seconds(timeout_s)
        # naming the stopped rank takes up to 3.5 beats more, torchrun's exit a few seconds
        self.limit_s = max(timeout_s / 2, timeout_s - 6 * self.beat_s)
        self.beats, self.step, self.step_time = 0, 0, time.time()
        self.host, self.pid, self.pid_start = socket.gethostname(), os.getpid(), process_start(os.getpid())
        self.last_progress = time.monotonic()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, iteration: int) -> None:
        if self.world_size == 1:  # nobody waits on a single process; the process group has no timeout
            return
        self.heartbeats.mkdir(parents=True, exist_ok=True)
        self.progress(iteration)
        self.beat()
        self.thread = threading.Thread(target=self.watch, name="hang-watchdog", daemon=True)
        self.thread.start()

    def progress(self, iteration: int) -> None:
        self.step, self.step_time, self.last_progress = iteration, time.time(), time.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()

    def beat(self) -> None:
        self.beats += 1
        record = {"job": self.job, "rank": self.rank, "host": self.host, "pid": self.pid,
                  "pid_start": self.pid_start, "beat": self.beats, "time": time.time(),
                  "step": self.step, "step_time": self.step_time}
        path = self.heartbeats / f"rank{self.rank}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError as error:  # a full or flaky disk must not stop training; the others may call us stopped
            print(f"[rank {self.rank}] warning: heartbeat not written ({error})", file=sys.stderr, flush=True)

    def watch(self) -> None:
        while not self.stopping.wait(self.beat_s):
            self.beat()
            if time.monotonic() - self.last_progress > self.limit_s:
                self.on_hang()

    def wait_beating(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(self.beat_s, max(0.0, deadline - time.monotonic())))
            self.beat()

    def on_hang(self) -> None:
        """Dump, name the stopped rank(s), end this process (module docstring)."""
        waited_s = time.monotonic() - self.last_progress
        stacks = self.dump_stacks(waited_s)
        before = read_heartbeats(self.heartbeats, self.job, self.world_size)
        self.wait_beating(2.5 * self.beat_s)
        after = read_heartbeats(self.heartbeats, self.job, self.world_size)
        stopped = stopped_ranks(before, after, self.rank, self.world_size)
        live = [rank for rank in range(self.world_size) if rank not in stopped]
        if self.rank == min(live):
            message = f"error: {self.hang_message(stopped, after, waited_s, stacks)}"
            if not write_error_record(message, EXIT_HANG):  # under node.sh: printed last, by torchrun's wrapper
                print(message, file=sys.stderr, flush=True)
            with open(stacks, "a") as f:  # beside the stacks, for whoever reads the logs folder later
                f.write(message + "\n")
        self.kill_local(stopped, after)
        sys.stdout.flush()
        os._exit(EXIT_HANG)

    def hang_message(self, stopped: list[int], beats: dict[int, dict], waited_s: float, stacks: Path) -> str:
        now = time.time()
        where = f"Python stacks of the live ranks in {stacks.parent}/stacks_{self.job}_rank*.txt"
        if stopped:
            names = "; ".join(describe_stopped(rank, beats.get(rank), now) for rank in stopped)
            return (f"hang: {names} stopped responding; rank {self.rank} waited {waited_s:.0f} s after step "
                    f"{self.step} (DIST_TIMEOUT_S={self.timeout_s:g}); {where}")
        steps = ", ".join(f"rank {rank} step {record['step']}" for rank, record in sorted(beats.items()))
        return (f"hang: no step finished for {waited_s:.0f} s (DIST_TIMEOUT_S={self.timeout_s:g}) though every "
                f"rank's heartbeat is live (a rank stuck in Python code, or ranks in different collectives); "
                f"last steps: {steps}; {where}")

    def dump_stacks(self, waited_s: float) -> Path:
        path = stacks_path(self.logs_dir, self.job, self.rank)
        with open(path, "a") as f:
            f.write(f"# rank {self.rank} (host {self.host}, pid {self.pid}) at {time.ctime()}: "
                    f"no step finished for {waited_s:.0f} s after step {self.step}; every thread's stack:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        if self.device.startswith("cuda"):
            dump_flight_recorder(self.rank)
        return path

    def kill_local(self, stopped: list[int], beats: dict[int, dict]) -> None:
        """SIGKILL the stopped ranks of this host that are still the process that beat."""
        for rank in stopped:
            record = beats.get(rank)
            if not record or record["host"] != socket.gethostname() or record["pid_start"] is None:
                continue
            if process_start(record["pid"]) == record["pid_start"]:  # not a new process with a reused pid
                os.kill(record["pid"], signal.SIGKILL)


def dump_flight_recorder(rank: int) -> None:
    """NCCL's flight recorder of this rank to TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank> (CUDA only;
    NCCL would dump by itself only at its own timeout, after this process ended)."""
    prefix = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    if not prefix:
        return
    try:
        import torch

        trace = torch._C._distributed_c10d._dump_nccl_trace()
        Path(f"{prefix}{rank}").write_bytes(trace)
    except Exception as error:  # private API, absent without NCCL: the Python stacks are already written
        print(f"[rank {rank}] NCCL flight recorder not dumped ({error})", file=sys.stderr, flush=True)
