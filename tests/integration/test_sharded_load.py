"""python -m pytest tests/integration/test_sharded_load.py  (torchrun, gloo; ~2 min, all slow)

Sharded loading (train/parallel/sharded_load.py) against load_hf's whole model, in
tests/integration/sharded_load_worker.py, 2 processes: DDP and FSDP2 (tied embeddings, GPT-2's
fused q/k/v, Qwen3-Next), TP 2, EP 2 (MoE, FSDP2 and DDP), a bf16 checkpoint into fp32 parameters, each
rank's share of the bytes, the QAD teacher (train.qad.build_teacher), a student calibrated
after an FSDP2 sharded load (the whole student's amax; not yet what a QAD job does); 4
processes: TP 2 x FSDP2, TP 2 x EP 2 x FSDP2; train.pretrain from an HF checkpoint. The memory
per rank at 1.6 GB: benchmarks/load_memory/run.py (docs/benchmarks.md#load-memory).
"""

import pytest

from tests.integration.test_parallel import pretrain, run_worker

CASES = ["ddp_qwen3_tied", "fsdp_qwen3_tied", "fsdp_gpt2", "fsdp_qwen3_next", "tp2_qwen3", "tp2_gpt2",
         "ep2_fsdp_moe", "ep2_ddp_moe", "bf16_checkpoint_into_fp32", "fsdp_shares_bytes", "teacher_fsdp_bf16",
         "fsdp_student_calibrated_like_whole"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_worker(tmp_path_factory.mktemp("sharded_load"), CASES, "sharded_load_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sharded_load_equals_whole_load(results, case):
    assert results[case] == "ok", results[case]


@pytest.mark.slow
def test_four_processes(tmp_path):
    """2-D and 3-D meshes: TP 2 x FSDP2 2, TP 2 x EP 2 x FSDP2."""
    cases = ["tp2_fsdp_qwen3", "tp2_ep2_fsdp_moe"]
    results = run_worker(tmp_path, cases, "sharded_load_worker.py", processes=4)
    assert results == {case: "ok" for case in cases}, results


# ----------------------------------------------------------------- the real entrypoint

@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny random Qwen3 (tied embeddings) saved in bf16 by transformers."""
    import torch

    from tests.unit.hf_fixtures import build_tiny_hf_model

    directory = tmp_path_factory.mktemp("hf") / "qwen3-bf16"
    build_tiny_hf_model("qwen3-tied").to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["parallel.data_parallel=fsdp"], ["parallel.tensor_parallel_size=2"]],
                         ids=["fsdp", "tp2"])
def test_pretrain_from_hf_checkpoint_two_processes_match_one(tmp_path, bf16_checkpoint, overrides):
    """`torchrun -m train.pretrain model.hf_checkpoint=...`: each rank reads its part; the losses
    equal one process's (which reads the whole model the same way)."""
    start = [f"model.hf_checkpoint={bf16_checkpoint}", "training.train_iters=2"]
    one = pretrain(tmp_path / "one", start, processes=1)
    two = pretrain(tmp_path / "two", [*start, *overrides], processes=2)
    assert len(two) == 2 and two == pytest.approx(one, rel=1e-4)
