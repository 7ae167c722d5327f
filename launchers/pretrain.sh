#!/usr/bin/env bash
# bash launchers/pretrain.sh --config CONF [--hf-token-file F] [--dry-run] [-- key=value ...]
# Interactive entry at the node step: inside `srun --pty bash`, on a workstation with no
# SLURM (standalone), or on each node with NNODES NODE_RANK MASTER_ADDR MASTER_PORT set.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
launch_job pretrain interactive "$@"
