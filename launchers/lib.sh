# launchers/lib.sh: shared by slurm/*.sh (batch) and launchers/*.sh (interactive).
# Source it, then: launch_job JOB batch|interactive [--config C] [--hf-token-file F]
#                  [--hf-token V] [--dry-run [--scaling 1,2,4]] [POSITIONAL ...] [-- key=value | VAR=value ...]
# Validation and planning happen once, in `python -m train.launch.plan`, before anything is
# started: a bad conf exits 2 with one message, no job step, no run directory. The plan sources
# the conf, hands back its variables to export, and writes <run dir>/plans/plan_<datetime>_<jobid>.json,
# which every worker reads (TRAIN_PLAN_FILE) instead of planning again.
set -euo pipefail

LAUNCHERS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCHERS_DIR")
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "error: $*" >&2; exit 2; }
note() { echo "[launch $(date +%H:%M:%S)] $*" >&2; }

usage() {
  cat >&2 <<EOF
usage: $1 --config CONF [--hf-token-file FILE] [--dry-run] [-- key=value ...]
  --config CONF         a .conf path, or a name in conf.d/ ($(cd "$REPO_ROOT/conf.d" && ls ./*.conf | sed 's|^\./||; s|\.conf$||' | paste -sd' '))
  --hf-token-file FILE  read HF_TOKEN from FILE (never written to logs)
  --hf-token VALUE      accepted for compatibility; prefer the file or HF_TOKEN in the environment
  --dry-run             print the plan as JSON and exit
  --scaling NODES       with --dry-run: step time, tokens/s and wall time at these node counts (1,2,4,8)
  -- key=value ...      Hydra overrides, e.g. optim.lr=1e-5 training.train_iters=100,
                        or conf variables over the conf's, e.g. LR=1e-6 DATASET_NAME=mix
  qad: POSITIONAL       the QAD guide's form: LR TEACHER_MODEL DATASET_NAME STUDENT_MODEL KD_CFG_PATH
EOF
}

# The QAD users' guide passes these after --config, in this order: `qad.sh --config C 1e-6 Qwen3-8B ...`
QAD_POSITIONAL=(LR TEACHER_MODEL DATASET_NAME STUDENT_MODEL KD_CFG_PATH)

parse_args() {  # sets CONFIG DRY_RUN SCALING OVERRIDES POSITIONAL CLI_HF_TOKEN; exports HF_TOKEN
  CONFIG="" DRY_RUN=0 SCALING="" OVERRIDES=() POSITIONAL=() CLI_HF_TOKEN=""
  while (($#)); do
    case "$1" in
      --config) [[ $# -ge 2 ]] || die "--config needs a value"; CONFIG=$2; shift 2 ;;
      --config=*) CONFIG=${1#*=}; shift ;;
      --hf-token-file) [[ $# -ge 2 ]] || die "--hf-token-file needs a value"
        [[ -r $2 ]] || die "--hf-token-file $2: not a readable file"
        HF_TOKEN=$(tr -d '[:space:]' <"$2"); export HF_TOKEN; CLI_HF_TOKEN=$HF_TOKEN; shift 2 ;;
      --hf-token) [[ $# -ge 2 ]] || die "--hf-token needs a value"
        echo "warning: --hf-token puts the token in the job's arguments, which SLURM stores" \
          "(visible in 'scontrol show job'); use --hf-token-file FILE or export HF_TOKEN" >&2
        HF_TOKEN=$2; export HF_TOKEN; CLI_HF_TOKEN=$HF_TOKEN; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --scaling) [[ $# -ge 2 ]] || die "--scaling needs node counts, e.g. 1,2,4,8"; SCALING=$2; shift 2 ;;
      --scaling=*) SCALING=${1#*=}; shift ;;
      -h | --help) usage "$0"; exit 0 ;;
      --) shift; OVERRIDES+=("$@"); break ;;
      *=*) OVERRIDES+=("$1"); shift ;;
      -*) usage "$0"; die "unknown argument: $1" ;;
      *) POSITIONAL+=("$1"); shift ;;
    esac
  done
}

read_positional() {  # JOB: the QAD guide's positional values -> conf variables (VAR=value) in OVERRIDES
  local job=$1 i named=()
  ((${#POSITIONAL[@]})) || return 0
  [[ $job == qad ]] || { usage "$0"; die "unknown argument: ${POSITIONAL[0]} (positional values are for qad.sh)"; }
  ((${#POSITIONAL[@]} <= ${#QAD_POSITIONAL[@]})) ||
    die "${#POSITIONAL[@]} positional values; qad.sh takes at most ${#QAD_POSITIONAL[@]}: ${QAD_POSITIONAL[*]}"
  for i in "${!POSITIONAL[@]}"; do
    named+=("${QAD_POSITIONAL[i]}=${POSITIONAL[i]}")
  done
  echo "note: positional arguments read as ${named[*]} (named form: -- ${named[*]})" >&2
  OVERRIDES=("${named[@]}" "${OVERRIDES[@]}")
}

export_command_line_variables() {  # VAR=value overrides win over the conf in the workers' environment too
  local override
  for override in "${OVERRIDES[@]}"; do
    if [[ $override =~ ^[A-Z][A-Z0-9_]*= ]]; then export "${override?}"; fi
  done
}

plan_job() {  # JOB: validates the conf, writes the plan file; sets RUN_DIR SLURM_LOG ... TRAIN_OVERRIDES
  # TRAIN_PLAN_FILE, and exports the conf's variables (NCCL_*, HF_TOKEN, ...) as sourcing it would
  local job=$1 plan
  plan=$("$PYTHON" -m train.launch.plan --job "$job" --config "$CONFIG" --format shell --write-plan \
    -- "${OVERRIDES[@]}") || exit $?
  eval "$plan"
}

take_run_lock() {  # one job per run dir (train/launch/runlock.py); released when this shell exits
  ((PLAN_NODE_RANK == 0)) || return 0
  "$PYTHON" -m train.launch.runlock acquire "$RUN_DIR" --pid $$ || exit $?
  export RUN_LOCK_PID=$$
  trap '"$PYTHON" -m train.launch.runlock release "$RUN_DIR" --pid '$$' || true' EXIT
}

prefer_command_line_token() {  # --hf-token-file / --hf-token win over the conf's HF_TOKEN
  [[ -n $CLI_HF_TOKEN ]] || return 0
  [[ -z ${HF_TOKEN:-} || $HF_TOKEN == "$CLI_HF_TOKEN" ]] ||
    echo "warning: HF_TOKEN is set in $CONF_PATH and given on the command line: using the command line's" >&2
  export HF_TOKEN=$CLI_HF_TOKEN
}

source_conf() {  # preprocess (no plan): export the conf's variables to its process
  # as the plan sources it: errexit on, unset variables allowed (${MODELS_ROOT}/x in confs)
  set -a +u
  # shellcheck disable=SC1090
  source "$CONF_PATH"
  set +a -u
  prefer_command_line_token
}

tee_logs() {  # batch jobs: copy stdout/stderr into logs_slurm/ under names from logs_templates/
  mkdir -p "$(dirname "$SLURM_LOG")"
  exec > >(tee -a "$SLURM_LOG") 2> >(tee -a "$SLURM_ERR" >&2)
}

run_forwarding_signals() {  # run "$@" in the background; USR1/USR2/TERM reach it; returns its status
  local child status=0
  "$@" &
  child=$!
  trap 'note "got USR2: asking training to save and stop"; kill -USR2 $child 2>/dev/null || true' USR2
  trap 'note "got TERM: asking training to save and stop"; kill -TERM $child 2>/dev/null || true' TERM
  trap 'note "got USR1: the workers append their Python stacks to $RUN_DIR/logs/stacks_*"; kill -USR1 $child 2>/dev/null || true' USR1
  while :; do
    wait "$child" && status=0 || status=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - USR1 USR2 TERM
  return "$status"
}

maybe_requeue() {  # after a signal-triggered save the trainer asks for a requeue
  [[ -f $TRAIN_STOP_FILE ]] || return 0
  note "training stopped: $(cat "$TRAIN_STOP_FILE")"
  if grep -q '"requeue": true' "$TRAIN_STOP_FILE" && [[ -n ${SLURM_JOB_ID:-} ]]; then
    note "requeueing job $SLURM_JOB_ID (it resumes from the checkpoint just saved)"
    scontrol requeue "$SLURM_JOB_ID"
  fi
}

launch_job() {  # JOB MODE args...
  local job=$1 mode=$2 status=0
  shift 2
  export LAUNCH_T0=${LAUNCH_T0:-$(date +%s.%N)}  # startup timeline (benchmarks/launch_latency)
  parse_args "$@"
  [[ -n $CONFIG ]] || { usage "$0"; die "--config is required"; }
  read_positional "$job"
  [[ -z $SCALING ]] || ((DRY_RUN)) || die "--scaling needs --dry-run"
  export TRAIN_JOB=$job
  if ((DRY_RUN)); then
    exec "$PYTHON" -m train.launch.plan --job "$job" --config "$CONFIG" --dry-run \
      ${NNODES:+--nodes "$NNODES"} ${SCALING:+--scaling "$SCALING"} -- "${OVERRIDES[@]}"
  fi
  plan_job "$job"
  take_run_lock
  prefer_command_line_token
  export_command_line_variables
  export RUN_DATETIME NNODES NUM_GPUS MASTER_ADDR MASTER_PORT TRAIN_PLAN_FILE
  export TRAIN_CONF_PATH=$CONF_PATH TRAIN_STOP_FILE="$RUN_DIR/logs/stop_${RUN_DATETIME}.json"
  mkdir -p "$RUN_DIR/logs"
  [[ $mode == batch ]] && tee_logs
  note "$job job: conf $CONF_PATH; $NNODES node(s) x $NUM_GPUS; rendezvous $MASTER_ADDR:$MASTER_PORT"
  note "run dir $RUN_DIR; $RESUME_DECISION (iteration $RESUME_ITERATION); plan $TRAIN_PLAN_FILE"
  export TRAIN_LIFELINE="$(hostname):$$"  # workers die with this shell (train/launch/lifeline.py)
  if [[ $mode == batch ]]; then
    # a worker's `error:` line comes back here, to be printed after srun's report (train/launch/torchrun.py)
    export TRAIN_ERROR_LINE_FILE="$RUN_DIR/logs/error_${RUN_DATETIME}.txt"
    run_forwarding_signals srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
      "$LAUNCHERS_DIR/node.sh" "$job" "${TRAIN_OVERRIDES[@]}" || status=$?
    if [[ $status -ne 0 && -f $TRAIN_ERROR_LINE_FILE ]]; then
      status=$(head -n 1 "$TRAIN_ERROR_LINE_FILE")  # the worker's code (2), not srun's (a killed peer's)
      tail -n +2 "$TRAIN_ERROR_LINE_FILE" >&2
    fi
  else
    run_forwarding_signals "$LAUNCHERS_DIR/node.sh" "$job" "${TRAIN_OVERRIDES[@]}" || status=$?
  fi
  [[ $status -eq 0 && $mode == batch ]] && maybe_requeue
  return "$status"
}

launch_preprocess() {  # MODE [--config C] [--dry-run] [-- key=value ...]: one process, no torchrun
  local mode=$1
  shift
  parse_args "$@"
  read_positional preprocess
  if [[ -n $CONFIG ]]; then
    CONF_PATH=$("$PYTHON" -c 'import sys; from train.launch.conf import resolve_conf_path as r; print(r(sys.argv[1]))' \
      "$CONFIG" 2>/dev/null) || die "--config $CONFIG: no such file or conf.d/ name"
    source_conf
  fi
  if ((DRY_RUN)); then
    exec "$PYTHON" -m train.launch.plan --job preprocess --dry-run -- "${OVERRIDES[@]}"
  fi
  "$PYTHON" -m train.launch.plan --job preprocess -- "${OVERRIDES[@]}" >/dev/null || exit $?
  local command=("$PYTHON" -m train.preprocess "${OVERRIDES[@]}")
  [[ $mode == batch ]] && command=(srun --ntasks=1 --kill-on-bad-exit=1 "${command[@]}")
  note "preprocess: ${command[*]}"
  "${command[@]}"
}
