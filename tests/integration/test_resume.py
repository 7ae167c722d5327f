"""python -m pytest tests/integration/test_resume.py  (exact resume: real jobs, torchrun, gloo, CPU)

A run of 2N iterations and a run stopped at N then resumed to 2N must log the same losses:
bitwise with the same number of processes, within fp tolerance when it changes (1 <-> 2
processes at the same global batch: the gradient sums happen in a different order).

"Rewind" runs 2N iterations saving at N, deletes the checkpoint at 2N and points the
tracker back at N; the resumed run then re-does N+1..2N with the same cosine schedule
(the LR depends on train_iters, so the first half has to be part of a 2N-iteration run).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-pretrain-Data-synthetic-lr0.0003"
N = 4
COMMON = ["training.micro_batch_size=2", "training.global_batch_size=4", "data.seq_length=64",
          "logging.tensorboard=false"]


def job_env(datetime: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "NUM_GPUS", "TRAIN_TEST_"))}
    env.update(RUN_DATETIME=datetime, OMP_NUM_THREADS="1")
    return env


def pretrain(root: Path, datetime: str, *args: str, procs: int = 1, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "train.pretrain"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
         "-m", "train.pretrain"]
    result = subprocess.run([*launcher, f"checkpoint.root={root}", *COMMON, *args], cwd=REPO,
                            env=env or job_env(datetime), capture_output=True, text=True, timeout=180)
    if check:
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def checkpoints(root: Path) -> Path:
    return root / RUN / "checkpoints" / "tiny-qwen3"


def losses(root: Path, datetime: str) -> dict[int, float]:
    path = next((root / RUN / "logs").glob(f"*_{datetime}.jsonl"))
    return {record["iteration"]: record["loss"] for record in map(json.loads, path.read_text().splitlines())}


def rewind(root: Path, to: int) -> None:
    directory = checkpoints(root)
    for path in directory.glob("iter_*"):
        if int(path.name[len("iter_"):].split(".")[0]) > to:
            shutil.rmtree(path)
    (directory / "latest_checkpointed_iteration.txt").write_text(f"{to}\n")


ARGS = [f"training.train_iters={2 * N}", f"checkpoint.save_interval={N}"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """procs -> the root of a run of 2N iterations saved at N and 2N on `procs` processes (run once
    per process count; each test copies it before the rewind)."""
    roots = {}

    def run(procs: int) -> Path:
        if procs not in roots:
            roots[procs] = tmp_path_factory.mktemp(f"full-{procs}")
            pretrain(roots[procs], "20260101_000001", *ARGS, procs=procs)
        return roots[procs]
    return run


@pytest.mark.parametrize("first,second", [(1, 1), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_resumed_run_repeats_the_losses_bitwise(tmp_path, full_run, first, second):
    shutil.copytree(full_run(first), tmp_path, dirs_exist_ok=True)
    rewind(tmp_path, N)
    result = pretrain(tmp_path, "20260101_000002", *ARGS, procs=second)
    assert f"resume at iteration {N}" in result.stdout + result.stderr
    full, resumed = losses(tmp_path, "20260101_000001"), losses(tmp_path, "20260101_000002")
    assert sorted(resumed) == list(range(N + 1, 2 * N + 1))
    assert resumed == {i: full[i] for i in resumed}  # exact float equality


@pytest.mark.slow
def test_n_then_n_more_equals_2n_with_a_schedule_independent_of_length(tmp_path):
    """The literal two-job split: the first job is told train_iters=N, the second 2N."""
    constant = ["optim.schedule=constant", "optim.warmup_iters=2", f"checkpoint.save_interval={N}"]
    pretrain(tmp_path / "full", "20260101_000001", f"training.train_iters={2 * N}", *constant)
    pretrain(tmp_path / "split", "20260101_000002", f"training.train_iters={N}", *constant)
    pretrain(tmp_path / "split", "20260101_000003", f"training.train_iters={2 * N}", *constant)
    full = losses(tmp_path / "full", "20260101_000001")
    split = {**losses(tmp_path / "split", "20260101_000002"), **losses(tmp_path / "split", "20260101_000003")}
    assert split == full and len(full) == 2 * N


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(1, 2), (2, 1)])
def test_resume_on_a_different_process_count(tmp_path, full_run, first, second):
    """DCP reshards; the sampler resumes from consumed_samples; same global batch (4)."""
    shutil.copytree(full_run(first), tmp_path, dirs_exist_ok=True)
    rewind(tmp_path, N)
    result = pretrain(tmp_path, "20260101_000002", *ARGS, procs=second)
    assert f"resume at iteration {N}" in result.stdout + result.stderr
    full, resumed = losses(tmp_path, "20260101_000001"), losses(tmp_path, "20260101_000002")
    assert sorted(resumed) == list(range(N + 1, 2 * N + 1))
    assert resumed == pytest.approx({i: full[i] for i in resumed}, rel=1e-5, abs=0)
    trainer_state = __import__("torch").load(checkpoints(tmp_path) / f"iter_{2 * N:07d}" / "trainer.pt",
                                             weights_only=False)
    assert trainer_state["world_size"] == second and trainer_state["consumed_samples"] == 2 * N * 4


@pytest.mark.slow
def test_save_interval_0_saves_the_last_iteration_only_and_grad_clip_0_does_not_clip(tmp_path):
    """0 means off for both (Megatron's --clip-grad 0); they were a ZeroDivisionError after the
    first step and a step divided by an infinite clipping factor."""
    pretrain(tmp_path / "off", "20260101_000001", "training.train_iters=3", "checkpoint.save_interval=0",
             "optim.grad_clip=0")
    pretrain(tmp_path / "huge", "20260101_000001", "training.train_iters=3", "checkpoint.save_interval=1",
             "optim.grad_clip=1e9")
    assert sorted(path.name for path in checkpoints(tmp_path / "off").glob("iter_*")) == ["iter_0000003"]
    assert losses(tmp_path / "off", "20260101_000001") == losses(tmp_path / "huge", "20260101_000001")
