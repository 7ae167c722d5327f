"""The job plan: everything decided before training starts, computed once, by the launchers
(`python -m train.launch.plan`, before any expensive work), and written into the run directory
for the workers (train/launch/job.py reads it; entrypoints started by hand plan on rank 0).

    python -m train.launch.plan --job pretrain --config tiny-qwen3 [--dry-run] [-- key=value ...]

prints the plan as JSON (--dry-run) or as shell assignments for launchers/lib.sh; --write-plan
(the launchers) also writes it to <run dir>/plans/plan_<datetime>_<jobid>.json (TRAIN_PLAN_FILE).
Every validation error: one line naming the conf and the variable, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from train.launch import cluster as cluster_lib
from train.launch.conf import (CONF_VARIABLES, EXIT_USAGE, REPO_ROOT, ConfError, command_line_variables,
                               config_overrides, load_conf)
from train.launch.inputs import input_problems, resume_problems
from train.launch.memory import (AUTO_ORDER, OVERHEAD_BYTES, describe, fitting_alternatives, format_bytes, gpu_memory_bytes,
                                 job_split, job_memory, job_models, resource_plan, resource_summary)
from train.models.registry import args_for_display_name
from train.launch.rundir import ResumeError, ResumeState, RunPaths, legacy_note, resume_state, run_paths

SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a variable bash can export (not BASH_FUNC_f%%)
if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig


class PlanError(ValueError):
    """An inconsistent job (parallel sizes, missing paths); the message names the culprit."""


class SplitError(PlanError):
    """The job's GPUs do not split as asked: TP x PP vs the GPUs, EP vs dp, GBS vs MBS x dp
    (--scaling lists such node counts as refused rows)."""


def hydra_value(value) -> str:
    """A Python value as a Hydra override value (strings always quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_/.][A-Za-z0-9_./:@+%-]*", text) and text.lower() not in ("true", "false", "null")
    if plain:
        return text
    # Hydra unescapes backslashes only before a quote (and before the closing one).
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'")
    return f"'{escaped}'"


def conf_hydra_overrides(job: str, values: dict) -> list[str]:
    return [f"{key}={hydra_value(value)}" for key, value in config_overrides(job, values).items()]


def compose_config(job: str, overrides: list[str]):
    """Compose configs/<job>.yaml exactly as `python -m train.<job> overrides...` would."""
    import train.config  # noqa: F401  registers the schemas
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base=None):
        return compose(config_name=job, overrides=overrides)


# Config groups that were one key each, now plain keys: group -> (config key, conf variable).
# quant= on a fine-tuning job sets the base's recipe, lora.quantized_base.
FORMER_GROUPS = {"parallel": ("parallel.data_parallel", "DP_SHARDING"), "quant": ("quant.recipe", "QUANT_RECIPE"),
                 "model": ("model.name", "MODEL")}


def check_override_spelling(job: str, overrides: list[str], conf: str) -> None:
    """PlanError for a former group override (parallel=fsdp) naming the spelling to use instead."""
    for override in overrides:
        match = re.fullmatch(r"[+~]*(\w+)(?:@[\w.]*)?=(.*)", override, re.S)
        if not match or match.group(1) not in FORMER_GROUPS:
            continue
        group, value = match.groups()
        key, variable = FORMER_GROUPS[group]
        if job == "finetune" and group == "quant":
            key = "lora.quantized_base"
        raise PlanError(f"{conf}: override {override}: there is no {group}/ config group; "
                        f"write {key}={value} (or {variable}={value} in the conf)")


# ----------------------------------------------------------------- model facts

def model_facts(cfg: JobConfig) -> dict:
    """Experts of the model, from its HF config.json or the registry (None: unknown)."""
    hf_dir = cfg.model.hf_checkpoint
    if hf_dir and (Path(hf_dir) / "config.json").is_file():
        hf = json.loads((Path(hf_dir) / "config.json").read_text())
        return {"num_experts": int(hf.get("num_experts") or hf.get("num_local_experts") or 0),
                "source": str(Path(hf_dir) / "config.json")}
    args = args_for_display_name(str(cfg.model.name))
    if args is None:
        return {"num_experts": None, "source": None}
    return {"num_experts": int(args.num_experts or 0), "source": f"registry:{args.name}"}


def check_model_name(cfg: JobConfig, conf: str) -> None:
    """A job that builds its model from the registry needs a name the registry knows."""
    if cfg.model.hf_checkpoint:
        return
    from train.models.registry import get_model_args

    try:
        get_model_args(str(cfg.model.name))
    except ValueError as error:
        raise PlanError(f"{conf}: MODEL: {error}") from None


# ----------------------------------------------------------------- checks

