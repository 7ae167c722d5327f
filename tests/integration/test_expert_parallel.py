"""python -m pytest tests/integration/test_expert_parallel.py  (torchrun, 2 processes, gloo)

EP 2 against EP 1 on debug-qwen3-moe / tiny-qwen3-moe:
- tests/integration/expert_parallel_worker.py: logits, loss, gradients (router and experts),
  gradient norm and weights after AdamW steps equal a single-device reference; DCP checkpoints
  of EP 2 load into EP 1 and EP 2;
- the real entrypoint: `torchrun -m train.pretrain parallel.expert_parallel_size=2` gives the
  losses of one process, saves, resumes under EP 2, and its checkpoint resumes under EP 1.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_parallel import clean_env, losses

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "integration" / "expert_parallel_worker.py"
CASES = ["ep2_ddp", "ep2_fsdp_activation_checkpointing", "every_rank_same_tokens", "checkpoint_ep2_to_ep1_and_ep2"]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict:
    """One torchrun of the worker runs every case (process start-up paid once)."""
    results = tmp_path_factory.mktemp("ep_worker") / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(WORKER), str(results), ",".join(CASES)]
    run = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and results.exists(), (run.stdout + run.stderr)[-4000:]
    return json.loads(results.read_text())


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_matches_one_device(worker_results, case):
    assert worker_results[case] == "ok", worker_results[case]
