"""The job's input files and values, checked at plan time (train/launch/plan.py) without torch and
without reading any tensor data: what would otherwise fail only inside the workers, after torchrun.

- data: every prefix of the datablend, each split: its .bin's size against what its .idx says;
- HF checkpoints (STUDENT_CKPT / BASE_CKPT, TEACHER_CKPT): config.json there, readable, of a
  supported model_type and shape; every *.safetensors: its header parses and its tensors end
  where the file does (8 + header + data bytes);
- SEQ_LENGTH: at most the model's max_position_embeddings (n_positions, the registry's max_seq_len);
- the optimizer's values: those torch's AdamW refuses, and a negative warmup or clipping norm;
- fine-tuning's validate mode: the labeled set and a tokenizer with a chat template;
- a resume: the checkpoint's job type, GBS and SEQ_LENGTH (its run.json) are this job's.

Each returns the problems as messages naming the file or the variable.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from train.launch.rundir import RUN_FACTS_FILE, ResumeState

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig

HF_CHECKPOINTS = (("model", "hf_checkpoint", "STUDENT_CKPT or BASE_CKPT"),
                  ("distill", "teacher_checkpoint", "TEACHER_CKPT"))


def data_problems(blend: str) -> list[str]:
    """Every prefix of the blend whose .idx is unreadable or whose .bin's size is not the index's."""
    from train.data.blend import load_blend
    from train.data.errors import DataError
    from train.data.indexed import IndexedDataset

    problems = []
    for prefix in sorted(set(load_blend(blend).prefixes())):  # every split's
        try:
            IndexedDataset(prefix)  # maps the .idx, compares the .bin's size; reads no token
        except DataError as error:
            problems.append(f"BLEND_PATH: {error}")
    return problems


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file's layout: u64 header length, JSON header, then the tensors' bytes, the
    last data_offsets end being the data's size. None when consistent."""
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            (header_bytes,) = struct.unpack("<Q", file.read(8))
            if 8 + header_bytes > size:
                return f"{path}: header of {header_bytes} bytes runs past the file's {size} bytes (truncated?)"
            header = json.loads(file.read(header_bytes))
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                       default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        return f"{path}: not a safetensors file (header unreadable: {error})"
    if 8 + header_bytes + data_end != size:
        return (f"{path}: {size} bytes, its header says {8 + header_bytes + data_end} "
                f"(8 + {header_bytes} header + {data_end} tensor bytes): truncated or damaged")
    return None


def hf_max_positions(directory: str, variable: str) -> tuple[int | None, list[str]]:
    """(the model's maximum sequence length, problems) of an HF checkpoint directory."""
    from train.models.errors import ModelConfigError
    from train.models.hf_adapters import args_from_hf_config

    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        return None, [f"{variable}: {directory} has no config.json (not an HF checkpoint directory?)"]
    problems = [f"{variable}: {problem}" for path in sorted(Path(directory).glob("*.safetensors"))
                if (problem := safetensors_problem(path))]
    try:
        config = json.loads(config_path.read_text())
        args = args_from_hf_config(config, str(config_path))
    except (OSError, ValueError) as error:  # JSONDecodeError, ModelConfigError
        return None, [f"{variable}: {error if isinstance(error, ModelConfigError) else f'{config_path}: {error}'}"] \
            + problems
    except (KeyError, TypeError) as error:
        return None, [f"{variable}: {config_path}: missing or malformed key {error}"] + problems
    return args.max_seq_len, problems


def hf_checkpoints(cfg: JobConfig) -> dict[str, str]:
    """{existing HF checkpoint directory: its conf variable(s)}; a student that is its teacher once."""
    found: dict[str, list[str]] = {}
    for section, key, variable in HF_CHECKPOINTS:
        directory = getattr(getattr(cfg, section, None), key, None)
        if directory and Path(directory).is_dir():  # else: not this job's, or missing (path_problems)
            found.setdefault(str(directory), []).append(variable)
    return {directory: " and ".join(variables) for directory, variables in found.items()}


def model_problems(cfg: JobConfig) -> list[str]:
    """The HF checkpoints' files and SEQ_LENGTH against each model's maximum."""
    from train.models.registry import args_for_display_name

    problems = []
    seq_length = cfg.data.seq_length
    for directory, variable in hf_checkpoints(cfg).items():
        maximum, found = hf_max_positions(directory, variable)
        problems += found
        if maximum is not None and seq_length > maximum:
            problems.append(f"SEQ_LENGTH={seq_length} is above the model's maximum {maximum} "
                            f"(max_position_embeddings in {Path(directory) / 'config.json'}, {variable})")
    if not cfg.model.hf_checkpoint:
        args = args_for_display_name(str(cfg.model.name))
        if args is not None and seq_length > args.max_seq_len:
            problems.append(f"SEQ_LENGTH={seq_length} is above the model's maximum {args.max_seq_len} "
                            f"(max_seq_len of {args.name} in train/models/registry.py, MODEL)")
    return problems


