#!/usr/bin/env bash
# sbatch slurm/preprocess.sh [--config CONF] [--dry-run] -- input=... output_prefix=... tokenizer=... [workers=N]
# Tokenize a dataset into Megatron .bin/.idx (python -m train.preprocess; configs/preprocess.yaml).
# CONF, when given, is sourced for its paths and HF_TOKEN; the job is one CPU task.
#SBATCH --job-name=preprocess
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=12:00:00
#SBATCH --output=%x_%j.log
#SBATCH --error=err_%x_%j.log
set -euo pipefail
# sbatch runs a copy of this file: find the checkout from the submitted path.
script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' || true)
[[ -z $script || $script == /* ]] || script="${SLURM_SUBMIT_DIR:-.}/$script"
source "${TRAIN_REPO:-$(dirname "${script:-$0}")/..}/launchers/lib.sh"
launch_preprocess batch "$@"
