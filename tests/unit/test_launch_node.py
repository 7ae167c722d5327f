"""python -m pytest tests/unit/test_launch_node.py  (train.launch.node: the node's torchrun command and its threads)"""

import os
import subprocess
import sys
from pathlib import Path

from train.launch.node import worker_threads

REPO = Path(__file__).resolve().parents[2]


def node_command(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "OMP_NUM_THREADS"))}
    env.update(NUM_GPUS="2", PYTHONPATH=str(REPO), **env_extra)
    result = subprocess.run([sys.executable, "-m", "train.launch.node", "pretrain", "a=1"], cwd=REPO, env=env,
                            capture_output=True, text=True, check=True)
    return result.stdout.split("\0")[:-1]


def test_threads_share_the_cores_among_the_workers():
    assert worker_threads(4, cores=16) == 4
    assert worker_threads(8, cores=12) == 1
    assert worker_threads(3, cores=2) == 1  # never zero


def test_command_sets_threads_unless_given():
    cores = len(os.sched_getaffinity(0))
    command = node_command({})
    torchrun = [sys.executable, "-m", "train.launch.torchrun"]  # torchrun keeping a worker's error line and code
    assert command[:2] == ["env", f"OMP_NUM_THREADS={max(1, cores // 2)}"] and command[2:5] == torchrun
    assert node_command({"OMP_NUM_THREADS": "3"})[:3] == torchrun  # the user's setting is inherited