def check_parallel(cfg: JobConfig, world_size: int, conf: str) -> int:
    """Returns the data-parallel size; raises PlanError on sizes that do not fit."""
    tp, pp, ep = (cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size,
                  cfg.parallel.expert_parallel_size)
    sizes = (("TP_SIZE", tp), ("PP_SIZE", pp), ("EP_SIZE", ep), ("nodes x NUM_GPUS", world_size),
             ("MBS", cfg.training.micro_batch_size), ("SEQ_LENGTH", cfg.data.seq_length))
    for name, size in sizes:
        if size < 1:
            raise PlanError(f"{conf}: {name}={size} must be at least 1")
    if world_size % (tp * pp):
        raise SplitError(f"{conf}: TP_SIZE x PP_SIZE = {tp} x {pp} = {tp * pp} does not divide the "
                        f"{world_size} GPUs of the job (nodes x NUM_GPUS)")
    data_parallel = world_size // (tp * pp)
    from train.parallel.checks import ParallelSettingsError, check_parallel_settings  # torch-free

    # Experts from the HF config.json when there is one, else the registry (None: unknown).
    experts = model_facts(cfg)["num_experts"] if ep > 1 else None
    try:
        check_parallel_settings(cfg.parallel, args_for_display_name(str(cfg.model.name)), world_size, num_experts=experts)
    except ParallelSettingsError as error:
        raise SplitError(f"{conf}: {error}") from None
    return data_parallel


def check_pipeline(job: str, cfg: JobConfig, accumulation: int, conf: str) -> None:
    """PP_SIZE > 1 (train/parallel/pipeline.py): pretraining, QAD or LoRA training (not fine-tuning's
    validate mode, which generates), and at least one micro-batch (accumulation step) per stage,
    which 1F1B needs to fill the pipeline."""
    pp = cfg.parallel.pipeline_parallel_size
    if pp == 1:
        return
    if job == "finetune" and cfg.mode != "train":
        raise PlanError(f"{conf}: PP_SIZE={pp} with mode={cfg.mode}: generation does not run on pipeline stages; "
                        "use PP_SIZE=1")
    if accumulation < pp:
        raise PlanError(f"{conf}: PP_SIZE={pp} needs at least {pp} micro-batches per step (1F1B), the plan has "
                        f"GBS / (MBS x data-parallel size) = {accumulation}; raise GBS")
    if cfg.parallel.virtual_stages > 1:
        check_interleaved(job, cfg, accumulation, conf)
    if job == "qad":
        check_pipeline_teacher(cfg, conf)


def check_interleaved(job: str, cfg: JobConfig, accumulation: int, conf: str) -> None:
    """PP_SCHEDULE=interleaved_1f1b: torch's micro-batch rounds divide the step's micro-batches;
    pretraining and LoRA training only (the QAD teacher runs inside a rank's one stage)."""
    from train.parallel.checks import interleaved_rounds_error

    pp = cfg.parallel.pipeline_parallel_size
    problem = interleaved_rounds_error(pp, accumulation)
    if problem:
        raise PlanError(f"{conf}: PP_SCHEDULE=interleaved_1f1b: {problem} (GBS / (MBS x data-parallel size) = "
                        f"{accumulation})")
    if job == "qad":
        raise PlanError(f"{conf}: PP_SCHEDULE=interleaved_1f1b with JOB=qad: the teacher is not split into "
                        "virtual stages; use PP_SCHEDULE=1f1b")


def check_pipeline_teacher(cfg: JobConfig, conf: str) -> None:
    """QAD under PP: the teacher splits into the student's stages (train/parallel/pipeline.py
    split_model: the same blocks per stage, balanced when its depth differs); a teacher the
    registry does not know is checked when the job builds it."""
    from train.models.registry import args_for_display_name
    from train.parallel.checks import ParallelSettingsError, pipeline_layers

    teacher, student = (args_for_display_name(str(name)) for name in (cfg.distill.teacher_model, cfg.model.name))
    if teacher is None:
        return
    pp = cfg.parallel.pipeline_parallel_size
    same_depth = student is not None and student.num_layers == teacher.num_layers
    try:
        pipeline_layers(teacher.num_layers, pp, cfg.parallel.pipeline_layers if same_depth else "",
                        cfg.parallel.virtual_stages)
    except ParallelSettingsError as error:
        raise PlanError(f"{conf}: the teacher TEACHER_MODEL={cfg.distill.teacher_model}: {error}") from None


