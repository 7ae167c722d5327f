"""The run directory (docs/runs.md), its file names, and the resume decision.

    $QAD_CHECKPOINT_ROOT/
    ├── <run name>/            RUN_DIR_QAD or RUN_DIR in logs_templates/names.conf
    │   ├── checkpoints/<model>/iter_0000200/ ... latest_checkpointed_iteration.txt
    │   ├── tensorboard/<model>/
    │   ├── logs/
    │   └── plans/plan_<datetime>_<jobid>.json   the launcher's plan, read by every worker
    └── logs_slurm/

Resume rule: the tracker file exists -> resume everything from the iteration it names;
otherwise start from the initial checkpoint's weights (fresh optimizer), or from scratch.
The tracker is written last, after a checkpoint is complete (train/checkpoint.py).
Stdlib only.
"""

import socket
import string
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from train.launch.conf import REPO_ROOT

TEMPLATES_DIR = REPO_ROOT / "logs_templates"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron's name


def checkpoint_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"  # Megatron's name


class ResumeError(RuntimeError):
    """The tracker file names a checkpoint that is not there, or is unreadable."""


def load_templates(path: Path = TEMPLATES_DIR / "names.conf") -> dict[str, str]:
    templates = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            templates[key.strip()] = value.strip()
    return templates


def format_lr(lr: float | str) -> str:
    """1e-06 -> '1e-6', 0.0003 -> '0.0003': how people write LR in their confs."""
    return f"{float(lr):g}".replace("e-0", "e-").replace("e+0", "e+")


def job_datetime(env: dict[str, str], fmt: str) -> str:
    """One timestamp per job start: the launcher exports RUN_DATETIME to every node."""
    return env.get("RUN_DATETIME") or time.strftime(fmt)


@dataclass(frozen=True)
class RunPaths:
    datetime: str  # the job's start, shared by every node (RUN_DATETIME)
    root: Path
    run_name: str
    run_dir: Path
    checkpoints: Path
    tensorboard: Path
    train_log: Path
    metrics_log: Path
    env_log: Path
    resolved_config: Path
    slurm_log: Path
    slurm_err: Path
    plan_file: Path  # the launcher's plan for the workers (TRAIN_PLAN_FILE)

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> "RunPaths":
        """as_dict() read back (the plan file)."""
        return cls(**{f.name: Path(data[f.name]) if f.type is Path else data[f.name] for f in fields(cls)})

    def create(self) -> None:
        """Safe when every node does it at once: mkdir -p semantics, nothing else."""
        for directory in (self.checkpoints, self.tensorboard, self.train_log.parent):
            directory.mkdir(parents=True, exist_ok=True)


def run_paths(job: str, *, model: str, dataset: str, lr: float | str, root: str | Path,
              teacher: str | None, env: dict[str, str]) -> RunPaths:
    templates = load_templates()
    fields = {
        "student": model, "teacher": teacher or "", "model": model, "dataset": dataset,
        "lr": format_lr(lr), "job": job,
        "datetime": job_datetime(env, templates["DATETIME_FORMAT"]),
        "account": env.get("SLURM_JOB_ACCOUNT") or "local",
        "jobname": env.get("SLURM_JOB_NAME") or job,
        "jobid": env.get("SLURM_JOB_ID") or "nojob",
    }

    def fill(key: str) -> str:
        return string.Template(templates[key]).substitute(fields)

    root = Path(root).absolute()
    run_name = fill("RUN_DIR_QAD" if job == "qad" else "RUN_DIR")
    run_dir = root / run_name
    return RunPaths(fields["datetime"], root, run_name, run_dir, run_dir / fill("CHECKPOINTS"), run_dir / fill("TENSORBOARD"),
                    run_dir / fill("TRAIN_LOG"), run_dir / fill("METRICS_LOG"), run_dir / fill("ENV_LOG"),
                    run_dir / fill("RESOLVED_CONFIG"), root / fill("SLURM_LOG"), root / fill("SLURM_ERR"),
                    run_dir / fill("PLAN_FILE"))


@dataclass(frozen=True)
class ResumeState:
    decision: str  # resume | from_checkpoint | from_scratch
    iteration: int  # iteration to start after (0 unless resuming)
    path: str | None  # checkpoint directory (resume) or initial weights

    def as_dict(self) -> dict:
        return asdict(self)


def read_tracker(checkpoints: Path) -> int | None:
    tracker = checkpoints / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise ResumeError(f"{tracker}: expected an iteration number, found {text!r}") from None


def resume_state(checkpoints: Path, initial_checkpoint: str | None) -> ResumeState:
    iteration = read_tracker(checkpoints)
    if iteration is not None:
        directory = checkpoints / checkpoint_dir_name(iteration)
        if not directory.is_dir():
            raise ResumeError(f"{checkpoints / TRACKER_FILE} names iteration {iteration}, "
                              f"but {directory} does not exist")
        return ResumeState("resume", iteration, str(directory))
    if initial_checkpoint:
        return ResumeState("from_checkpoint", 0, initial_checkpoint)
    return ResumeState("from_scratch", 0, None)


def env_log_text(job: str, conf: str, env: dict[str, str], jobid: str, datetime: str) -> str:
    """The env log: a header from logs_templates/ and every variable, secrets redacted."""
    from train.launch.conf import redact

    header = string.Template((TEMPLATES_DIR / "env_log_header.txt").read_text()).substitute(
        job=job, jobid=jobid, datetime=datetime, host=socket.gethostname(), conf=conf)
    body = "".join(f"{k}={v}\n" for k, v in sorted(redact(env).items()))
    return header + body
