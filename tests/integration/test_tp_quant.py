"""python -m pytest tests/integration/test_tp_quant.py  (QAD with TP_SIZE=2: quantized student under tensor parallelism)

- tests/integration/tp_quant_worker.py: a fake-quantized debug model (nvfp4, fp8; dense,
  MoE and Qwen3-Next) split over TP 2 gives the single-device losses, gradients and weights for 3 AdamW
  steps; every quantizer amax stays a plain tensor, the same on all ranks; on 4 processes
  (slow) the qwen3-30b-a3b layout in small: TP 2 x EP 2 with FSDP2.
- the real entrypoint (`torchrun -m train.qad parallel.tensor_parallel_size=2`): the student read
  in parts, quantized and calibrated as laid out; the losses of TP_SIZE=1, the same calibrated
  amax in the checkpoint (bit for bit), exact resume; a MoE student at TP 2.

Why the job losses are compared within rtol 1e-3 and not bitwise: TP sums the rowwise halves
(o_proj, down_proj) in another order than one device, a few float32 ulps apart; an input
quantizer rounds almost all of those to the same NVFP4/FP8 value, but now and then one element
sits on a rounding boundary and lands one quantization step away, which the next layers carry
on. The worker cases (no such element on their batches) hold the tight tolerances.
"""

import shutil
from pathlib import Path

import pytest

from tests.integration.test_qad import RUN, checkpoints, losses, qad  # the fixture models: conftest.py

CASES = ["nvfp4_qwen3", "fp8_qwen3", "nvfp4_llama2", "nvfp4_qwen3_moe", "nvfp4_qwen3_next"]
TP2 = ["parallel.tensor_parallel_size=2", "parallel.data_parallel=fsdp"]
# 3 iterations of GBS 4 = 2 micro-batches of 2; eps 1e-4: see parallel_worker.optim_cfg
ARGS = ["training.train_iters=3", "checkpoint.save_interval=2", "optim.eps=1e-4"]


FOUR_PROCESS_CASE = "nvfp4_qwen3_moe_tp2_ep2_fsdp"
# the worker's cases run in one torchrun per process count with the other files' (conftest.py shared_launch)
SHARED_LAUNCHES = {"test_quantized_tensor_parallel_matches_one_device": ("tp_quant_worker", 2, CASES),
                   "test_quantized_moe_tp2_ep2_fsdp_on_four_processes": ("tp_quant_worker", 4, [FOUR_PROCESS_CASE])}


@pytest.fixture(scope="module")
def worker_results(shared_launch) -> dict:
    return shared_launch("tp_quant_worker", 2)


@pytest.mark.slow  # one torchrun for all cases, ~20 s on 2 cores
@pytest.mark.parametrize("case", CASES)
def test_quantized_tensor_parallel_matches_one_device(worker_results, case):
    assert worker_results[case] == "ok", worker_results[case]


@pytest.mark.slow  # ~30 s
def test_quantized_moe_tp2_ep2_fsdp_on_four_processes(shared_launch):
    assert shared_launch("tp_quant_worker", 4) == {FOUR_PROCESS_CASE: "ok"}


