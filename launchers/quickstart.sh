#!/usr/bin/env bash
# bash launchers/quickstart.sh   (what `make quickstart` runs): a tiny Qwen3 learns real text on this machine.
# Steps, each skipped when its output exists: a corpus (the stdlib's docstrings, JSONL) -> a byte-level
# BPE tokenizer -> .bin/.idx and a datablend (train.preprocess) -> pretraining on 2 processes over gloo
# (about a minute on CPUs) -> the loss curve (train.plot). Your own data: docs/data.md.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-$REPO_ROOT/data/quickstart}   # corpus, tokenizer, .bin/.idx, datablend
export QAD_CHECKPOINT_ROOT=${QAD_CHECKPOINT_ROOT:-$REPO_ROOT/runs}
VOCAB_SIZE=${VOCAB_SIZE:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-80}
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

step() { echo "[quickstart] $*" >&2; }

if [[ ! -f $DATA_DIR/stdlib.jsonl ]]; then
  step "corpus: $DATA_DIR/stdlib.jsonl"
  "$PYTHON" -m train.data corpus --output "$DATA_DIR/stdlib.jsonl"
fi
if [[ ! -f $DATA_DIR/tokenizer/tokenizer.json ]]; then
  step "tokenizer: $DATA_DIR/tokenizer ($VOCAB_SIZE tokens)"
  "$PYTHON" -m train.data tokenizer --input "$DATA_DIR/stdlib.jsonl" --vocab-size "$VOCAB_SIZE" \
    --output "$DATA_DIR/tokenizer"
fi
if [[ ! -f $DATA_DIR/datablend_stdlib.json ]]; then
  step "preprocess: $DATA_DIR/stdlib_text_document.bin/.idx and datablend_stdlib.json"
  "$PYTHON" -m train.preprocess input="$DATA_DIR/stdlib.jsonl" tokenizer="$DATA_DIR/tokenizer" \
    output_prefix="$DATA_DIR/stdlib" datablend="$DATA_DIR/datablend_stdlib.json" validation_fraction=0.05 workers=1
fi
step "pretrain tiny-qwen3 on it: $TRAIN_ITERS iterations of 16 x 128 tokens, 2 processes"
# conf variables after `--` win over conf.d/tiny-qwen3.conf (its synthetic data, 64-token sequences)
bash "$REPO_ROOT/launchers/pretrain.sh" --config tiny-qwen3 -- DATASET_NAME=stdlib DATACACHE_DIR="$DATA_DIR" \
  SEQ_LENGTH=128 MBS=8 GBS=16 TRAIN_ITERS="$TRAIN_ITERS" LR=3e-3 WARMUP_ITERS=5 LOG_INTERVAL=5 \
  EVAL_INTERVAL=40 EVAL_ITERS=4 SAVE_INTERVAL=40 "$@"
step "plots"
"$PYTHON" -m train.plot "$QAD_CHECKPOINT_ROOT/tiny-qwen3-pretrain-Data-stdlib-lr0.003"