# (config key, conf variable or None, the condition it must meet, its words); AdamW's own checks and more
OPTIM_BOUNDS = (("lr", "LR", lambda v: v >= 0, ">= 0"), ("min_lr", "MIN_LR", lambda v: v >= 0, ">= 0"),
                ("warmup_iters", "WARMUP_ITERS", lambda v: v >= 0, ">= 0"),
                ("weight_decay", None, lambda v: v >= 0, ">= 0"), ("eps", None, lambda v: v >= 0, ">= 0"),
                ("beta1", None, lambda v: 0 <= v < 1, "in [0, 1)"), ("beta2", None, lambda v: 0 <= v < 1, "in [0, 1)"),
                ("grad_clip", None, lambda v: v >= 0, ">= 0 (0: no clipping)"))


def optim_problems(cfg: JobConfig) -> list[str]:
    problems = []
    for key, variable, valid, words in OPTIM_BOUNDS:
        value = getattr(cfg.optim, key)
        if not valid(value):
            name = f"{variable}={value} (optim.{key})" if variable else f"optim.{key}={value}"
            problems.append(f"{name} must be {words}")
    return problems


def validate_mode_problems(cfg: JobConfig) -> list[str]:
    """Fine-tuning, mode=validate: the labeled set (VAL_SET) and a tokenizer with a chat template."""
    if str(cfg.mode) != "validate":
        return []
    from train.labeled_set import LabeledSetError, check_validate_inputs

    try:
        check_validate_inputs(cfg)
    except LabeledSetError as error:
        return [str(error)]
    return []


def input_problems(job: str, cfg: JobConfig, blend: str | None) -> list[str]:
    """Every problem of the job's inputs (missing paths are path_problems' and skipped here)."""
    problems = optim_problems(cfg) + model_problems(cfg)
    if blend and Path(blend).is_file():
        problems += data_problems(blend)
    if job == "finetune":
        problems += validate_mode_problems(cfg)
    return problems


def saved_run_facts(checkpoint: Path) -> dict | None:
    """The checkpoint's run.json; for one saved before run.json, what its config.yaml tells
    (SEQ_LENGTH, and GBS when it was set); None when neither is readable."""
    try:
        return json.loads((checkpoint / RUN_FACTS_FILE).read_text())
    except (OSError, ValueError):
        pass
    import yaml

    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
        return {"seq_length": saved["data"]["seq_length"], "global_batch_size": saved["training"]["global_batch_size"]}
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def resume_problems(job: str, cfg: JobConfig, resume: ResumeState, global_batch_size: int) -> list[str]:
    """A resume keeps the job type, GBS and SEQ_LENGTH of the run: its consumed samples count
    sequences of that length in batches of that size (refused, not adapted: docs/runs.md).
    Evaluating a checkpoint (EVAL_ONLY, MODE=validate) keeps the job type only."""
    facts = saved_run_facts(Path(resume.path)) if resume.decision == "resume" and resume.path else None
    if not facts:
        return []
    if facts.get("job", job) != job:
        return [f"{resume.path} was saved by a {facts['job']} job, this is a {job} job: a run directory holds "
                "one job type (use another checkpoint.root or run name)"]
    if cfg.training.eval_only or str(cfg.mode) == "validate":
        return []  # it only reads the checkpoint: no samples consumed, any batch shape will do
    now = {"global_batch_size": ("GBS", global_batch_size), "seq_length": ("SEQ_LENGTH", cfg.data.seq_length)}
    changed = [f"{variable}={facts[key]} at save, {value} now" for key, (variable, value) in now.items()
               if facts.get(key) is not None and facts[key] != value]
    if not changed:
        return []
    mbs = cfg.training.micro_batch_size
    default = (f"; GBS is unset, so MBS x data-parallel size: {mbs} x {global_batch_size // mbs} now, "
               f"{facts['micro_batch_size']} x {facts['data_parallel_size']} at save"
               if cfg.training.global_batch_size is None and "data_parallel_size" in facts
               and facts["global_batch_size"] != global_batch_size else "")
    return [f"resuming {resume.path} with another batch shape: {'; '.join(changed)}{default}. The consumed "
            "samples count batches of the saved shape: set the values back (GBS may stay fixed while MBS "
            "changes), or start a new run (another checkpoint.root or run name)"]
