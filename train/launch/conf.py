"""The .conf contract: which shell variables a conf may set, what they mean, and checks.

A .conf is a bash file of `export VAR=value` lines, as in the QAD users' guide. This module is the one
visible place where those variables map onto config keys (CONF_VARIABLES) and where
they are validated. It imports neither torch nor Hydra: the launchers call it
(`python -m train.launch.plan`) before any expensive work.
"""

import difflib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf.d"
JOBS = ("qad", "pretrain", "finetune")
EXIT_USAGE = 2  # exit code of every validation error


class ConfError(ValueError):
    """A .conf problem; the message names the conf file and the variable."""


@dataclass(frozen=True)
class ConfVariable:
    name: str
    key: str | None  # dotted config key; None: used by the launchers only
    kind: str  # str | int | float | bool | path | dir
    help: str
    jobs: tuple[str, ...] = JOBS  # jobs that read it
    required_for: tuple[str, ...] = ()
    default: str | None = None  # applied by the launcher when the conf and env leave it unset


def _var(name, key, kind, help, jobs=JOBS, required_for=(), default=None):
    return ConfVariable(name, key, kind, help, tuple(jobs), tuple(required_for), default)


QAD, PRE, FT = ("qad",), ("pretrain",), ("finetune",)
CONF_VARIABLES: dict[str, ConfVariable] = {v.name: v for v in [
    # --- the job the conf is for: a launcher of another job refuses it; train.submit picks the wrapper ---
    _var("JOB", None, "str", "pretrain | qad | finetune: the job this conf is for (the conf's own value, never "
         "the caller's environment)"),
    # --- QAD (the variables of the QAD users' own guide) ---
    _var("STUDENT_MODEL", "model.name", "str", "student model name (run dir, checkpoints/<model>)", QAD, QAD),
    _var("TEACHER_MODEL", "distill.teacher_model", "str", "teacher model name (run dir name)", QAD, QAD),
    _var("STUDENT_CKPT", "model.hf_checkpoint", "dir", "HF directory with the student's starting weights", QAD, QAD),
    _var("TEACHER_CKPT", "distill.teacher_checkpoint", "dir", "HF directory with the frozen teacher", QAD, QAD),
    _var("TEACHER_MODEL_CONFIG", "distill.teacher_model_config", "path", "YAML of teacher config overrides", QAD),
    _var("KD_CFG_PATH", "distill.kd_config_path", "path", "YAML with KD loss settings", QAD),
    _var("QUANT_RECIPE", "quant.recipe", "str",
         "nvfp4 | nvfp4_mlp_only | fp8 (finetune: quantizes the frozen base, lora.quantized_base)", QAD + FT),
    # --- pretraining and fine-tuning (the users' LoRA guide and pretraining scripts) ---
    _var("MODEL", "model.name", "str", "model name from the registry (python -m train.models list)", PRE + FT, PRE + FT),
    _var("BASE_CKPT", "model.hf_checkpoint", "dir", "HF directory with the base weights to fine-tune", FT),
    _var("SEQ_LENGTH", "data.seq_length", "int", "tokens per training sequence"),
    _var("GBS", "training.global_batch_size", "int", "global batch size in sequences"),
    _var("TRAIN_ITERS", "training.train_iters", "int", "optimizer steps to run"),
    _var("MIN_LR", "optim.min_lr", "float", "learning rate at the end of the schedule"),
    _var("WARMUP_ITERS", "optim.warmup_iters", "int", "linear warmup steps"),
    _var("LR_SCHEDULE", "optim.schedule", "str", "cosine | wsd | constant"),
    _var("PRECISION", "training.precision", "str", "fp32 (default, CPU) | bf16 (autocast, fp32 master weights; GPU confs)"),
    _var("SAVE_INTERVAL", "checkpoint.save_interval", "int", "iterations between checkpoints (0: the last only)"),
    _var("KEEP_LAST", "checkpoint.keep_last", "int", "checkpoints kept on disk"),
    _var("SAVE_INTERVAL_S", "checkpoint.save_interval_s", "float", "seconds of wall time between checkpoints"),
    _var("KEEP_EVERY", "checkpoint.keep_every", "int", "iterations divisible by this are never purged"),
    _var("ASYNC_SAVE", "checkpoint.async_save", "bool", "asynchronous checkpoint writes (GPU)"),
    _var("LOG_INTERVAL", "training.log_interval", "int", "iterations between metric lines"),
    _var("EVAL_INTERVAL", "training.eval_interval", "int", "iterations between evaluations (0: none)"),
    _var("EVAL_ITERS", "training.eval_iters", "int", "valid-split micro-batches per rank in each evaluation"),
    _var("EVAL_ONLY", "training.eval_only", "bool", "evaluate the latest checkpoint once and exit (no training)"),
    _var("MAX_BAD_ITERATIONS", "training.max_bad_iterations", "int", "non-finite iterations in a row that stop the job"),
    _var("SEED", "training.seed", "int", "random seed"),
    _var("ATTENTION_BACKEND", "model.attention_backend", "str", "sdpa | flash | reference"),
    _var("LORA_RANK", "lora.rank", "int", "LoRA rank", FT),
    _var("LORA_ALPHA", "lora.alpha", "float", "LoRA alpha (rule of thumb: 2 x rank)", FT),
    _var("LORA_DROPOUT", "lora.dropout", "float", "LoRA dropout", FT),
    _var("LORA_TARGET_MODULES", "lora.target_modules", "str", "comma-separated module names", FT),
    _var("MODE", "mode", "str", "train | validate (val loss and labeled-set accuracy of the latest checkpoint)", FT),
    _var("VAL_SET", "validate.val_set", "path", "labeled JSONL (prompt, label, category) for mode=validate", FT),
    _var("EARLY_STOP_PATIENCE", "training.early_stop_patience", "int",
         "evaluations without val_loss improvement that stop the job (0: off; needs EVAL_INTERVAL)"),
    _var("EARLY_STOP_MIN_DELTA", "training.early_stop_min_delta", "float", "smallest val_loss drop that counts"),
    # --- shared by every job ---
    _var("TP_SIZE", "parallel.tensor_parallel_size", "int", "tensor-parallel size", required_for=QAD, default="1"),
    _var("PP_SIZE", "parallel.pipeline_parallel_size", "int", "pipeline-parallel size", default="1"),
    _var("PP_LAYERS", "parallel.pipeline_layers", "str", "blocks per pipeline stage, e.g. 3,5 (empty: balanced; "
         "interleaved: PP_SIZE x PP_VIRTUAL_STAGES counts)"),
    _var("PP_SCHEDULE", "parallel.pipeline_schedule", "str", "pipeline schedule: 1f1b | interleaved_1f1b",
         default="1f1b"),
    _var("PP_VIRTUAL_STAGES", "parallel.virtual_stages", "int", "pipeline stages per rank (interleaved_1f1b: 2 or "
         "more)", default="1"),
    _var("EP_SIZE", "parallel.expert_parallel_size", "int", "expert-parallel size (MoE)", default="1"),
    _var("MBS", "training.micro_batch_size", "int", "micro-batch size per rank", required_for=QAD),
    _var("NUM_GPUS", None, "int", "GPUs (CPU processes without a GPU) per node", default="8"),
    _var("GPU_TYPE", None, "str", "the GPU the plan sizes memory and time for: h100, h200, b200, gb200, a100, "
         "a100-40gb", default="h100"),
    _var("GPU_MEMORY_GB", None, "float", "GPU memory in GB for the memory plan (overrides GPU_TYPE's)"),
    _var("ASSUMED_MFU", None, "float", "model FLOPs utilization the time estimate assumes", default="0.35"),
    _var("INTRA_NODE_GBPS", None, "float", "GB/s (bytes) per GPU and direction inside a node, for the "
         "communication plan (450: NVLink4, H100/H200)", default="450"),
    _var("INTER_NODE_GBPS", None, "float", "GB/s (bytes) per GPU and direction between nodes "
         "(50: 400 Gb/s InfiniBand, one NIC per GPU)", default="50"),
    _var("COMM_OVERLAP", None, "float", "share (0-1) of the communication time the step plan hides behind "
         "compute", default="0"),
    _var("MEMORY_CHECK", None, "bool", "0: start a job whose plan exceeds the GPU's memory", default="1"),
    _var("LR", "optim.lr", "float", "peak learning rate"),
    _var("DATASET_NAME", "data.dataset_name", "str", "datablend name; 'synthetic' for random tokens",
         default="openscience"),
    _var("TRAIN_SAMPLES", "data.train_samples", "int", "training samples (default: one epoch of the blend)"),
    _var("BLEND_PATH", "data.blend_path", "path", "datablend JSON (default: $DATACACHE_DIR/datablend_<DATASET_NAME>.json)"),
    _var("ITERATIONS_TO_SKIP", "data.iterations_to_skip", "str", "iterations consumed without an optimizer step"),
    _var("LOG_PARAMS_NORM", "training.log_params_norm", "bool", "log the parameter norm (costs memory on big models)"),
    _var("MODELS_ROOT", None, "str", "where model checkpoints live (used inside confs)"),
    _var("QAD_CHECKPOINT_ROOT", "checkpoint.root", "str", "root of run directories and logs_slurm/"),
    _var("DATACACHE_DIR", "data.datacache_dir", "str", "where datablend JSONs and .bin/.idx live"),
    _var("HF_TOKEN", None, "str", "HuggingFace token (secret: never logged)"),
    _var("REQUEUE", "checkpoint.requeue", "bool", "requeue the job after a signal-triggered save", default="1"),
    _var("DIST_TIMEOUT_S", "parallel.timeout_s", "int", "seconds a step may hang before the job stops naming "
         "the rank that stopped (train/launch/watchdog.py); collectives time out after max(30 s, 10 %) more",
         default="1800"),
    _var("DP_SHARDING", "parallel.data_parallel", "str", "ddp | fsdp | fsdp_zero2 | zero1 | auto (the fastest whose plan fits the GPU)"),
    _var("ACTIVATION_CHECKPOINTING", "parallel.activation_checkpointing", "bool", "recompute each block's activations in backward"),
    _var("COMPILE", "parallel.compile", "bool", "torch.compile each transformer block"),
    _var("FSDP_MIXED_PRECISION", "parallel.fsdp_mixed_precision", "str",
         "FSDP2 MixedPrecisionPolicy: bf16 all-gather and compute, fp32 reduce-scatter (DP_SHARDING=fsdp); "
         "auto (on with PRECISION=bf16 on GPUs) | 1 | 0"),
    _var("TIME_BUDGET_S", "training.time_budget_s", "float", "stop cleanly after this many seconds"),
    _var("WANDB_PROJECT", "logging.wandb_project", "str", "W&B project: metrics to W&B too (rank 0); unset: off"),
    _var("WANDB_ENTITY", "logging.wandb_entity", "str", "W&B user or team"),
    _var("WANDB_MODE", "logging.wandb_mode", "str", "online | offline (no network; `wandb sync` later) | disabled"),
    # --- launcher-only: where the job runs ---
    _var("NNODES", None, "int", "nodes (manual multi-node; SLURM sets it otherwise)"),
    _var("NODE_RANK", None, "int", "this node's rank (manual multi-node)"),
    _var("MASTER_ADDR", None, "str", "rendezvous host (manual multi-node)"),
    _var("MASTER_PORT", None, "int", "rendezvous port (default: derived from the job id)"),
    # accepted for compatibility with the users' Megatron-LM scripts; unused here
    _var("MLM_DIR", None, "str", "Megatron-LM checkout (unused: the engine is train/)"),
    _var("MODELOPT_DIR", None, "str", "Model-Optimizer checkout (unused: pip package)"),
]}

