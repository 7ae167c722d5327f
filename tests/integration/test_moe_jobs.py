"""python -m pytest tests/integration/test_moe_jobs.py  (tiny Qwen3-MoE jobs: torchrun, gloo, CPU)

Pretraining with exact resume (the router, the grouped experts and the load-balancing loss
all go through checkpoints), and a QAD job started from HF checkpoints of the MoE.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_resume import job_env
from train.models import random_hf

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-moe-pretrain-Data-synthetic-lr0.0003"
N = 3
COMMON = ["model.name=tiny-qwen3-moe", "training.micro_batch_size=2", "training.global_batch_size=4",
          "data.seq_length=64", "logging.tensorboard=false", f"training.train_iters={2 * N}",
          f"checkpoint.save_interval={N}"]


def pretrain(root: Path, datetime: str, procs: int) -> str:
    launcher = [sys.executable, "-m", "train.pretrain"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
         "-m", "train.pretrain"]
    result = subprocess.run([*launcher, f"checkpoint.root={root}", *COMMON], cwd=REPO, env=job_env(datetime),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def rewind(root: Path, to: int) -> None:
    """Drop checkpoints after `to` and point the tracker back at it (as test_resume.py does)."""
    directory = root / RUN / "checkpoints" / "tiny-qwen3-moe"
    for path in directory.glob("iter_*"):
        if int(path.name[len("iter_"):].split(".")[0]) > to:
            shutil.rmtree(path)
    (directory / "latest_checkpointed_iteration.txt").write_text(f"{to}\n")


def losses(root: Path, datetime: str) -> dict[int, float]:
    path = next((root / RUN / "logs").glob(f"*_{datetime}.jsonl"))
    return {record["iteration"]: record["loss"] for record in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_moe_pretraining_resumes_bitwise(tmp_path, procs=2):
    """2 processes (DDP over gloo): 2N iterations vs N, rewind, resume to 2N."""
    pretrain(tmp_path, "20260101_000001", procs)
    rewind(tmp_path, N)
    output = pretrain(tmp_path, "20260101_000002", procs)
    assert f"resume at iteration {N}" in output
    full, resumed = losses(tmp_path, "20260101_000001"), losses(tmp_path, "20260101_000002")
    assert sorted(resumed) == list(range(N + 1, 2 * N + 1))
    assert resumed == {i: full[i] for i in resumed}  # exact float equality
    # the logged loss carries the load-balancing term: coef 0.01 x aux >= 0.01 x k (= 2)
    assert all(loss > 0.02 for loss in full.values())


@pytest.mark.slow
def test_moe_qad_job_from_hf_checkpoints(tmp_path):
    models = tmp_path / "models"
    assert random_hf.main(["tiny-qwen3-moe", str(models / "tiny-qwen3-moe")]) == 0  # in this process: no start-up
    env = {**job_env("20260101_000003"), "QAD_CHECKPOINT_ROOT": str(tmp_path), "MODELS_ROOT": str(models)}
    result = subprocess.run(["bash", str(REPO / "launchers/qad.sh"), "--config", "tiny-qwen3-moe-qad", "--",
                             "training.train_iters=2"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "from_checkpoint at iteration 0" in result.stdout + result.stderr
    run = tmp_path / "tiny-qwen3-moe-Teacher-tiny-qwen3-moe-Data-synthetic-lr0.0001"
    assert (run / "checkpoints/tiny-qwen3-moe/latest_checkpointed_iteration.txt").read_text().strip() == "2"

