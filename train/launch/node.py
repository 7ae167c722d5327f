"""python -m train.launch.node JOB [overrides...]: this node's torchrun command, NUL-separated.

Called by launchers/node.sh on every node; the same node_command() builds the per-node
lines of the --dry-run plan, so what the plan shows is what runs."""

import os
import sys

from train.launch.cluster import ClusterError, detect
from train.launch.conf import EXIT_USAGE
from train.launch.plan import node_command


def main(argv: list[str]) -> int:
    job, overrides = argv[0], argv[1:]
    try:
        cluster = detect(dict(os.environ), int(os.environ.get("NUM_GPUS", "1")))
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write("\0".join(node_command(job, cluster, cluster.node_rank, overrides)) + "\0")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