def amax_values(checkpoint: Path) -> dict:
    """Every quantizer amax of a DCP checkpoint (read in this process, no process group)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, checkpoint.parent / "whole.pt")
    state = torch.load(checkpoint.parent / "whole.pt", weights_only=False)
    model = state.get("model", state)
    return {key: value for key, value in model.items() if key.endswith("._amax")}


@pytest.mark.slow  # 2 launches (~35 s on 2 cores), and the resume (~20 s)
@pytest.mark.parametrize("recipe, resume", [("nvfp4", True), ("fp8", False)])  # resume: nothing recipe-specific
def test_qad_tp2_gives_the_tp1_losses_and_resumes_exactly(tmp_path, models, recipe, resume):
    import torch

    args = [*ARGS, f"quant.recipe={recipe}"]
    qad(tmp_path / "tp1", models, "20260101_000001", *args)
    split = qad(tmp_path / "tp2", models, "20260101_000001", *args, *TP2, procs=2)
    output = split.stdout + split.stderr
    assert f"quantized with recipe {recipe}" in output and "x tp 2" in output
    assert "each rank reads its part" in output  # loaded sharded, calibrated as laid out (engine.loads_sharded)
    tp1, tp2 = losses(tmp_path / "tp1", "20260101_000001"), losses(tmp_path / "tp2", "20260101_000001")
    assert sorted(tp2) == sorted(tp1) == [1, 2, 3]
    assert tp2 == pytest.approx(tp1, rel=1e-3), (tp1, tp2)

    # calibrated after the split, the rowwise Linears computed whole: the very same amax values
    single = amax_values(checkpoints(tmp_path / "tp1") / "iter_0000002")
    assert single and single.keys() == amax_values(checkpoints(tmp_path / "tp2") / "iter_0000002").keys()
    split_amax = amax_values(checkpoints(tmp_path / "tp2") / "iter_0000002")
    assert all(torch.equal(split_amax[key], value) for key, value in single.items())

    if not resume:
        return
    # rewind TP 2 to iteration 2 and resume under TP 2: no calibration, iteration 3 bitwise
    shutil.rmtree(checkpoints(tmp_path / "tp2") / "iter_0000003", ignore_errors=True)
    (checkpoints(tmp_path / "tp2") / "latest_checkpointed_iteration.txt").write_text("2\n")
    resumed = qad(tmp_path / "tp2", models, "20260101_000002", *args, *TP2, procs=2)
    output = resumed.stdout + resumed.stderr
    assert "resume at iteration 2" in output and f"quantizer state ({recipe}) restored" in output
    assert "calibration batch" not in output
    assert losses(tmp_path / "tp2", "20260101_000002") == {3: tp2[3]}  # exact float equality


@pytest.mark.slow  # 2 processes start, plan, then stop: ~15 s
def test_tp2_without_calibration_is_refused_before_training(tmp_path, models):
    """Refused by the plan (train/launch/plan.py check_quantized_tensor_parallel) before any model is
    built; the workers' own check on the built model (check_quantized_split) stays behind it."""
    result = qad(tmp_path, models, "20260101_000001", "quant.calibration_batches=0", "training.train_iters=2",
                 *TP2, procs=2, check=False)
    assert result.returncode != 0  # each rank exits 2; bare torchrun reports 1
    assert "TP_SIZE=2 with quant.calibration_batches=0: each rank would compute its own amax" in result.stderr, \
        result.stderr[-3000:]
    assert not (tmp_path / RUN / "checkpoints" / "tiny-qwen3").exists() or \
        not any((tmp_path / RUN / "checkpoints" / "tiny-qwen3").iterdir())


@pytest.mark.slow  # ~20 s
def test_qad_moe_student_with_tp2(tmp_path):
    """tiny-qwen3-moe at TP 2: attention split and quantized, the quantized experts whole on both ranks."""
    import torch

    from train.models import build_model, init_weights, save_hf

    models = tmp_path / "models"
    for name, seed in (("student", 1), ("teacher", 2)):
        save_hf(init_weights(build_model("tiny-qwen3-moe", device="cpu"), seed), models / name)
    result = qad(tmp_path, models, "20260101_000001", "model.name=tiny-qwen3-moe", "distill.teacher_model=tiny-qwen3-moe",
                 "training.train_iters=2", "checkpoint.save_interval=2", *TP2, procs=2)
    output = result.stdout + result.stderr
    assert "x tp 2" in output and "sharded like the student" in output and "quantized with recipe nvfp4" in output
    run = tmp_path / "tiny-qwen3-moe-Teacher-tiny-qwen3-moe-Data-synthetic-lr0.0001"
    amax = amax_values(run / "checkpoints" / "tiny-qwen3-moe" / "iter_0000002")
    for key in ("layers.1.self_attn.o_proj.input_quantizer._amax", "layers.1.mlp.experts.down_proj_input_quantizer._amax"):
        assert key in amax and torch.all(amax[key] > 0), sorted(amax)
