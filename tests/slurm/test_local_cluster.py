# Run (as root): pytest -m slurm tests/slurm/test_local_cluster.py -v   (~30 s)
"""The local SLURM cluster itself (tests/slurm/local-cluster.sh): the features the training stack
relies on: 2 nodes, one task per node, afterany chains, signals to the batch shell, requeue."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from slurm_helpers import (
    LOCAL_CLUSTER_SCRIPT,
    job_field,
    job_state,
    sbatch,
    squeue_ids,
    wait_for_file,
    wait_for_state,
)

UP_STATES = {"idle", "mix", "alloc"}


def write_script(workdir: Path, name: str, body: str) -> Path:
    path = workdir / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_usage_on_wrong_verb():
    r = subprocess.run([str(LOCAL_CLUSTER_SCRIPT), "bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "usage:" in r.stderr


@pytest.fixture(scope="module")
def usr2_job(local_cluster):
    """Submitted early: `--signal=B:USR2@50` with `--time=1` reaches the batch shell at the
    controller's first time-limit check, 0-30 s after the start (not tunable), so the wait
    overlaps the other tests. Checked by the last test."""
    workdir = Path(tempfile.mkdtemp(prefix="slurm-usr2-", dir="/tmp"))
    workdir.chmod(0o755)
    script = write_script(workdir, "usr2.sh", """
        #SBATCH --time=1
        #SBATCH --signal=B:USR2@50
        #SBATCH -o usr2-%j.out
        t0=$SECONDS
        trap 'echo "got USR2 after $((SECONDS - t0)) s"; exit 0' USR2
        while :; do sleep 0.2; done
    """)
    job = sbatch([str(script)], cwd=workdir)
    yield job, workdir
    subprocess.run(["scancel", str(job)], capture_output=True, timeout=30)  # if still running
    shutil.rmtree(workdir, ignore_errors=True)


def test_two_nodes_up(local_cluster, usr2_job):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t %c"], capture_output=True,
                         text=True, check=True).stdout
    nodes = {n: (state, int(cpus)) for n, state, cpus in (line.split() for line in set(out.splitlines()))}
    assert sorted(nodes) == ["node1", "node2"], out
    cpus = int(os.environ.get("LOCAL_SLURM_CPUS", "4"))
    for name, (state, ncpu) in nodes.items():
        # idle on an empty cluster; mix/alloc while jobs (ours: usr2_job) run
        assert state in UP_STATES, out
        assert ncpu == cpus, out
    if not squeue_ids():
        assert {s for s, _ in nodes.values()} == {"idle"}, out
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                            check=True).stdout
    for setting in ("JobRequeue              = 1", "MULTIPLE_SLURMD         = Yes",
                    "MinJobAge               = 3600 sec"):
        assert setting in config


def test_two_node_batch_one_task_per_node(slurm_workdir):
    script = write_script(slurm_workdir, "multi.sh", """
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --time=2
        #SBATCH -o multi-%j.out
        echo "NNODES=$SLURM_NNODES NODELIST=$SLURM_JOB_NODELIST NTASKS=$SLURM_NTASKS"
        srun bash -c 'echo "task $SLURM_PROCID on $SLURMD_NODENAME"'
    """)
    job = sbatch([str(script)], cwd=slurm_workdir)
    wait_for_state(job, {"COMPLETED"}, timeout_s=30)
    assert job_field(job, "ExitCode") == "0:0"
    lines = (slurm_workdir / f"multi-{job}.out").read_text().splitlines()
    assert "NNODES=2 NODELIST=node[1-2] NTASKS=2" in lines
    assert sorted(line for line in lines if line.startswith("task ")) == [
        "task 0 on node1", "task 1 on node2"]


def test_too_many_nodes_rejected_at_submit(slurm_workdir):
    with pytest.raises(RuntimeError, match="Node count specification invalid"):
        sbatch(["-N3", "--wrap", "true"], cwd=slurm_workdir)


def test_dependency_afterany_runs_after_failed_parent(slurm_workdir):
    parent = sbatch(["-o", "parent.out", "--time=1", "--wrap",
                     "sleep 1; date +%s.%N > parent.end; exit 3"], cwd=slurm_workdir)
    child = sbatch(["-o", "child.out", "--time=1", f"--dependency=afterany:{parent}",
                    "--wrap", "date +%s.%N > child.start"], cwd=slurm_workdir)
    assert job_state(child) == "PENDING"
    wait_for_state(child, {"COMPLETED"}, timeout_s=30)
    assert job_state(parent) == "FAILED"
    assert job_field(parent, "ExitCode") == "3:0"
    parent_end = float((slurm_workdir / "parent.end").read_text())
    child_start = float((slurm_workdir / "child.start").read_text())
    assert parent_end < child_start < parent_end + 15


def test_scancel_batch_signal_reaches_trap(slurm_workdir):
    script = write_script(slurm_workdir, "trap.sh", """
        #SBATCH --time=1
        #SBATCH -o trap-%j.out
        trap 'echo "got USR2"; exit 0' USR2
        echo ready
        while :; do sleep 0.2; done
    """)
    job = sbatch([str(script)], cwd=slurm_workdir)
    out = wait_for_file(slurm_workdir / f"trap-{job}.out", timeout_s=30, contains="ready")
    subprocess.run(["scancel", "--batch", "--signal=USR2", str(job)], check=True, timeout=30)
    wait_for_state(job, {"COMPLETED"}, timeout_s=15)
    assert "got USR2" in out.read_text()


def test_requeue_reruns_with_restart_count(slurm_workdir):
    script = write_script(slurm_workdir, "requeue.sh", """
        #SBATCH --time=2
        #SBATCH -o requeue-%j.out
        #SBATCH --open-mode=append
        echo "start restart_count=${SLURM_RESTART_COUNT:-0} at $(date +%s.%N)"
        if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi
        while :; do sleep 0.2; done
    """)
    job = sbatch([str(script)], cwd=slurm_workdir)
    out = wait_for_file(slurm_workdir / f"requeue-{job}.out", timeout_s=30, contains="restart_count=0")
    t0 = time.time()
    subprocess.run(["scontrol", "requeue", str(job)], check=True, timeout=30)
    wait_for_state(job, {"COMPLETED"}, timeout_s=45)
    starts = [line.split() for line in out.read_text().splitlines() if line.startswith("start ")]
    assert [s[1] for s in starts] == ["restart_count=0", "restart_count=1"], starts
    delay = float(starts[1][3]) - t0
    print(f"requeued job {job} restarted {delay:.1f} s after scontrol requeue")
    assert delay < 30
    assert job_field(job, "Restarts") == "1"


def test_signal_before_time_limit_reaches_batch_shell(usr2_job):
    job, workdir = usr2_job
    wait_for_state(job, {"COMPLETED"}, timeout_s=75)
    text = (workdir / f"usr2-{job}.out").read_text()
    assert "got USR2 after" in text
    print(f"--signal=B:USR2@50 with --time=1: {text.strip()}")
