#!/usr/bin/env bash
# sbatch [--nodes=N] slurm/pretrain.sh --config CONF [--hf-token-file F] [--dry-run] [-- key=value ...]
# Pretraining from scratch (docs/models.md for the model sizes).
#SBATCH --job-name=pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=%x_%j.log
#SBATCH --error=err_%x_%j.log
#SBATCH --open-mode=append
#SBATCH --signal=B:USR2@300
#SBATCH --requeue
# SLURM's own files above hold the first lines; from the moment the conf is read, all
# output also goes to $QAD_CHECKPOINT_ROOT/logs_slurm/ (names: logs_templates/names.conf).
# USR2 300 s before the time limit: training saves, then the job requeues itself.
set -euo pipefail
# sbatch runs a copy of this file: find the checkout from the submitted path.
script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' || true)
[[ -z $script || $script == /* ]] || script="${SLURM_SUBMIT_DIR:-.}/$script"
source "${TRAIN_REPO:-$(dirname "${script:-$0}")/..}/launchers/lib.sh"
launch_job pretrain batch "$@"
