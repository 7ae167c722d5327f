"""python -m train.launch.node JOB [overrides...]: this node's torchrun command, NUL-separated.

Called by launchers/node.sh on every node; the same node_command() builds the per-node
lines of the --dry-run plan, so what the plan shows is what runs. Unless OMP_NUM_THREADS is
set, the command starts with `env OMP_NUM_THREADS=<cores / processes>` (worker_threads): the
node's usable cores shared out among its workers (torchrun alone would give each one thread)."""

import os
import sys

from train.launch.cluster import ClusterError, detect
from train.launch.conf import EXIT_USAGE
from train.launch.plan import node_command


def worker_threads(procs_per_node: int, cores: int | None = None) -> int:
    """Intra-op threads per worker: the cores this process may run on (its CPU affinity: SLURM's
    --cpus-per-task, a cgroup) divided among the node's worker processes, at least one."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, procs_per_node))


def main(argv: list[str]) -> int:
    job, overrides = argv[0], argv[1:]
    try:
        cluster = detect(dict(os.environ), int(os.environ.get("NUM_GPUS", "1")))
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    # torchrun through train/launch/torchrun.py: a worker's `error:` line last, its exit code kept
    command = [sys.executable, "-m", "train.launch.torchrun", *node_command(job, cluster, cluster.node_rank, overrides)[1:]]
    if not os.environ.get("OMP_NUM_THREADS"):
        command = ["env", f"OMP_NUM_THREADS={worker_threads(cluster.procs_per_node)}", *command]
    sys.stdout.write("\0".join(command) + "\0")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
