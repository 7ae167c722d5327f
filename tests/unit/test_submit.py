"""python -m pytest tests/unit/test_submit.py  (python -m train.submit: the job comes from the conf's JOB)

`sbatch` here is a stand-in script that records its arguments: these tests never queue anything on a
real cluster (tests/slurm/test_jobs.py submits for real)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.launch.conf import CONF_VARIABLES
from train.models import random_hf

REPO = Path(__file__).resolve().parents[2]
TINY = "export MODEL=tiny-qwen3\nexport DATASET_NAME=synthetic\nexport SEQ_LENGTH=64\nexport MBS=2\nexport NUM_GPUS=2\n"


@pytest.fixture
def submit(tmp_path):
    """Runs python -m train.submit with a recording sbatch first on PATH; returns (result, sbatch argv)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch-args"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in CONF_VARIABLES}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", QAD_CHECKPOINT_ROOT=str(tmp_path / "runs"), JOB="qad",
               PYTHONPATH=str(REPO))  # JOB in the caller's shell: never the conf's job

    def run(*args):
        result = subprocess.run([sys.executable, "-m", "train.submit", *args], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=120)
        return result, record.read_text().splitlines() if record.exists() else None

    return run


def test_submit_queues_the_wrapper_of_the_confs_job(tmp_path, submit):
    """A fine-tuning conf without LoRA variables: its JOB, not its text, picks slurm/finetune.sh."""
    base = tmp_path / "base"  # the plan checks BASE_CKPT's config.json and safetensors headers
    assert random_hf.main(["tiny-qwen3", str(base)]) == 0  # in this process: no start-up
    conf = tmp_path / "ft.conf"
    conf.write_text(f"export JOB=finetune\n{TINY}export BASE_CKPT={base}\n")
    result, sbatch = submit("--config", str(conf), "--", "training.train_iters=2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4242"]
    wrapper = sbatch.index(str(REPO / "slurm" / "finetune.sh"))
    assert sbatch[wrapper + 1:] == ["--config", str(conf), "--", "training.train_iters=2"]


def test_submit_refuses_a_conf_without_job_or_of_another_job(tmp_path, submit):
    conf = tmp_path / "plain.conf"
    conf.write_text(TINY)
    result, sbatch = submit("--config", str(conf))
    assert result.returncode == 2 and sbatch is None
    assert result.stderr.splitlines() == [f"error: {conf}: no JOB: add `export JOB=pretrain|qad|finetune` to the "
                                          "conf, or pass --job"]
    result, sbatch = submit("--config", str(conf), "--job", "pretrain")  # --job names it instead
    assert result.returncode == 0 and str(REPO / "slurm" / "pretrain.sh") in sbatch, result.stderr
    (tmp_path / "sbatch-args").unlink()
    result, sbatch = submit("--config", "tiny-qwen3", "--job", "qad")
    assert result.returncode == 2 and sbatch is None
    assert result.stderr.splitlines() == [f"error: {REPO / 'conf.d/tiny-qwen3.conf'}: JOB=pretrain: this conf is "
                                          "for a pretrain job, not qad (launchers/pretrain.sh, slurm/pretrain.sh)"]
