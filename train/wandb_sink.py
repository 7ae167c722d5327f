"""The W&B sink of the metrics (train/metrics.py MetricsLogger): rank 0 only, when
logging.wandb_project (WANDB_PROJECT) is set.

    python -m pytest tests/integration/test_wandb.py

One W&B run per run directory: its id is kept in RUN_DIR/wandb_run_id (written by the first
job, read by every later one: a requeued or chained job continues the same W&B run, with
resume="allow"). Steps are training iterations. The W&B files go to $WANDB_DIR, else RUN_DIR/wandb/;
logging.wandb_mode=offline (WANDB_MODE) writes them without network (`wandb sync` uploads them).
The config sent is the resolved job config plus the job's conf variables, secrets redacted as in
the env log (train/launch/conf.py redact). W&B's console capture is off: the run's logs/ keep it.
A W&B run that cannot start is a warning, not a failed job.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig

log = logging.getLogger("train")
RUN_ID_FILE = "wandb_run_id"  # in the run directory: one line, the W&B run id


def run_id(run_dir: Path) -> str:
    """The run directory's W&B run id: the stored one, or a new one stored now (atomically)."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id shape
    partial = path.with_suffix(".tmp")
    partial.write_text(new_id + "\n")
    partial.replace(path)
    return new_id


def logged_config(cfg: JobConfig, env: dict[str, str]) -> dict:
    """The resolved config and the conf variables set for the job, secrets redacted."""
    from omegaconf import OmegaConf

    from train.launch.conf import CONF_VARIABLES, redact

    conf = {name: value for name, value in env.items() if name in CONF_VARIABLES}
    return {**OmegaConf.to_container(OmegaConf.create(cfg), resolve=True), "conf": redact(conf)}  # typed or DictConfig


class WandbSink:
    """Scalars to a W&B run; log() and close() as MetricsLogger calls them."""

    def __init__(self, run):
        self.run = run

    def log(self, iteration: int, scalars: dict) -> None:
        self.run.log(scalars, step=iteration)

    def close(self) -> None:
        self.run.finish()


def start_wandb(cfg: JobConfig, plan, is_main: bool) -> WandbSink | None:
    """The sink, or None: another rank, no logging.wandb_project, or W&B failed to start (warned)."""
    settings = cfg.logging
    if not is_main or not settings.wandb_project:
        return None
    import wandb

    run_dir = plan.paths.run_dir
    try:
        run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity or None,
                         mode=settings.wandb_mode or None, id=run_id(run_dir), resume="allow",
                         name=plan.paths.run_name, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                         config=logged_config(cfg, dict(os.environ)), settings=wandb.Settings(console="off"))
    except Exception as error:  # noqa: BLE001  a network or account problem must not stop training
        log.warning("W&B: could not start a run in project %s (%s); metrics go to the JSONL and TensorBoard only",
                    settings.wandb_project, error)
        return None
    log.info("W&B: run %s in project %s (%s mode)", run.id, settings.wandb_project, settings.wandb_mode or "default")
    return WandbSink(run)
