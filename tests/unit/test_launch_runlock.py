"""python -m pytest tests/unit/test_launch_runlock.py  (one job per run directory: train/launch/runlock.py)"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from train.launch.runlock import LOCK_FILE, STALE_AFTER_S, RunLocked, acquire, read_holder, release


@pytest.fixture
def live_pid():
    """A live process on this host that is not us: another job's launcher."""
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_holder(run_dir, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"slurm_job_id": None, "host": socket.gethostname(), "pid": 1, "pid_start": None,
              "started": "2026-01-01T00:00:00", **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def test_the_lock_names_its_holder_and_a_second_job_is_refused(tmp_path, live_pid):
    run_dir = tmp_path / "run"
    assert acquire(run_dir, live_pid, {"SLURM_JOB_ID": "4242"}) == []
    holder = read_holder(run_dir / LOCK_FILE)
    assert (holder.slurm_job_id, holder.host, holder.pid) == ("4242", socket.gethostname(), live_pid)
    with pytest.raises(RunLocked) as error:
        acquire(run_dir, os.getpid(), {"SLURM_JOB_ID": "4343"})
    assert f"SLURM job 4242 on {socket.gethostname()} (pid {live_pid}" in str(error.value)
    assert acquire(run_dir, live_pid, {"SLURM_JOB_ID": "4242"}) == []  # the holder's own worker: ours


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    pid = dead_pid()
    write_holder(run_dir, pid=pid)
    warnings = acquire(run_dir, os.getpid(), {})
    assert len(warnings) == 1 and f"pid {pid} is gone" in warnings[0]
    assert read_holder(run_dir / LOCK_FILE).pid == os.getpid()
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing set aside is left


def test_a_reused_pid_is_not_the_holder(tmp_path, live_pid):
    run_dir = tmp_path / "run"
    write_holder(run_dir, pid=live_pid, pid_start="1")  # the live process started at another time
    assert "is another process now" in acquire(run_dir, os.getpid(), {})[0]


def test_the_same_slurm_job_requeued_takes_it_without_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    write_holder(run_dir, host="other-node", pid=77, slurm_job_id="4242")
    assert acquire(run_dir, os.getpid(), {"SLURM_JOB_ID": "4242"}) == []
    assert read_holder(run_dir / LOCK_FILE).pid == os.getpid()


def test_a_holder_on_another_host_is_alive_until_its_heartbeat_is_old(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no squeue here
    run_dir = tmp_path / "run"
    write_holder(run_dir, host="other-node", pid=77)
    with pytest.raises(RunLocked, match="in use by a job on other-node"):
        acquire(run_dir, os.getpid(), {})
    old = time.time() - STALE_AFTER_S - 5
    os.utime(run_dir / LOCK_FILE, (old, old))
    assert "no heartbeat for" in acquire(run_dir, os.getpid(), {})[0]


def test_release_removes_only_our_own_lock(tmp_path, live_pid):
    run_dir = tmp_path / "run"
    acquire(run_dir, live_pid, {})
    assert not release(run_dir, os.getpid()) and (run_dir / LOCK_FILE).exists()
    assert release(run_dir, live_pid) and not (run_dir / LOCK_FILE).exists()


def test_the_command_line_refuses_with_one_error_line_and_exit_2(tmp_path, live_pid):
    run_dir = tmp_path / "run"
    acquire(run_dir, live_pid, {})
    result = subprocess.run([sys.executable, "-m", "train.launch.runlock", "acquire", str(run_dir), "--pid",
                             str(os.getpid())], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and f"pid {live_pid}" in result.stderr
