#!/usr/bin/env bash
# sbatch slurm/eval.sh --config CONF --tasks T[,T...] [--job qad|pretrain|finetune] [-- train.downstream options]
# Downstream accuracy (lm-eval) of a run after training: teacher, PTQ and QAD student side by
# side for a QAD run (docs/qad.md#downstream-accuracy-lm-eval); the JSON goes to RUN_DIR/logs/.
#SBATCH --job-name=eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=%x_%j.log
#SBATCH --error=err_%x_%j.log
set -euo pipefail
script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' || true)
[[ -z $script || $script == /* ]] || script="${SLURM_SUBMIT_DIR:-.}/$script"
source "${TRAIN_REPO:-$(dirname "${script:-$0}")/..}/launchers/lib.sh"

CONFIG="" TASKS="" JOB=qad DOWNSTREAM_ARGS=()
while (($#)); do
  case "$1" in
    --config) [[ $# -ge 2 ]] || die "--config needs a value"; CONFIG=$2; shift 2 ;;
    --tasks) [[ $# -ge 2 ]] || die "--tasks needs a value"; TASKS=$2; shift 2 ;;
    --job) [[ $# -ge 2 ]] || die "--job needs a value"; JOB=$2; shift 2 ;;
    --) shift; DOWNSTREAM_ARGS+=("$@"); break ;;
    *) die "unknown argument: $1 (usage: sbatch slurm/eval.sh --config CONF --tasks T [--job JOB] [-- options])" ;;
  esac
done
[[ -n $CONFIG ]] || die "--config is required"
[[ -n $TASKS ]] || die "--tasks is required (lm-eval task names or task YAML files)"
plan=$("$PYTHON" -m train.launch.plan --job "$JOB" --config "$CONFIG" --format shell) || exit $?
eval "$plan"  # sets RUN_DIR, the run the conf trains
[[ -d $RUN_DIR ]] || die "--config $CONFIG: run directory $RUN_DIR does not exist (train first)"
exec "$PYTHON" -m train.downstream "$RUN_DIR" --tasks "$TASKS" \
  --json "$RUN_DIR/logs/downstream_$(date +%Y%m%d_%H%M%S).json" "${DOWNSTREAM_ARGS[@]}"