def check_quant(cfg: JobConfig, job: str, conf: str) -> None:
    """QAD: the quantization recipe is one we know (QUANT_RECIPE / quant.recipe); fine-tuning:
    the base's recipe (QUANT_RECIPE / lora.quantized_base)."""
    if job not in ("qad", "finetune"):
        return
    from train.quant.recipes import RECIPES  # torch-free

    known = [*RECIPES, "none"]
    if job == "finetune":
        recipe = cfg.lora.quantized_base
        if recipe and str(recipe) not in known:
            raise PlanError(f"{conf}: QUANT_RECIPE: unknown quantization recipe {recipe!r} "
                            f"(lora.quantized_base); known: {', '.join(known)}")
        return
    if str(cfg.quant.recipe) not in known:
        raise PlanError(f"{conf}: QUANT_RECIPE: unknown quantization recipe {cfg.quant.recipe!r} "
                        f"(quant.recipe); known: {', '.join(known)}")
    if cfg.quant.calibration_batches < 0:
        raise PlanError(f"{conf}: quant.calibration_batches={cfg.quant.calibration_batches} must be >= 0")


NVFP4_BLOCK = 16  # elements per NVFP4 scale, along a Linear's input dimension
ROWWISE_QUANTIZED = {"nvfp4": ("o_proj", "down_proj"), "nvfp4_mlp_only": ("down_proj",)}  # TP's rowwise Linears


def check_quantized_tensor_parallel(job: str, cfg: JobConfig, conf: str) -> None:
    """QAD under TP_SIZE > 1: a calibrated amax (quant.calibration_batches >= 1), and each rowwise
    Linear the recipe quantizes (o_proj, a dense layer's down_proj) split into input shards of whole
    NVFP4 blocks. The workers check the built model the same way after loading
    (tensor_parallel.check_quantized_split); here it is refused before the queue."""
    tp = cfg.parallel.tensor_parallel_size
    if job != "qad" or tp == 1 or cfg.quant.recipe == "none":
        return
    if cfg.quant.calibration_batches == 0:
        raise PlanError(f"{conf}: TP_SIZE={tp} with quant.calibration_batches=0: each rank would compute its own "
                        "amax over its shard; calibrate with quant.calibration_batches >= 1")
    student = job_models(job, cfg)[0]
    if student is None:
        return
    inputs = {"o_proj": student.num_heads * student.head_dim, "down_proj": student.intermediate_size}
    dense = any(not student.is_moe_layer(index) for index in range(student.num_layers))  # experts are not TP-split
    for name in ROWWISE_QUANTIZED.get(str(cfg.quant.recipe), ()):
        if (name == "o_proj" or dense) and inputs[name] // tp % NVFP4_BLOCK:
            raise PlanError(f"{conf}: TP_SIZE={tp} splits the input of every {name} ({inputs[name]}) into shards "
                            f"of {inputs[name] // tp}, not whole NVFP4 blocks of {NVFP4_BLOCK} "
                            f"(QUANT_RECIPE={cfg.quant.recipe}): use a TP_SIZE that leaves multiples of {NVFP4_BLOCK}")


PATH_FIELDS = {  # config key -> (conf variable, must be a directory)
    "model.hf_checkpoint": ("STUDENT_CKPT or BASE_CKPT", True),
    "distill.teacher_checkpoint": ("TEACHER_CKPT", True),
    "distill.teacher_model_config": ("TEACHER_MODEL_CONFIG", False),
    "distill.kd_config_path": ("KD_CFG_PATH", False),
    "validate.val_set": ("VAL_SET", False),
}


def blend_path(cfg: JobConfig) -> str | None:
    if cfg.data.source != "blend":
        return None
    if cfg.data.blend_path:
        return str(cfg.data.blend_path)
    return str(Path(cfg.data.datacache_dir) / f"datablend_{cfg.data.dataset_name}.json")


def path_problems(cfg: JobConfig, conf: str) -> list[str]:
    """Every missing path at once: checkpoints, YAMLs, the blend and its prefixes."""
    problems = []
    for key, (variable, is_dir) in PATH_FIELDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and not (Path(value).is_dir() if is_dir else Path(value).is_file()):
            kind = "directory" if is_dir else "file"
            problems.append(f"{conf}: {variable}: {kind} {value} does not exist")
    kd_config = cfg.distill.kd_config_path
    if kd_config and Path(kd_config).is_file():
        from train.distill.kd_config import KDConfigError, load_kd_config  # torch-free

        try:
            load_kd_config(str(kd_config))
        except KDConfigError as error:
            problems.append(f"{conf}: {error}")
    blend = blend_path(cfg)
    if blend and not Path(blend).is_file():
        problems.append(f"{conf}: BLEND_PATH: datablend {blend} does not exist "
                        f"(DATASET_NAME={cfg.data.dataset_name}, DATACACHE_DIR={cfg.data.datacache_dir})")
    elif blend:
        problems.extend(blend_content_problems(blend, conf))
    return problems


def blend_content_problems(blend: str, conf: str) -> list[str]:
    try:
        from train.data.blend import load_blend
    except ImportError:
        return []
    try:
        load_blend(blend)
    except ValueError as error:
        return [f"{conf}: BLEND_PATH: {error}"]
    return []


