#!/usr/bin/env bash
# launchers/node.sh JOB [key=value ...]: one task per node (srun or the interactive launcher).
# Starts torchrun for this node and forwards USR2/TERM to its workers, which save and stop, and
# USR1, on which each worker appends its Python stacks to RUN_DIR/logs/stacks_<datetime>_rank<R>.txt.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
job=$1
shift
export NODE_RANK=${SLURM_NODEID:-${NODE_RANK:-0}}
# Threads per worker: OMP_NUM_THREADS if set, else this node's cores / its workers (train/launch/node.py).
mapfile -d '' -t torchrun_cmd < <("${PYTHON:-python3}" -m train.launch.node "$job" "$@")
[[ ${#torchrun_cmd[@]} -gt 0 ]] || exit 2
echo "[node $NODE_RANK $(hostname)] ${torchrun_cmd[*]}" >&2
cd "$REPO_ROOT"
# the workers die with this task and with the launcher (train/launch/lifeline.py)
export TRAIN_LIFELINE="${TRAIN_LIFELINE:-} $(hostname):$$"
# torchrun ignores USR1/USR2/TERM (its default would kill it and orphan the workers); the
# workers install handlers of their own: finish the iteration, save and exit cleanly (USR2/TERM),
# dump their stacks (USR1, train/launch/watchdog.py).
(trap '' USR1 USR2 TERM; exec "${torchrun_cmd[@]}") &
child=$!
forward() { pkill "-$1" -P "$child" 2>/dev/null || true; }  # the workers are torchrun's children
trap 'forward USR2' USR2
trap 'forward USR1' USR1
trap 'forward TERM' TERM
status=0
while :; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"
