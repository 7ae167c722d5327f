"""python -m pytest tests/integration/test_expert_parallel.py  (torchrun, 2 processes, gloo)

EP 2 against EP 1 on debug-qwen3-moe:
- tests/integration/expert_parallel_worker.py: logits, loss, gradients (router and experts),
  gradient norm and weights after AdamW steps equal a single-device reference; DCP checkpoints
  of EP 2 load into EP 1 and EP 2; TP 2 on a MoE model; 4 processes (slow): EP 2 x 2 replicas,
  TP 2 x EP 2 with FSDP2;
- the real entrypoint: `torchrun -m train.pretrain parallel.expert_parallel_size=2` gives the
  losses of one process, saves, resumes under EP 2, and its checkpoint resumes under EP 1.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_parallel import clean_env, losses

REPO = Path(__file__).resolve().parents[2]
CASES = ["ep2_ddp", "ep2_fsdp_activation_checkpointing", "every_rank_same_tokens", "checkpoint_ep2_to_ep1_and_ep2",
         "tp2_ep1"]
FOUR_PROCESS_CASES = ["ep2_ddp", "ep2_fsdp_activation_checkpointing", "tp2_ep2_fsdp"]


# the worker's cases run in one torchrun per process count with the other files' (conftest.py shared_launch)
SHARED_LAUNCHES = {"test_expert_parallel_matches_one_device": ("expert_parallel_worker", 2, CASES),
                   "test_four_processes": ("expert_parallel_worker", 4, FOUR_PROCESS_CASES)}


@pytest.fixture(scope="module")
def worker_results(shared_launch) -> dict:
    return shared_launch("expert_parallel_worker", 2)


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_matches_one_device(worker_results, case):
    assert worker_results[case] == "ok", worker_results[case]


@pytest.mark.slow
def test_four_processes(shared_launch):
    """dp 4 = 2 EP groups (expert gradients also summed over the ranks holding the same experts);
    TP 2 x EP 2 with FSDP2 (the qwen3-30b-a3b layout in small)."""
    results = shared_launch("expert_parallel_worker", 4)
    assert results == {case: "ok" for case in FOUR_PROCESS_CASES}, results


# ----------------------------------------------------------------- the real entrypoint

# debug-qwen3-moe: 2 layers (layer 1: 8 experts, top-2). GBS 4 = 2 ranks x MBS 2, or one process
# accumulating 2 micro-batches: the same micro-batches, so even the load-balancing loss agrees.
COMMON = ["model.name=debug-qwen3-moe", "data.source=synthetic", "data.seq_length=32",
          "training.micro_batch_size=2", "training.global_batch_size=4", "optim.lr=1e-2",
          "optim.schedule=constant", "optim.warmup_iters=0", "optim.eps=1e-4", "logging.tensorboard=false",
          "checkpoint.save_interval=2"]


def pretrain(root: Path, overrides: list[str], processes: int) -> list[float]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "train.pretrain", f"checkpoint.root={root}", *COMMON, *overrides]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return losses(root)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[float]:
    """The reference: 4 iterations of EP 1 in one process."""
    return pretrain(tmp_path_factory.mktemp("ep1"), ["training.train_iters=4"], processes=1)


@pytest.fixture(scope="module")
def ep2_first_half(tmp_path_factory) -> Path:
    """2 iterations under EP 2 on 2 processes, saved at iteration 2."""
    root = tmp_path_factory.mktemp("ep2")
    pretrain(root, ["training.train_iters=2", "parallel.expert_parallel_size=2"], processes=2)
    return root


@pytest.mark.slow  # 3 launches, ~40 s on 2 cores
def test_ep2_pretraining_saves_and_resumes(ep2_first_half, one_process, tmp_path):
    root = tmp_path / "runs"
    import shutil

    shutil.copytree(ep2_first_half, root)
    (run_dir,) = root.glob("*-Data-synthetic-*")
    assert (run_dir / "checkpoints" / "debug-qwen3-moe" / "iter_0000002").is_dir()
    resumed = pretrain(root, ["training.train_iters=4", "parallel.expert_parallel_size=2"], processes=2)
    assert len(resumed) == 4
    assert resumed == pytest.approx(one_process, rel=1e-4)


@pytest.mark.slow
def test_ep2_checkpoint_resumes_under_ep1(ep2_first_half, one_process, tmp_path):
    """EP 2 -> EP 1: DCP gathers the experts of both ranks into one process's full tensors."""
    root = tmp_path / "runs"
    import shutil

    shutil.copytree(ep2_first_half, root)
    resumed = pretrain(root, ["training.train_iters=4"], processes=1)
    assert resumed == pytest.approx(one_process, rel=1e-4)