def default_train_samples(cfg: JobConfig, blend: str | None) -> int | None:
    if cfg.data.train_samples:
        return int(cfg.data.train_samples)
    if blend is None or not Path(blend).is_file():
        return None
    from train.data.blend import train_samples_for_blend

    try:
        return int(train_samples_for_blend(blend, cfg.data.seq_length))
    except ValueError as error:  # DataError: no train split, unreadable .idx, ...
        raise PlanError(f"BLEND_PATH: {error}") from None


# ----------------------------------------------------------------- the plan

@dataclass
class JobPlan:
    job: str
    conf: str
    cluster: cluster_lib.ClusterEnv
    paths: RunPaths
    resume: ResumeState
    data_parallel_size: int
    global_batch_size: int
    train_iters: int | None
    train_samples: int | None
    blend_path: str | None
    model_facts: dict
    path_problems: list[str] = field(default_factory=list)
    node_commands: list[list[str]] = field(default_factory=list)
    parallel: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)  # memory per GPU and time (train/launch/memory.py)
    config_fingerprint: str = ""  # config_fingerprint(cfg): workers refuse a plan made for another config
    # What sourcing the conf changed in the environment ({name: value, or None: unset}); the launcher
    # exports it to the workers. Never written to the plan file: it may hold HF_TOKEN.
    conf_environment: dict = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> str:
        """The plan file (TRAIN_PLAN_FILE): every field but conf_environment, paths as strings."""
        data = dataclasses.asdict(self)
        del data["conf_environment"]
        return json.dumps(data, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> "JobPlan":
        data = json.loads(text)
        return cls(**{**data, "cluster": cluster_lib.ClusterEnv(**data["cluster"]),
                      "paths": RunPaths.from_dict(data["paths"]),
                      "resume": ResumeState(**{**data["resume"], "skipped": tuple(data["resume"]["skipped"])})})

    def as_dict(self) -> dict:
        return {
            "job": self.job, "conf": self.conf, "cluster": self.cluster.as_dict(),
            "world_size": self.cluster.world_size, "data_parallel_size": self.data_parallel_size,
            "run_dir": str(self.paths.run_dir), "paths": self.paths.as_dict(),
            "resume": self.resume.as_dict(), "blend_path": self.blend_path,
            "train_samples": self.train_samples, "train_iters": self.train_iters,
            "global_batch_size": self.global_batch_size, "model": self.model_facts,
            "parallel": self.parallel, "resources": self.resources,
            "path_problems": self.path_problems, "config_fingerprint": self.config_fingerprint,
            "node_commands": [shlex.join(c) for c in self.node_commands],
        }


# The smallest value of each count and interval (train/config.py says what a 0 means where 0 is
# allowed: "off", "no periodic saves", "the default"); None and unset keys are not checked. The
# optimizer's values: train/launch/inputs.py OPTIM_BOUNDS.
MINIMUMS = {"training.micro_batch_size": 1, "training.global_batch_size": 0, "training.train_iters": 0,
            "training.log_interval": 1, "training.eval_interval": 0, "training.eval_iters": 1,
            "training.max_bad_iterations": 0, "training.time_budget_s": 0, "training.early_stop_patience": 0,
            "data.seq_length": 1, "data.train_samples": 0, "checkpoint.save_interval": 0,
            "checkpoint.save_interval_s": 0, "checkpoint.keep_last": 0, "checkpoint.keep_every": 0,
            "checkpoint.max_failed_saves": 1, "parallel.timeout_s": 1, "distill.chunk_size": 1, "lora.rank": 1,
            "validate.max_new_tokens": 1, "validate.batch_size": 1}


def check_minimums(cfg: JobConfig, conf: str) -> None:
    """Every MINIMUMS key at or above its minimum: one line per value below it, naming the conf
    variable (when one sets the key) and the key. Before this, SAVE_INTERVAL=0 or LOG_INTERVAL=0
    passed the plan and ended the job with a ZeroDivisionError after its first step."""
    variables = {variable.key: name for name, variable in CONF_VARIABLES.items() if variable.key}
    problems = []
    for key, minimum in MINIMUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < minimum:
            setting = f"{variables[key]}={value} ({key})" if key in variables else f"{key}={value}"
            problems.append(f"{conf}: {setting} must be at least {minimum}")
    if problems:
        raise PlanError("\n".join(problems))


WANDB_MODES = ("", "online", "offline", "disabled")  # "": wandb's default


def check_logging(cfg: JobConfig, conf: str) -> None:
    if cfg.logging.wandb_mode not in WANDB_MODES:
        raise PlanError(f"{conf}: WANDB_MODE={cfg.logging.wandb_mode!r} (logging.wandb_mode) is not one of "
                        "online, offline, disabled")


def build_plan(job: str, cfg: JobConfig, env: dict[str, str], conf: str, cluster: cluster_lib.ClusterEnv,
               strict_paths: bool = True) -> JobPlan:
    check_model_name(cfg, conf)
    check_minimums(cfg, conf)
    check_logging(cfg, conf)
    data_parallel = check_parallel(cfg, cluster.world_size, conf)
    check_quant(cfg, job, conf)
    check_quantized_tensor_parallel(job, cfg, conf)
    problems = path_problems(cfg, conf)
    if not problems:  # the files are there: their contents, and the values checked against them
        problems = [f"{conf}: {problem}" for problem in input_problems(job, cfg, blend_path(cfg))]
    if problems and strict_paths:
        raise PlanError("\n".join(problems))
    mbs = cfg.training.micro_batch_size
    gbs = cfg.training.global_batch_size or mbs * data_parallel
    if gbs % (mbs * data_parallel):
        raise SplitError(f"{conf}: GBS={gbs} is not a multiple of MBS x data-parallel size = "
                        f"{mbs} x {data_parallel}")
    check_pipeline(job, cfg, gbs // (mbs * data_parallel), conf)
    blend = blend_path(cfg)
    samples = default_train_samples(cfg, blend) if not problems else cfg.data.train_samples
    iters = cfg.training.train_iters or (samples // gbs if samples else None)
    if iters is not None and iters < 1:
        raise PlanError(f"{conf}: TRAIN_SAMPLES={samples} gives no full global batch of {gbs}")
    paths = run_paths(job, model=str(cfg.model.name), dataset=str(cfg.data.dataset_name), lr=cfg.optim.lr,
                      root=cfg.checkpoint.root, teacher=cfg.distill.teacher_model, env=env)
    try:
        resume = resume_state(paths.checkpoints, cfg.model.hf_checkpoint)
    except ResumeError as error:
        raise PlanError(f"{conf}: {error}") from None
    mismatch = [f"{conf}: {problem}" for problem in resume_problems(job, cfg, resume, gbs)]
    if job == "finetune" and str(cfg.mode) == "validate" and resume.decision != "resume":
        mismatch.append(f"{conf}: mode=validate: no checkpoint in {paths.checkpoints} (MODE=validate; run "
                        "MODE=train with the same conf first, or point checkpoint.root at the training run's root)")
    if mismatch and strict_paths:
        raise PlanError("\n".join(mismatch))
    problems += mismatch
    facts = model_facts(cfg)
    try:
        resources = resource_plan(job, cfg, env, cluster.world_size, data_parallel, gbs, iters, REPO_ROOT / "slurm",
                                  cluster.procs_per_node)
    except ValueError as error:  # GPU_TYPE not in the table, an unreadable time limit
        raise PlanError(f"{conf}: {error}") from None
    return JobPlan(job, conf, cluster, paths, resume, data_parallel, gbs, iters, samples, blend,
                   facts, problems, parallel=parallel_layout(cfg, data_parallel, facts["num_experts"]),
                   resources=resources, config_fingerprint=config_fingerprint(cfg))


def config_fingerprint(cfg: JobConfig) -> str:
    """sha256 of the resolved config the job trains with, KD_CFG_PATH merged into distill as the
    QAD entrypoint merges it before start_job (merging twice changes nothing). 16 hex digits."""
    from omegaconf import OmegaConf

    from train.distill.kd_config import KDConfigError, apply_kd_config  # torch-free

    # a plain copy (the caller's stays): of the typed JobConfig or of a composed DictConfig alike
    cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    try:
        if "distill" in cfg:
            apply_kd_config(cfg.distill)
    except KDConfigError:  # a path problem the plan reports (--dry-run); a real start stops there
        pass
    return hashlib.sha256(OmegaConf.to_yaml(cfg).encode()).hexdigest()[:16]


def write_plan_file(plan: JobPlan) -> Path:
    """The launcher's plan for its workers, written whole (temporary file, then rename). Manual
    multi-node: every node's launcher writes the same plan (its node rank aside) to the same name."""
    path = plan.paths.plan_file
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(plan.to_json())
    partial.replace(path)
    return path


def parallel_layout(cfg: JobConfig, data_parallel: int, num_experts: int | None) -> dict:
    """How the ranks split: TP inside a node, EP over data-parallel ranks (Megatron's layout).

    expert_data_parallel: ranks holding the same experts (dp / EP); experts_per_rank: E / EP.
    """
    parallel = cfg.parallel
    ep = parallel.expert_parallel_size
    layout = {"tensor_parallel": parallel.tensor_parallel_size, "pipeline_parallel": parallel.pipeline_parallel_size,
              "data_parallel": data_parallel, "data_parallel_strategy": str(parallel.data_parallel),
              "expert_parallel": ep}
    if num_experts:
        layout.update(expert_data_parallel=data_parallel // ep, experts_per_rank=num_experts // ep)
    return layout


def node_command(job: str, cluster: cluster_lib.ClusterEnv, node_rank: int, overrides: list[str]) -> list[str]:
    return ["torchrun", f"--nnodes={cluster.nnodes}", f"--node-rank={node_rank}",
            f"--nproc-per-node={cluster.procs_per_node}", "--rdzv-backend=static",
            f"--rdzv-endpoint={cluster.master_addr}:{cluster.master_port}",
            "--max-restarts=0", "-m", f"train.{job}", *overrides]


def plan_from_conf(job: str, config: str, user_overrides: list[str], env: dict[str, str],
                   nnodes: int | None = None, strict_paths: bool = True) -> tuple[JobPlan, list[str], list[str]]:
    """Source the conf, compose the config, check everything. Returns (plan, overrides, warnings).
    user_overrides: Hydra `key=value`s and conf variables `VAR=value` (these win over the conf)."""
    base_env = env
    command_line, user_overrides = command_line_variables(list(user_overrides), config)
    path, env, values, warnings = load_conf(config, job, env, command_line)
    cluster = cluster_lib.detect(env, int(values["NUM_GPUS"]))
    if nnodes is not None:  # at submission time: the nodes the job will get
        cluster = cluster_lib.ClusterEnv("slurm", nnodes, 0, "<first node>", cluster.master_port,
                                         cluster.procs_per_node, None)
    check_override_spelling(job, user_overrides, str(path))
    overrides = conf_hydra_overrides(job, values) + list(user_overrides)
    from train.config import to_job_config

    try:  # typed once, as the entrypoints do: a `???` left or a wrong type fails here
        cfg = to_job_config(compose_config(job, overrides))
    except Exception as error:  # Hydra's and omegaconf's messages name the bad key or value
        raise PlanError(f"{path}: the config does not compose: {error}") from None
    if cfg.parallel.data_parallel == "auto":  # the workers get the chosen strategy as an override
        cfg.parallel.data_parallel = choose_data_parallel(job, cfg, env, cluster.world_size, str(path))
        overrides.append(f"parallel.data_parallel={cfg.parallel.data_parallel}")
    plan = build_plan(job, cfg, env, str(path), cluster, strict_paths)
    plan.conf_environment = environment_changes(base_env, env)
    from train.parallel.checks import ParallelSettingsError, check_engine_support  # torch-free

    try:  # a valid plan this engine cannot run (EP with ZeRO-1): refused, listed by --dry-run
        check_engine_support(cfg.parallel)
    except ParallelSettingsError as error:
        if strict_paths:
            raise PlanError(f"{path}: {error}") from None
        warnings.append(f"{path}: {error} (planned; a real start stops here)")
    plan.node_commands = [node_command(job, cluster, rank, overrides) for rank in range(cluster.nnodes)]
    problem = memory_problem(job, cfg, plan, str(path))
    if problem and strict_paths and env.get("MEMORY_CHECK", "1").lower() not in ("0", "false", "no"):
        raise PlanError(problem)
    run_dir_notes = legacy_note(plan.paths, job) + [f"skipping damaged checkpoint {damaged}; resuming from "
                                                    f"{plan.resume.path}" for damaged in plan.resume.skipped]
    return plan, overrides, (warnings + run_dir_notes + master_weight_warnings(cfg, str(path))
                             + ([problem] if problem else []))


def environment_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, str | None]:
    """{name: new value, or None where the conf unset it}, for the variables bash can export."""
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    changed.update((k, None) for k in before if k not in after)
    return {k: v for k, v in sorted(changed.items()) if SHELL_NAME.fullmatch(k)}


def choose_data_parallel(job: str, cfg: JobConfig, env: dict[str, str], world_size: int, conf: str) -> str:
    """DP_SHARDING=auto: the fastest strategy (AUTO_ORDER) this layout allows whose plan fits the GPU."""
    try:
        _, capacity = gpu_memory_bytes(env)
    except ValueError as error:  # GPU_TYPE not in the table
        raise PlanError(f"{conf}: {error}") from None
    models = job_models(job, cfg)
    for strategy in AUTO_ORDER:
        cfg.parallel.data_parallel = strategy
        try:
            data_parallel = check_parallel(cfg, world_size, conf)
        except PlanError:  # e.g. TP with DDP, EP with ZeRO-1
            continue
        memory = job_memory(job, cfg, job_split(cfg, data_parallel), models)
        if memory is None or memory["total"] <= capacity:
            return strategy
    return "fsdp"  # the leanest; the memory check then says what else would make it fit


def memory_problem(job: str, cfg: JobConfig, plan: JobPlan, conf: str) -> str | None:
    """A plan over the GPU's memory: the breakdown and the single knobs that would make it fit."""
    resources = plan.resources
    if resources["fits"]:
        return None
    capacity = resources["gpu_memory_bytes"]
    memory = resources["memory_per_gpu_bytes"]
    if memory.get("initialization", 0.0) + OVERHEAD_BYTES > capacity:  # FSDP2, TP, EP split it only after
        hint = ("; the fp32 model is initialized whole on every GPU before FSDP2, TP or EP split it: split it "
                "into pipeline stages (PP_SIZE: each stage initializes its own blocks) or start from HF weights "
                "(model.hf_checkpoint: each rank reads its part)")
    else:
        knobs = fitting_alternatives(job, cfg, plan.cluster.world_size, capacity)
        hint = f"; fits with {' or '.join(knobs)}" if knobs else "; no single knob fits: combine DP_SHARDING=fsdp, " \
            "ACTIVATION_CHECKPOINTING=1, a smaller MBS, a larger TP_SIZE or more nodes"
    return (f"{conf}: the plan needs more memory than the GPU has: "
            f"{describe(memory, capacity, resources['gpu'])}{hint} "
            "(GPU_TYPE / GPU_MEMORY_GB name the GPU; MEMORY_CHECK=0 starts anyway)")


# A typical weight of a trained LLM linear layer (|w| ~ 0.01-0.05) and the smallest update bf16 keeps
# on it: with 8 significant bits, values in [2^-6, 2^-5) are 2^-13 apart, and an update under half of
# that (2^-14 = 6.1e-5) rounds back to w. AdamW's update per element is about LR.
TYPICAL_WEIGHT = 0.02
BF16_SMALLEST_UPDATE = 2.0 ** (math.floor(math.log2(TYPICAL_WEIGHT)) - 8)


def master_weight_warnings(cfg: JobConfig, conf: str) -> list[str]:
    """model.param_dtype=bfloat16 (no fp32 master weights) with an LR that bf16 rounds away."""
    lr = float(cfg.optim.lr)
    if cfg.model.param_dtype != "bfloat16" or lr >= BF16_SMALLEST_UPDATE:
        return []
    return [f"{conf}: model.param_dtype=bfloat16 with LR {lr:g}: bf16 weights of magnitude ~{TYPICAL_WEIGHT} "
            f"move only by steps over {BF16_SMALLEST_UPDATE:.1e}, so most updates round away and the run "
            "barely learns; drop model.param_dtype (fp32 master weights, the default) or raise LR"]


def shell_exports(plan: JobPlan, overrides: list[str], plan_file: Path | None = None) -> str:
    """Assignments for launchers/lib.sh (eval'd); values shell-quoted. Then the conf's variables,
    exported as sourcing the conf with `set -a` would (the launcher no longer sources it again)."""
    values = {
        "CONF_PATH": plan.conf, "RUN_DIR": plan.paths.run_dir, "RUN_NAME": plan.paths.run_name,
        "CHECKPOINT_ROOT": plan.paths.root, "SLURM_LOG": plan.paths.slurm_log,
        "SLURM_ERR": plan.paths.slurm_err, "ENV_LOG": plan.paths.env_log,
        "NNODES": plan.cluster.nnodes, "NUM_GPUS": plan.cluster.procs_per_node,
        "MASTER_ADDR": plan.cluster.master_addr, "MASTER_PORT": plan.cluster.master_port,
        "RUN_DATETIME": plan.paths.datetime,
        "RESUME_DECISION": plan.resume.decision, "RESUME_ITERATION": plan.resume.iteration,
        "PLAN_NODE_RANK": plan.cluster.node_rank,  # node 0's launcher takes the run lock
    }
    if plan_file is not None:
        values["TRAIN_PLAN_FILE"] = plan_file
    lines = [f"{k}={shlex.quote(str(v))}" for k, v in values.items()]
    lines.append("TRAIN_OVERRIDES=(" + " ".join(shlex.quote(o) for o in overrides) + ")")
    lines += [f"unset {k}" if v is None else f"export {k}={shlex.quote(v)}" for k, v in plan.conf_environment.items()]
    return "\n".join(lines)


def preprocess_plan(overrides: list[str]) -> dict:
    """The preprocessing job: its composed config (every ??? given) and command line."""
    from omegaconf import OmegaConf

    cfg = compose_config("preprocess", overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise PlanError(f"preprocess: give {', '.join(f'{key}=...' for key in missing)} after --")
    return {"job": "preprocess", "config": OmegaConf.to_container(cfg),
            "node_commands": [shlex.join(["python", "-m", "train.preprocess", *overrides])]}


def node_counts(text: str) -> list[int]:
    """--scaling 1,2,4,8: node counts, each at least 1."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--scaling {text!r}: give node counts, e.g. 1,2,4,8")
    return counts


def scaling_table(job: str, config: str, overrides: list[str], env: dict[str, str], counts: list[int]) -> str:
    """The plan at each node count, a Markdown table under a line saying what stays fixed. GBS
    stays the first planned row's (a conf without GBS would otherwise grow it with dp), so the
    accumulation shrinks as dp grows; a node count the GPUs do not split for (GBS vs MBS x dp,
    EP vs dp, TP vs the GPUs) is a row saying why."""
    lines, first = [], None
    for nodes in counts:
        pinned = [f"GBS={first.global_batch_size}"] if first else []
        try:
            plan, _, _ = plan_from_conf(job, config, overrides + pinned, env, nodes, strict_paths=False)
        except SplitError as error:
            reason = str(error).split(": ", 1)[-1]
            lines.append(f"| {nodes} | - | refused: {reason} |" + " |" * 7)
            continue
        first = first or plan
        lines.append(scaling_row(nodes, plan))
    head = ["| nodes | GPUs | dp (strategy) | accumulation | memory/GPU | step s | compute s | communication s "
            "| tokens/s | wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    if first is None:
        return "\n".join(head + lines)
    resources, link = first.resources, first.resources.get("communication") or {}
    caption = (f"{first.conf}: GBS {first.global_batch_size} x {resources['tokens_per_step'] // first.global_batch_size}"
               f" tokens = {resources['tokens_per_step']:,} tokens a step at every node count; "
               f"{first.cluster.procs_per_node} GPUs a node ({resources['gpu']}, MFU "
               f"{(resources.get('time') or {}).get('assumed_mfu', '-')}); ")
    if link:
        caption += (f"intra-node {link['intra_node_gbps']:g} GB/s, inter-node {link['inter_node_gbps']:g} GB/s, "
                    f"{link['overlap']:g} of the communication overlapped")
    return "\n".join([caption, ""] + head + lines)


def scaling_row(nodes: int, plan: JobPlan) -> str:
    resources, layout = plan.resources, plan.parallel
    time = resources.get("time") or {}
    memory = resources["memory_per_gpu_bytes"]
    fits = "" if resources["fits"] else " (over)"
    seconds = [f"{time[key]:.3g}" if key in time else "-" for key in ("step_s", "compute_s", "communication_s")]
    speed = f"{resources['tokens_per_step'] / time['step_s']:,.0f}" if "step_s" in time else "-"
    wall = f"{time['wall_s'] / 3600:.1f} h" if "wall_s" in time else "- (no TRAIN_ITERS)"
    return (f"| {nodes} | {plan.cluster.world_size} | {layout['data_parallel']} ({layout['data_parallel_strategy']}) | "
            f"{resources['accumulation_steps']} | {format_bytes(memory['total']) if memory else '-'}{fits} | "
            f"{' | '.join(seconds)} | {speed} | {wall} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.launch.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True, choices=["qad", "pretrain", "finetune", "preprocess"])
    parser.add_argument("--config", help="the .conf (not used by preprocess)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan as JSON")
    parser.add_argument("--nodes", type=int, help="nodes the job will get (submission time)")
    parser.add_argument("--format", choices=["json", "shell"], default="json")
    parser.add_argument("--write-plan", action="store_true",
                        help="write the plan to <run dir>/plans/ for the workers (TRAIN_PLAN_FILE)")
    parser.add_argument("--scaling", type=node_counts, metavar="NODES",
                        help="with --dry-run: a table of step time, tokens/s and wall time at these node counts "
                             "(e.g. 1,2,4,8), GBS fixed")
    parser.add_argument("overrides", nargs="*", help="Hydra key=value overrides (after --)")
    args = parser.parse_args(argv)
    if args.job == "preprocess":
        try:
            print(json.dumps(preprocess_plan(args.overrides), indent=2))
        except Exception as error:  # Hydra's message names the bad key
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    if not args.config:
        parser.error("--config is required")
    if args.scaling and not args.dry_run:
        parser.error("--scaling needs --dry-run")
    if args.scaling:
        try:
            print(scaling_table(args.job, args.config, args.overrides, dict(os.environ), args.scaling))
        except (ConfError, PlanError, cluster_lib.ClusterError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    try:
        plan, overrides, warnings = plan_from_conf(args.job, args.config, args.overrides, dict(os.environ),
                                                   args.nodes, strict_paths=not args.dry_run)
    except (ConfError, PlanError, cluster_lib.ClusterError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for message in warnings + plan.path_problems:
        print(f"warning: {message}", file=sys.stderr)
    print(f"plan: {resource_summary(plan.resources)}", file=sys.stderr)
    plan_file = write_plan_file(plan) if args.write_plan and not args.dry_run else None
    if args.format == "shell":
        print(shell_exports(plan, overrides, plan_file))
    else:
        print(json.dumps(plan.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