# Defaults that differ by job (QAD fine-tunes a trained model at a tiny LR: the QAD users' guide uses 1e-6).
JOB_DEFAULTS = {"qad": {"LR": "1e-6"}}

# Secrets: any variable whose name contains one of these is redacted everywhere.
SECRET_MARKERS = ("TOKEN", "SECRET", "KEY", "PASSWORD", "CREDENTIAL")
REDACTED = "<redacted>"


def is_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def redact(env: dict[str, str]) -> dict[str, str]:
    return {k: (REDACTED if is_secret(k) else v) for k, v in env.items()}


def resolve_conf_path(config: str) -> Path:
    """--config takes a path (relative to the current directory or to the checkout), or a
    bare name found in conf.d/ (with or without .conf). A YAML or JSON file is refused by name."""
    for candidate in (Path(config), REPO_ROOT / config, CONF_DIR / config, CONF_DIR / f"{config}.conf"):
        if candidate.is_file():
            if looks_like_yaml(candidate):
                raise ConfError(f"--config {config}: a YAML/JSON file, not a bash conf (`export VAR=value` lines, "
                                "as in conf.d/); KD settings go in KD_CFG_PATH, config keys after `--`")
            return candidate.resolve()
    known = sorted(p.stem for p in CONF_DIR.glob("*.conf"))
    raise ConfError(f"--config {config}: no such file, and no conf.d/{config}.conf "
                    f"(known: {', '.join(known)})")


