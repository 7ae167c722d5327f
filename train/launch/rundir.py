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
Before the plan names a checkpoint it verifies it against its manifest (below); a damaged
one is skipped with a warning naming the file and the reason, and the newest intact older
checkpoint is used instead. None intact: ResumeError (one error line, exit 2; no retry loop).

Checkpoint manifest (manifest.json, written by rank 0 just before a checkpoint is published):

    {"format": 1, "sample_bytes": 1048576,
     "files": {"<name>": {"size": <bytes>, "head_tail_crc32": "<8 hex digits>"}, ...}}

head_tail_crc32 is zlib.crc32 of the first and the last sample_bytes of the file (the whole
file when it is shorter than twice that). Why not the whole file: verification happens at
plan time, before every start, on checkpoints of up to hundreds of GB; a full crc32 of 1 GB
read from disk took 1.8 s here, the manifest's 0.037 s (benchmarks/checkpoint_manifest), so
a full pass over 100 GB would cost minutes per start. Size catches truncation (a killed writer, a full disk);
the samples catch a file replaced or zero-filled at either end. Damage inside a large file
is not detected. Checkpoints without a manifest (older runs) pass if .metadata and
trainer.pt exist and no file is empty; the worker then checks the shard sizes against
DCP's metadata before loading (train/checkpoint.py).
Stdlib only.
"""

import json
import os
import socket
import string
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from train.launch.conf import REPO_ROOT

TEMPLATES_DIR = REPO_ROOT / "logs_templates"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron's name


MANIFEST_FILE = "manifest.json"
RUN_FACTS_FILE = "run.json"  # in each checkpoint: job, GBS, MBS, SEQ_LENGTH of the run that saved it
MANIFEST_SAMPLE_BYTES = 1 << 20  # crc32 of the first and the last MiB of each file


def checkpoint_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"  # Megatron's name


def checkpoint_iterations(directory: Path) -> list[int]:
    """Iterations of the published checkpoints (iter_NNNNNNN directories), ascending."""
    return sorted(int(p.name[len("iter_"):]) for p in Path(directory).glob("iter_*")
                  if p.is_dir() and p.name[len("iter_"):].isdigit())


def head_tail_crc32(path: Path, sample_bytes: int = MANIFEST_SAMPLE_BYTES) -> str:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        if size <= 2 * sample_bytes:
            return f"{zlib.crc32(f.read()):08x}"
        crc = zlib.crc32(f.read(sample_bytes))
        f.seek(size - sample_bytes)
        return f"{zlib.crc32(f.read(sample_bytes), crc):08x}"


def checkpoint_manifest(directory: Path) -> dict:
    """The manifest of every file in a checkpoint directory (module docstring)."""
    files = {p.name: {"size": p.stat().st_size, "head_tail_crc32": head_tail_crc32(p)}
             for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    return {"format": 1, "sample_bytes": MANIFEST_SAMPLE_BYTES, "files": files}


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint directory cannot be loaded (naming the file), or None when it is intact."""
    directory = Path(directory)
    if not directory.is_dir():
        return "the directory does not exist"
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():  # an older checkpoint: the required files, none empty
        required = [directory / ".metadata", directory / "trainer.pt"]
        missing = [p.name for p in required if not p.is_file()]
        if missing:
            return f"{', '.join(missing)} missing (no {MANIFEST_FILE}: an older checkpoint)"
        empty = [p.name for p in sorted(directory.iterdir()) if p.is_file() and p.stat().st_size == 0]
        return f"{empty[0]} is empty" if empty else None
    try:
        manifest = json.loads(manifest_path.read_text())
        files, sample_bytes = manifest["files"], int(manifest["sample_bytes"])
    except (ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST_FILE} is unreadable ({error})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        if head_tail_crc32(path, sample_bytes) != expected["head_tail_crc32"]:
            return f"{name}: checksum differs from the manifest (head/tail crc32)"
    return None


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
    legacy: bool = False  # an old-style run directory (RUN_DIR_LEGACY in names.conf) kept for this run

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
    legacy = job != "qad" and is_legacy_run_of(root / run_name, root / fill("RUN_DIR_LEGACY"), job)
    if legacy:
        run_name = fill("RUN_DIR_LEGACY")
    run_dir = root / run_name
    return RunPaths(fields["datetime"], root, run_name, run_dir, run_dir / fill("CHECKPOINTS"), run_dir / fill("TENSORBOARD"),
                    run_dir / fill("TRAIN_LOG"), run_dir / fill("METRICS_LOG"), run_dir / fill("ENV_LOG"),
                    run_dir / fill("RESOLVED_CONFIG"), root / fill("SLURM_LOG"), root / fill("SLURM_ERR"),
                    run_dir / fill("PLAN_FILE"), legacy)


def is_legacy_run_of(run_dir: Path, legacy_dir: Path, job: str) -> bool:
    """The old-style directory holds a run of this job (its logs name the job: TRAIN_LOG), and
    the new-style one does not exist yet: keep resuming there."""
    return not run_dir.exists() and any((legacy_dir / "logs").glob(f"*_{job}_*"))


def legacy_note(paths: RunPaths, job: str) -> list[str]:
    if not paths.legacy:
        return []
    return [f"{paths.run_dir}: an old-style run directory holding this {job} run (before job types were in run "
            "names, logs_templates/names.conf): it stays in use; a new run gets the job in its name"]


@dataclass(frozen=True)
class ResumeState:
    decision: str  # resume | from_checkpoint | from_scratch
    iteration: int  # iteration to start after (0 unless resuming)
    path: str | None  # checkpoint directory (resume) or initial weights
    skipped: tuple[str, ...] = field(default=())  # damaged newer checkpoints: "<dir>: <reason>"

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
        return newest_intact(checkpoints, iteration)
    if initial_checkpoint:
        return ResumeState("from_checkpoint", 0, initial_checkpoint)
    return ResumeState("from_scratch", 0, None)


def newest_intact(checkpoints: Path, tracked: int) -> ResumeState:
    """The tracker's checkpoint if intact, else the newest intact older one; the damaged are listed."""
    candidates = [tracked] + [i for i in reversed(checkpoint_iterations(checkpoints)) if i < tracked]
    skipped = []
    for iteration in candidates:
        directory = checkpoints / checkpoint_dir_name(iteration)
        problem = checkpoint_problem(directory)
        if problem is None:
            return ResumeState("resume", iteration, str(directory), tuple(skipped))
        skipped.append(f"{directory}: {problem}")
    raise ResumeError(f"{checkpoints / TRACKER_FILE} names iteration {tracked}, but no intact checkpoint "
                      f"is left: {'; '.join(skipped)}")


def env_log_text(job: str, conf: str, env: dict[str, str], jobid: str, datetime: str) -> str:
    """The env log: a header from logs_templates/ and every variable, secrets redacted."""
    from train.launch.conf import redact

    header = string.Template((TEMPLATES_DIR / "env_log_header.txt").read_text()).substitute(
        job=job, jobid=jobid, datetime=datetime, host=socket.gethostname(), conf=conf)
    body = "".join(f"{k}={v}\n" for k, v in sorted(redact(env).items()))
    return header + body
