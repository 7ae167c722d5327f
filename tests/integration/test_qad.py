"""python -m pytest tests/integration/test_qad.py  (QAD: quantized student, exact resume, FSDP; torchrun, gloo)

The QAD twin of test_resume.py: a run of 2N iterations and a run stopped at N then resumed
to 2N log the same losses bitwise; the resumed run restores the quantizers from the
checkpoint instead of calibrating again.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-Teacher-tiny-qwen3-Data-synthetic-lr0.0001"
N = 2
AMAX = "model.layers.0.mlp.up_proj.input_quantizer._amax"
# tiny-qwen3-moe QAD of 2 iterations; conftest.py's qad_moe_ep2 runs it under EP 2 x FSDP2
QAD_MOE_ARGS = ["model.name=tiny-qwen3-moe", "distill.teacher_model=tiny-qwen3-moe", "training.train_iters=2",
                "checkpoint.save_interval=2"]
# the fixtures models (tiny-qwen3 student and teacher), qad_four_iterations and qad_moe_ep2: conftest.py


def job_env(datetime: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "NUM_GPUS", "TRAIN_TEST_"))}
    env.update(RUN_DATETIME=datetime, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def qad(root: Path, models: Path, datetime: str, *args: str, procs: int = 1, check: bool = True):
    launcher = [sys.executable, "-m", "train.qad"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "train.qad"]
    common = [f"checkpoint.root={root}", "model.name=tiny-qwen3", f"model.hf_checkpoint={models / 'student'}",
              "distill.teacher_model=tiny-qwen3", f"distill.teacher_checkpoint={models / 'teacher'}",
              "data.source=synthetic", "data.dataset_name=synthetic", "data.seq_length=32",
              "training.micro_batch_size=2", "training.global_batch_size=4", "optim.lr=1e-4",
              "quant.calibration_batches=2", "logging.tensorboard=false"]
    result = subprocess.run([*launcher, *common, *args], cwd=REPO, env=job_env(datetime), capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def checkpoints(root: Path) -> Path:
    return root / RUN / "checkpoints" / "tiny-qwen3"


def losses(root: Path, datetime: str) -> dict[int, float]:
    path = next((root / RUN / "logs").glob(f"*_{datetime}.jsonl"))
    return {record["iteration"]: record["loss"] for record in map(json.loads, path.read_text().splitlines())}


def dcp_keys(directory: Path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


@pytest.mark.slow
def test_qad_resume_restores_the_quantizers_and_repeats_the_losses_bitwise(tmp_path, models, qad_four_iterations):
    """The first run of 2N iterations: conftest.py's qad_four_iterations (test_sharded_load.py reads
    it too), copied here before the rewind."""
    import torch

    args = [f"training.train_iters={2 * N}", f"checkpoint.save_interval={N}"]
    first_root, first = qad_four_iterations
    assert N == 2  # qad_four_iterations: 4 iterations, a checkpoint every 2
    shutil.copytree(first_root, tmp_path, dirs_exist_ok=True)
    output = first.stdout + first.stderr
    assert "calibration batch 2/2" in output and "quantized with recipe nvfp4" in output
    middle = checkpoints(tmp_path) / f"iter_{N:07d}"
    record = torch.load(middle / "quantizer_state.pt", weights_only=False)
    assert record["recipe"] == "nvfp4" and "modelopt_state_dict" in record["modelopt_state"]
    assert AMAX in dcp_keys(middle)  # the calibrated amax travels with the weights

    # rewind to N (as test_resume.py does) and resume: no calibration, same losses
    shutil.rmtree(checkpoints(tmp_path) / f"iter_{2 * N:07d}")
    (checkpoints(tmp_path) / "latest_checkpointed_iteration.txt").write_text(f"{N}\n")
    second = qad(tmp_path, models, "20260101_000002", *args)
    output = second.stdout + second.stderr
    assert f"resume at iteration {N}" in output and "quantizer state (nvfp4) restored" in output
    assert "calibration batch" not in output
    full, resumed = losses(tmp_path, "20260101_000001"), losses(tmp_path, "20260101_000002")
    assert sorted(resumed) == list(range(N + 1, 2 * N + 1))
    assert resumed == {i: full[i] for i in resumed}  # exact float equality

    # another recipe cannot resume this run: one message, exit 2, before any training
    third = qad(tmp_path, models, "20260101_000003", *args, "quant.recipe=fp8", check=False)
    assert third.returncode == 2
    assert "trained with quant.recipe=nvfp4, this run has quant.recipe=fp8" in third.stderr


@pytest.mark.slow
def test_qad_on_two_ranks_with_fsdp_shards_the_teacher_too(tmp_path, models):
    """Also: the loss's terms kd_loss and lm_loss logged beside it (console, JSONL, TensorBoard), and
    modelopt's warnings and prints once per job, not once per rank and module class."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = qad(tmp_path, models, "20260101_000001", "training.train_iters=2", "checkpoint.save_interval=2",
                 "parallel.data_parallel=fsdp", "distill.lm_loss_weight=0.5", "logging.tensorboard=true", procs=2)
    output = result.stdout + result.stderr
    assert "teacher" in output and "sharded like the student" in output
    assert "dp 2 (fsdp)" in output
    final = checkpoints(tmp_path) / "iter_0000002"
    assert (final / "quantizer_state.pt").is_file() and AMAX in dcp_keys(final)
    records = [json.loads(line) for line in next((tmp_path / RUN / "logs").glob("*.jsonl")).read_text().splitlines()]
    assert len(records) == 2
    for record in records:  # loss = kd_loss_weight (1) x kd_loss + lm_loss_weight x lm_loss
        assert record["loss"] == pytest.approx(record["kd_loss"] + 0.5 * record["lm_loss"], rel=1e-5)
        assert 0 < record["kd_loss"] < record["lm_loss"]
    assert "| kd_loss " in output and "| lm_loss " in output
    events = EventAccumulator(str(next((tmp_path / RUN / "tensorboard").iterdir()))).Reload()
    assert {"loss", "kd_loss", "lm_loss"} <= set(events.Tags()["scalars"])
    assert output.count("no parallel_state is set") == 1  # modelopt warns per rank and module class
    assert output.count("Inserted 90 quantizers") == 1  # modelopt prints on every rank