YAML_KEY = re.compile(r"^[A-Za-z_][\w.-]*:(\s|$)")  # `key:` or `key: value` (bash has no such line)


def looks_like_yaml(path: Path) -> bool:
    """By suffix (.yaml .yml .json), or a first non-comment line that is a YAML key or a JSON brace."""
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        return True
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return bool(YAML_KEY.match(line)) or line == "---" or line.startswith("{")
    return False


def command_line_variables(overrides: list[str], config: str) -> tuple[dict[str, str], list[str]]:
    """Splits the launcher's overrides into conf variables (`LR=1e-6`: a CONF_VARIABLES name, upper case)
    and Hydra ones (`optim.lr=1e-6`). Conf variables on the command line win over the conf."""
    variables, hydra = {}, []
    for override in overrides:
        name, _, value = override.partition("=")
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            hydra.append(override)
        elif name in CONF_VARIABLES:
            variables[name] = value
        else:
            close = difflib.get_close_matches(name, CONF_VARIABLES, n=1)
            raise ConfError(f"--config {config}: {override}: {name} is not a conf variable"
                            + (f" (did you mean {close[0]}?)" if close else ""))
    return variables, hydra


# errexit: a failing command stops the conf (as in lib.sh, which sources under set -e);
# the ERR trap names the line. `|| exit` is not used: it would switch errexit off inside.
_DUMP_ENV = ('set -ae; trap \'echo "line $LINENO: a command failed with exit $?" >&2\' ERR; '
             'source "$1" >&2; exec env -0')
