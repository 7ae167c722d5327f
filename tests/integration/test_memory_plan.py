"""python -m pytest tests/integration/test_memory_plan.py  (the plan's memory per GPU against a measured step)

Each case runs tests/integration/memory_worker.py: a real training step of tiny-qwen3 (or its MoE
twin) under the job's parallelism, on 1 or 2 processes over gloo, measured by torch's MemTracker
(peak bytes of every live tensor by storage), and compares the peak with the plan's per-GPU
estimate without the GPU-only overhead (train/launch/memory.py). Seen: 0.94-1.07. Not covered yet: a QAD step (quantized student + teacher).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = ["data=synthetic", "data.seq_length=256", "training.micro_batch_size=4"]
CASES = {  # name: (processes, overrides)
    "dense": (1, ["model.name=tiny-qwen3"]),
    "dense-bf16": (1, ["model.name=tiny-qwen3", "training.precision=bf16"]),
    "dense-checkpointing": (1, ["model.name=tiny-qwen3", "parallel.activation_checkpointing=true"]),
    "ddp": (2, ["model.name=tiny-qwen3"]),
    "fsdp": (2, ["model.name=tiny-qwen3", "parallel.data_parallel=fsdp"]),
    "tp2": (2, ["model.name=tiny-qwen3", "parallel.tensor_parallel_size=2"]),
    "moe-ddp": (2, ["model.name=tiny-qwen3-moe"]),
    "moe-fsdp": (2, ["model.name=tiny-qwen3-moe", "parallel.data_parallel=fsdp"]),
    "moe-ep2-fsdp": (2, ["model.name=tiny-qwen3-moe", "parallel.expert_parallel_size=2", "parallel.data_parallel=fsdp"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_planned_memory_is_within_10_percent_of_a_measured_step(case, tmp_path):
    procs, overrides = CASES[case]
    out = tmp_path / "memory.json"
    worker = str(REPO / "tests" / "integration" / "memory_worker.py")
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={procs}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([*launcher, worker, "pretrain", str(out), *COMMON, *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    ratio = measured["planned"] / measured["measured"]
    print(case, round(ratio, 3), measured["categories"])
    assert measured["measured"] > 10 * 2**20  # a real step: tens of MiB of activations
    assert 0.9 <= ratio <= 1.1, (case, ratio, measured)