def test_unknown_recipe_is_refused_before_the_job_starts(tmp_path, models):
    result = qad(tmp_path, models, "20260101_000001", "quant.recipe=nvfp5", check=False)
    assert result.returncode == 2
    assert "QUANT_RECIPE: unknown quantization recipe 'nvfp5'" in result.stderr
    assert "nvfp4, nvfp4_mlp_only, fp8, none" in result.stderr
    assert not (tmp_path / RUN).exists()  # no run directory


@pytest.mark.slow
def test_qad_moe_student_with_expert_parallelism_quantizes_the_experts(qad_moe_ep2):
    """tiny-qwen3-moe, EP 2 x FSDP2 on 2 processes (conftest.py's qad_moe_ep2; test_sharded_load.py
    compares it with one process): the grouped experts get quantizers (their amax is in the
    checkpoint) and the teacher is split like the student."""
    _, root, result = qad_moe_ep2
    output = result.stdout + result.stderr
    assert "x ep 2" in output and "sharded like the student" in output
    run = root / "tiny-qwen3-moe-Teacher-tiny-qwen3-moe-Data-synthetic-lr0.0001"
    final = run / "checkpoints" / "tiny-qwen3-moe" / "iter_0000002"
    keys = dcp_keys(final)
    assert "model.layers.1.mlp.experts.gate_up_proj_weight_quantizer._amax" in keys
    assert "model.layers.1.mlp.experts.down_proj_input_quantizer._amax" in keys
