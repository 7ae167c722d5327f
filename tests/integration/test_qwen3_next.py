"""python -m pytest tests/integration/test_qwen3_next.py  (tiny Qwen3-Next jobs: torchrun, gloo, CPU)

Pretraining with a save and an exact resume on 2 processes (as test_resume.py does for Qwen3),
and a QAD job whose student and teacher are random tiny Qwen3-Next HF directories.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_parallel import COMMON, run_pretrain
from train.models import random_hf

REPO = Path(__file__).resolve().parents[2]
N = 3


def job_env(datetime: str, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "NUM_GPUS", "TRAIN_TEST_", "HF_TOKEN"))}
    env.update(RUN_DATETIME=datetime, OMP_NUM_THREADS="1", **extra)
    return env


def torchrun(module: str, root: Path, datetime: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", module, f"checkpoint.root={root}", "training.micro_batch_size=2",
               "training.global_batch_size=4", "data.seq_length=64", "logging.tensorboard=false", *args]
    result = subprocess.run(command, cwd=REPO, env=job_env(datetime), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def losses(run: Path, datetime: str) -> dict[int, float]:
    path = next((run / "logs").glob(f"*_{datetime}.jsonl"))
    return {record["iteration"]: record["loss"] for record in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_pretraining_resumes_bitwise_on_two_processes(tmp_path):
    args = ["model.name=tiny-qwen3-next", f"training.train_iters={2 * N}", f"checkpoint.save_interval={N}"]
    torchrun("train.pretrain", tmp_path, "20260101_000001", *args)
    run = tmp_path / "tiny-qwen3-next-pretrain-Data-synthetic-lr0.0003"
    checkpoints = run / "checkpoints" / "tiny-qwen3-next"
    shutil.rmtree(checkpoints / f"iter_{2 * N:07d}")  # rewind to N: the second job re-does N+1..2N
    (checkpoints / "latest_checkpointed_iteration.txt").write_text(f"{N}\n")
    result = torchrun("train.pretrain", tmp_path, "20260101_000002", *args)
    assert f"resume at iteration {N}" in result.stdout + result.stderr
    full, resumed = losses(run, "20260101_000001"), losses(run, "20260101_000002")
    assert sorted(resumed) == list(range(N + 1, 2 * N + 1))
    assert resumed == {i: full[i] for i in resumed}  # exact float equality
    assert full[2 * N] < full[1]  # it learns something


@pytest.mark.slow
def test_qad_with_tiny_qwen3_next_student_and_teacher(tmp_path):
    models = tmp_path / "models"
    for name, seed in (("student", "1"), ("teacher", "2")):
        assert random_hf.main(["tiny-qwen3-next", str(models / name), "--seed", seed]) == 0  # in this process
    env = job_env("20260101_000003", QAD_CHECKPOINT_ROOT=str(tmp_path / "runs"), MODELS_ROOT=str(models),
                  NUM_GPUS="2")
    result = subprocess.run(["bash", str(REPO / "launchers/qad.sh"), "--config", "tiny-qwen3-next-qad", "--",
                             "training.train_iters=4", "checkpoint.save_interval=2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "from_checkpoint at iteration 0" in output
    assert "quantized with recipe nvfp4" in output  # the student is fake-quantized (CPU NVFP4 backend)
    run = tmp_path / "runs" / "tiny-qwen3-next-Teacher-tiny-qwen3-next-Data-synthetic-lr0.0001"
    tracker = run / "checkpoints" / "tiny-qwen3-next" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text().strip() == "4"
    kd = losses(run, "20260101_000003")
    assert sorted(kd) == [1, 2, 3, 4] and all(value > 0 for value in kd.values())


# debug-qwen3-next (a Gated DeltaNet block, then gated attention + MoE) in test_parallel.py's setup
NEXT = [*(option for option in COMMON if not option.startswith("model.name=")), "model.name=debug-qwen3-next"]


@pytest.mark.slow
def test_tensor_parallel_checkpoint_resumes_at_tp1(tmp_path):
    """train.pretrain at TP 2 (clipping, the trainer's DCP save) equals one process, and its
    checkpoint resumes under FSDP2 at TP 1 with the losses of the uninterrupted run: the DeltaNet
    conv weight, Replicate under TP, is saved whole (train/parallel/tensor_parallel.py)."""
    single = run_pretrain(tmp_path / "one", [*NEXT, "training.train_iters=4"], processes=1)
    first = run_pretrain(tmp_path / "split", [*NEXT, "training.train_iters=2", "parallel.tensor_parallel_size=2"],
                         processes=2)
    assert first == pytest.approx(single[:2], rel=1e-4)
    resumed = run_pretrain(tmp_path / "split", [*NEXT, "training.train_iters=4", "parallel.data_parallel=fsdp"],
                           processes=2)
    assert resumed == pytest.approx(single, rel=1e-4)
    first_log, resumed_log = sorted((tmp_path / "split").glob("*/logs/*.jsonl"))  # named by start time
    records = [json.loads(line) for line in resumed_log.read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [3, 4]  # resumed, not started again
    assert single[3] != single[1]  # it trains


def grad_norms(root: Path) -> list[float]:
    """The logged gradient norm of each iteration of the one run under root."""
    path, = root.glob("*/logs/*.jsonl")
    return [record["grad_norm"] for record in map(json.loads, path.read_text().splitlines()) if "grad_norm" in record]


@pytest.mark.slow
def test_tensor_parallel_times_fsdp2_matches_one_process(tmp_path):
    """TP 2 x FSDP2 2 on 4 processes (the conf's layout): losses and clipped gradient norms (> 1:
    clipping acts) of one process. The MoE experts are FSDP2 DTensors on the dp mesh, the rest on
    the (dp, tp) mesh: clip_gradients adds their norms itself (torch's stacks them on one mesh)."""
    single = run_pretrain(tmp_path / "one", [*NEXT, "training.train_iters=3"], processes=1)
    split = run_pretrain(tmp_path / "four", [*NEXT, "training.train_iters=3", "parallel.tensor_parallel_size=2",
                                             "parallel.data_parallel=fsdp"], processes=4, timeout=300)
    assert split == pytest.approx(single, rel=1e-4)
    norms = grad_norms(tmp_path / "one")
    assert grad_norms(tmp_path / "four") == pytest.approx(norms, rel=1e-4) and min(norms) > 1.0
