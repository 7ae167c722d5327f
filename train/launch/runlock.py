"""One job per run directory: <run dir>/run.lock names the job that holds it.

    python -m train.launch.runlock acquire RUN_DIR --pid PID   (launchers/lib.sh, before anything is written)
    python -m train.launch.runlock release RUN_DIR --pid PID   (the launcher's EXIT trap)

The lock file (JSON): {"slurm_job_id": "4242" | null, "host": "node01", "pid": 1234,
"pid_start": "<field 22 of /proc/<pid>/stat>" | null, "started": "2026-12-05T00:01:02"}.
Its holder is the launcher (lib.sh; node 0 of the job), or rank 0 of a job started by
torchrun without a launcher; rank 0 refreshes the file's mtime every HEARTBEAT_S (heartbeat).

Why O_EXCL and not fcntl/flock: creating a file with O_CREAT|O_EXCL is atomic on local file
systems, NFSv3+ , Lustre and GPFS alike, and the file survives to say who holds the run;
fcntl locks need the NFS lock manager or Lustre's `flock` mount option (else ENOSYS or a
lock local to one client), and a lock held by a bash launcher would have to live in an
inherited descriptor. The cost of O_EXCL: a holder killed with -9 leaves its file behind,
so a second job decides whether the holder is dead:

- same SLURM job id as ours (a requeued job): ours, taken without a word;
- holder on this host: dead when its pid is gone or now belongs to another process (start time);
- holder a SLURM job and `squeue` exists: dead when squeue no longer lists it running
  (the previous job of a --chain, or a job killed at its time limit);
- otherwise (another host, no squeue): dead when the heartbeat is older than STALE_AFTER_S.

A dead holder's lock is taken over with one warning: the file is renamed away (one rename
wins a race between two newcomers), checked to still be the holder judged dead, removed,
and created again with O_EXCL. A live holder: one `error:` line naming it, exit 2.
Stdlib only.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from train.launch.lifeline import process_start

LOCK_FILE = "run.lock"
HEARTBEAT_S = 60  # rank 0 touches the lock file this often
STALE_AFTER_S = 600  # a holder we cannot ask (other host, no squeue) is dead after this much silence
EXIT_USAGE = 2


class RunLocked(RuntimeError):
    """The run directory is held by a live job; the message names it."""


@dataclass(frozen=True)
class Holder:
    slurm_job_id: str | None
    host: str
    pid: int
    pid_start: str | None  # a pid reused by another process has another start time
    started: str

    def describe(self) -> str:
        job = f"SLURM job {self.slurm_job_id}" if self.slurm_job_id else "a job"
        return f"{job} on {self.host} (pid {self.pid}, since {self.started})"


def this_holder(pid: int, env: dict[str, str]) -> Holder:
    return Holder(env.get("SLURM_JOB_ID") or None, socket.gethostname(), pid, process_start(pid),
                  time.strftime("%Y-%m-%dT%H:%M:%S"))


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def slurm_job_running(job_id: str) -> bool | None:
    """True/False from squeue; None when there is no squeue or it fails."""
    if shutil.which("squeue") is None:
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:  # an unknown (long finished) job id: squeue exits 1
        return False if "Invalid job id" in result.stderr else None
    return result.stdout.strip() in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED")


def death_reason(holder: Holder, lock_age_s: float) -> str | None:
    """Why the holder is dead, or None while it may be alive (module docstring)."""
    if holder.host == socket.gethostname():
        start = process_start(holder.pid)
        if start is None:
            return f"pid {holder.pid} is gone"
        if holder.pid_start is not None and start != holder.pid_start:
            return f"pid {holder.pid} is another process now"
        return None
    if holder.slurm_job_id:
        running = slurm_job_running(holder.slurm_job_id)
        if running is not None:
            return None if running else f"SLURM job {holder.slurm_job_id} is no longer running"
    if lock_age_s > STALE_AFTER_S:
        return f"no heartbeat for {lock_age_s:.0f} s (over {STALE_AFTER_S} s)"
    return None


def create_lock(path: Path, holder: Holder) -> bool:
    """O_EXCL: True when this call created the file."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(holder)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(run_dir: Path, pid: int, env: dict[str, str]) -> list[str]:
    """Takes <run_dir>/run.lock for `pid`; returns warnings (a dead holder taken over).
    Raises RunLocked while another live job holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path, me, warnings = run_dir / LOCK_FILE, this_holder(pid, env), []
    for _ in range(3):  # a takeover, then O_EXCL again; a newcomer may win in between
        if create_lock(path, me):
            return warnings
        holder = read_holder(path)
        age_s = time.time() - path.stat().st_mtime if path.exists() else 0.0
        if holder is None:  # being written right now, or garbage
            reason = f"unreadable lock file, {age_s:.0f} s old" if age_s > 10 else None
            if reason is None:
                raise RunLocked(f"{run_dir} is being taken by another job just now ({path})")
        elif (holder.host, holder.pid) == (me.host, me.pid):
            return warnings  # ours already (the launcher took it; rank 0 is its child)
        elif holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
            reason = None  # the same SLURM job, requeued: ours
        else:
            reason = death_reason(holder, age_s)
            if reason is None:
                raise RunLocked(f"{run_dir} is in use by {holder.describe()}; lock file {path} "
                                "(one job per run directory: wait for it, or change the run name)")
        if take_over(path, holder, pid) and reason:
            warnings.append(f"took over the lock of {run_dir} from {holder.describe() if holder else 'nobody'}: "
                            f"{reason}")
    raise RunLocked(f"{run_dir}: could not take {path} (other jobs keep taking it)")


def take_over(path: Path, holder: Holder | None, pid: int) -> bool:
    """Moves the dead holder's file away; False when another newcomer got there first."""
    aside = path.with_name(f"{LOCK_FILE}.stale.{socket.gethostname()}.{pid}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if read_holder(aside) != holder:  # a newcomer's fresh lock: put it back if nobody else did
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def release(run_dir: Path, pid: int) -> bool:
    """Removes the lock if `pid` on this host holds it."""
    path = Path(run_dir) / LOCK_FILE
    holder = read_holder(path)
    if holder is None or (holder.host, holder.pid) != (socket.gethostname(), pid):
        return False
    path.unlink(missing_ok=True)
    return True


def start_heartbeat(run_dir: Path, interval_s: float = HEARTBEAT_S) -> threading.Thread:
    """Rank 0: refreshes the lock file's mtime while the job runs (a daemon thread)."""
    path = Path(run_dir) / LOCK_FILE

    def beat() -> None:
        while True:
            try:
                os.utime(path)
            except OSError:  # released, or the file system hiccupped: try again next time
                pass
            time.sleep(interval_s)

    thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
    thread.start()
    return thread


def hold_in_worker(run_dir: Path, env: dict[str, str]) -> list[str]:
    """Rank 0 of the job: the launcher's lock (RUN_LOCK_PID) gets a heartbeat; started without a
    launcher (torchrun directly), rank 0 takes the lock itself and releases it at exit."""
    import atexit

    warnings = []
    if not env.get("RUN_LOCK_PID"):
        warnings = acquire(run_dir, os.getpid(), env)
        atexit.register(release, run_dir, os.getpid())
    start_heartbeat(run_dir)
    return warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.launch.runlock", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["acquire", "release"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pid", type=int, required=True, help="the holding process (the launcher's $$)")
    args = parser.parse_args(argv)
    if args.action == "release":
        release(args.run_dir, args.pid)
        return 0
    try:
        warnings = acquire(args.run_dir, args.pid, dict(os.environ))
    except RunLocked as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