_SHELL_VARIABLES = {"SHLVL", "_", "PWD", "OLDPWD"}


def sourced_environment(path: Path, base_env: dict[str, str]) -> dict[str, str]:
    """The whole environment after sourcing the conf on top of base_env (unsets included)."""
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    if syntax.returncode != 0:
        raise ConfError(f"{path}: bash cannot parse it: {syntax.stderr.strip()}")
    result = subprocess.run(["bash", "-c", _DUMP_ENV, "bash", str(path)], env=base_env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfError(f"{path}: sourcing it failed (exit {result.returncode}): "
                        f"{result.stderr.strip() or 'no message'}")
    after = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    for name in _SHELL_VARIABLES:
        after.pop(name, None)
        if name in base_env:
            after[name] = base_env[name]
    return after


def source_conf(path: Path, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The variables the conf set or changed (for the typo warnings)."""
    base_env = dict(os.environ if base_env is None else base_env)
    after = sourced_environment(path, base_env)
    return {k: v for k, v in after.items() if base_env.get(k) != v}


def unknown_variable_warnings(conf_vars: dict[str, str], path: Path) -> list[str]:
    """Warn about names close to a known one (a typo such as TP_SZE); others pass silently,
    since confs may export unrelated settings (NCCL_*, CUDA_*)."""
    warnings = []
    for name in sorted(conf_vars):
        if name in CONF_VARIABLES:
            continue
        close = difflib.get_close_matches(name, CONF_VARIABLES, n=1, cutoff=0.8)
        if close:
            warnings.append(f"{path}: {name}: did you mean {close[0]}?")
    return warnings


def parse_value(var: ConfVariable, value: str, path: Path):
    """Convert one conf value to its type, or raise ConfError naming file and variable."""
    if var.kind == "int":
        try:
            return int(value)
        except ValueError:
            raise ConfError(f"{path}: {var.name}={value!r} is not an integer ({var.help})") from None
    if var.kind == "float":
        try:
            return float(value)
        except ValueError:
            raise ConfError(f"{path}: {var.name}={value!r} is not a number ({var.help})") from None
    if var.kind == "bool":
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ConfError(f"{path}: {var.name}={value!r} is not a boolean (use 0 or 1)")
    return value


def job_values(job: str, env: dict[str, str], path: Path) -> dict[str, object]:
    """Typed values of every variable this job reads, with launcher defaults applied.

    `env` is the environment after sourcing the conf (conf values win over the caller's
    environment, as in the users' scripts)."""
    missing = [v for v in CONF_VARIABLES.values() if job in v.required_for and not env.get(v.name)]
    if missing:
        lines = "\n".join(f"  {v.name}: {v.help}" for v in missing)
        raise ConfError(f"{path}: required for a {job} job but not set:\n{lines}")
    values = {}
    for var in CONF_VARIABLES.values():
        if job not in var.jobs:
            continue
        raw = env.get(var.name) or JOB_DEFAULTS.get(job, {}).get(var.name) or var.default
        if raw is None:
            continue
        values[var.name] = parse_value(var, raw, path)
    return values


def config_overrides(job: str, values: dict[str, object]) -> dict[str, object]:
    """Dotted config keys set by the conf (the mapping used by the Python entrypoints)."""
    overrides = {}
    for name, value in values.items():
        var = CONF_VARIABLES[name]
        if var.key is not None and job in var.jobs:
            overrides[var.key] = value
    if job == "finetune" and "QUANT_RECIPE" in values:  # LoRA on a fake-quantized base
        overrides["lora.quantized_base"] = values["QUANT_RECIPE"]
    if "DATASET_NAME" in values:  # 'synthetic' needs no files; any other name is a datablend
        overrides["data.source"] = "synthetic" if values["DATASET_NAME"] == "synthetic" else "blend"
    return overrides


def without_job(base_env: dict[str, str] | None) -> dict[str, str]:
    """The environment a conf is sourced in: JOB left out, so that JOB is the conf's own."""
    return {k: v for k, v in (os.environ if base_env is None else base_env).items() if k != "JOB"}


def conf_job(path: Path, env: dict[str, str]) -> str | None:
    """The conf's JOB (env: after sourcing it), checked; None when it sets none."""
    job = env.get("JOB")
    if job is not None and job not in JOBS:
        raise ConfError(f"{path}: JOB={job!r} is not one of {', '.join(JOBS)}")
    return job


def job_of_conf(config: str, base_env: dict[str, str] | None = None) -> str:
    """The job a conf names (JOB=...): train.submit queues that job's wrapper."""
    path = resolve_conf_path(config)
    job = conf_job(path, sourced_environment(path, without_job(base_env)))
    if job is None:
        raise ConfError(f"{path}: no JOB: add `export JOB=pretrain|qad|finetune` to the conf, or pass --job")
    return job


def load_conf(config: str, job: str, base_env: dict[str, str] | None = None,
              command_line: dict[str, str] | None = None):
    """Resolve, source and type-check a conf; command_line: conf variables given after --config
    (command_line_variables), set over the conf's. Returns (path, env after sourcing, values, warnings).

    A conf whose JOB names another job is refused: its variables mean something else there."""
    if job not in JOBS:
        raise ConfError(f"unknown job {job!r} (known: {', '.join(JOBS)})")
    path = resolve_conf_path(config)
    base_env = without_job(base_env)
    env = {**sourced_environment(path, base_env), **(command_line or {})}
    declared = conf_job(path, env)
    if declared not in (None, job):
        raise ConfError(f"{path}: JOB={declared}: this conf is for a {declared} job, not {job} "
                        f"(launchers/{declared}.sh, slurm/{declared}.sh)")
    conf_vars = {k: v for k, v in env.items() if base_env.get(k) != v}
    return path, env, job_values(job, env, path), unknown_variable_warnings(conf_vars, path)


DOCS_PAGE = REPO_ROOT / "docs" / "launching.md"  # holds the table between these markers
TABLE_START, TABLE_END = "<!-- conf-table:start -->", "<!-- conf-table:end -->"


def describe_variables() -> str:
    """A Markdown table of the contract, for docs/launching.md (python -m train.launch.conf)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| variable | jobs | required for | default | config key | meaning |", "|---|---|---|---|---|---|"]
    for v in CONF_VARIABLES.values():
        defaults = [v.default] if v.default else []
        defaults += [f"{d[v.name]} ({job})" for job, d in JOB_DEFAULTS.items() if v.name in d]
        rows.append(f"| `{v.name}` | {' '.join(v.jobs)} | {' '.join(v.required_for) or '-'} | "
                    f"{', '.join(defaults) or '-'} | {v.key or '(launcher)'} | {cell(v.help)} |")
    return "\n".join(rows)


def docs_with_table(text: str) -> str:
    """`text` (docs/launching.md) with the part between the conf-table markers regenerated."""
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ConfError(f"{DOCS_PAGE}: no {TABLE_START} ... {TABLE_END} markers")
    return f"{head}{TABLE_START}\n{describe_variables()}\n{TABLE_END}{tail}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--update-docs"]:  # rewrite the table in docs/launching.md
        DOCS_PAGE.write_text(docs_with_table(DOCS_PAGE.read_text()))
    elif sys.argv[1:]:
        sys.exit("usage: python -m train.launch.conf [--update-docs]")
    else:
        print(describe_variables())
