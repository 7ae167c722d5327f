"""python -m pytest tests/integration/test_master_weights.py  (bf16 HF checkpoints train with fp32 master weights)

Real HF checkpoints are bf16. bf16 keeps 8 significant bits, so at QAD's LR 1e-6 an update to a
weight of magnitude 0.02 (half a bf16 step there: 6e-5) rounds back to the weight: a job that
trained bf16 parameters would change almost nothing. These tests start QAD and LoRA jobs from
bf16 checkpoints saved by transformers and check that every trainable element moves, that the
checkpoint holds fp32 weights and AdamW state, and that a bf16 checkpoint trains exactly like the
same values stored in fp32.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from hf_fixtures import tiny_hf_config  # noqa: E402

ITERS = 3


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> Path:
    """student-bf16 and student-fp32 (the same values), teacher-bf16: tiny Qwen3s saved by transformers."""
    from transformers import Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("hf")
    for name, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(tiny_hf_config("qwen3-tied")).to(torch.bfloat16)
        model.save_pretrained(root / f"{name}-bf16")
        if name == "student":
            model.to(torch.float32).save_pretrained(root / "student-fp32")
    return root


def run_job(job: str, root: Path, *overrides: str) -> Path:
    """One process, ITERS iterations at LR 1e-6, a checkpoint after every one; returns the run directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_",
                                                                     "TRAIN_STOP_FILE", "RUN_DATETIME"))}
    env.update(OMP_NUM_THREADS="1", RUN_DATETIME="20260101_000001")
    command = [sys.executable, "-m", f"train.{job}", f"checkpoint.root={root}", "logging.tensorboard=false",
               "model.name=hf-qwen3", "data=synthetic", "data.seq_length=32", "training.micro_batch_size=2",
               f"training.train_iters={ITERS}", "checkpoint.save_interval=1", f"checkpoint.keep_last={ITERS}",
               "optim.lr=1e-6", "optim.min_lr=1e-6", "optim.warmup_iters=0", *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return next(root.glob("hf-qwen3-*"))


def qad(root: Path, student: Path, teacher: Path) -> Path:
    return run_job("qad", root, f"model.hf_checkpoint={student}", f"distill.teacher_checkpoint={teacher}",
                   "distill.teacher_model=hf-qwen3-teacher", "quant.calibration_batches=1")


def checkpoint_tensors(run_dir: Path, iteration: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint as {key: tensor} (model.* and optimizer.* entries)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = run_dir / "checkpoints" / "hf-qwen3" / f"iter_{iteration:07d}"
    out = tmp_path / f"{run_dir.name}-{iteration}.pt"
    dcp_to_torch_save(str(directory), str(out))
    state = torch.load(out, weights_only=False)

    def flatten(prefix: str, value) -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(f"{prefix}{key}.", item).items()}
        return {prefix[:-1]: value} if isinstance(value, torch.Tensor) else {}

    return flatten("", state)


def losses(run_dir: Path) -> list[float]:
    path = next((run_dir / "logs").glob("*.jsonl"))
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def trainable_change(first: dict, last: dict, is_trainable) -> tuple[float, int]:
    """(share of the trainable elements that changed between two checkpoints, elements compared)."""
    changed = total = 0
    for key, value in last.items():
        if key.startswith("model.") and is_trainable(key) and value.is_floating_point():
            changed += int((value != first[key]).sum())
            total += value.numel()
    return changed / total, total


def assert_fp32_state(state: dict, is_trainable) -> None:
    weights = {k: v for k, v in state.items() if k.startswith("model.") and is_trainable(k)}
    moments = {k: v for k, v in state.items() if k.startswith("optimizer.") and k.endswith(("exp_avg", "exp_avg_sq"))}
    assert weights and moments
    assert {str(v.dtype) for v in weights.values()} == {"torch.float32"}, sorted(weights)[:4]
    assert {str(v.dtype) for v in moments.values()} == {"torch.float32"}


def is_weight(key: str) -> bool:
    return not key.endswith("_amax")  # modelopt's calibrated ranges are buffers, not trained


@pytest.fixture(scope="module")
def qad_from_bf16(hf_dirs, tmp_path_factory) -> Path:
    """The run directory of the QAD job from student-bf16 (both tests below read it, neither changes it)."""
    return qad(tmp_path_factory.mktemp("bf16"), hf_dirs / "student-bf16", hf_dirs / "teacher-bf16")


@pytest.mark.slow
def test_qad_from_a_bf16_checkpoint_moves_every_weight_at_lr_1e6(qad_from_bf16, tmp_path):
    run_dir = qad_from_bf16
    first, last = checkpoint_tensors(run_dir, 1, tmp_path), checkpoint_tensors(run_dir, ITERS, tmp_path)
    assert_fp32_state(last, is_weight)
    share, elements = trainable_change(first, last, is_weight)
    assert elements > 100_000
    # bf16 weights would keep ~1-2% of these updates (only the weights under ~0.003 in magnitude)
    assert share > 0.99, share
    log = next((run_dir / "logs").glob("*.log")).read_text()
    assert "stored in bfloat16, trained in float32" in log


@pytest.mark.slow
def test_a_bf16_checkpoint_trains_exactly_like_its_fp32_copy(hf_dirs, qad_from_bf16, tmp_path):
    from_bf16 = qad_from_bf16
    from_fp32 = qad(tmp_path / "fp32", hf_dirs / "student-fp32", hf_dirs / "teacher-bf16")
    assert len(losses(from_bf16)) == ITERS
    assert losses(from_bf16) == losses(from_fp32)
    bf16_weights = checkpoint_tensors(from_bf16, ITERS, tmp_path)
    fp32_weights = checkpoint_tensors(from_fp32, ITERS, tmp_path)
    for key, value in bf16_weights.items():
        if key.startswith("model."):
            assert torch.equal(value, fp32_weights[key]), key


@pytest.mark.slow
def test_lora_adapters_train_in_fp32_on_a_bf16_base(hf_dirs, tmp_path):
    run_dir = run_job("finetune", tmp_path / "runs", f"model.hf_checkpoint={hf_dirs / 'student-bf16'}",
                      "lora.rank=4", "lora.alpha=8", "lora.dropout=0.0")
    first, last = checkpoint_tensors(run_dir, 1, tmp_path), checkpoint_tensors(run_dir, ITERS, tmp_path)

    def is_adapter(key: str) -> bool:
        return "lora_" in key

    assert_fp32_state(last, is_adapter)
    # lora_B starts at zero, so lora_A gets its first gradient at step 2: both move from 1 to 3
    share, elements = trainable_change(first, last, is_adapter)
    assert elements > 1000 and share > 0.99, share
