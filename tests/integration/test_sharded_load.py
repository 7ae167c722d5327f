"""python -m pytest tests/integration/test_sharded_load.py  (torchrun, gloo; ~8 min, all slow)

Sharded loading (train/parallel/sharded_load.py) against load_hf's whole model, in
tests/integration/sharded_load_worker.py, 2 processes: DDP and FSDP2 (tied embeddings, GPT-2's
fused q/k/v, Qwen3-Next), TP 2, EP 2 (MoE, FSDP2 and DDP), a bf16 checkpoint into fp32 parameters, each
rank's share of the bytes, the QAD teacher (train.qad.build_teacher), a student calibrated
after an FSDP2, EP 2 x FSDP2 or TP 2 sharded load (the whole student's amax), the LoRA base with
its adapters (EP 2 x FSDP2; quantized: FSDP2, EP 2 x FSDP2; the whole base's amax and logits);
4 processes: TP 2 x FSDP2 (also the calibrated student), TP 2 x EP 2 x FSDP2; train.pretrain
from an HF checkpoint; train.qad with the student loaded sharded under FSDP2 (losses, amax,
resume, hf-nvfp4 export) and under EP 2 x FSDP2 (losses, amax); train.finetune with the LoRA
base loaded sharded under FSDP2 (losses, peft export) and quantized (losses, amax, record,
resume). train.qad under TP 2 (sharded too): tests/integration/test_tp_quant.py. The memory
per rank at 1.6 GB: benchmarks/load_memory/run.py (docs/benchmarks.md#load-memory).
"""

import pytest

from tests.integration.test_parallel import pretrain

CASES = ["ddp_qwen3_tied", "fsdp_qwen3_tied", "fsdp_gpt2", "fsdp_qwen3_next", "tp2_qwen3_next", "tp2_qwen3", "tp2_gpt2",
         "ep2_fsdp_moe", "ep2_ddp_moe", "bf16_checkpoint_into_fp32", "fsdp_shares_bytes", "teacher_fsdp_bf16",
         "fsdp_student_calibrated_like_whole", "ep2_fsdp_student_calibrated_like_whole",
         "tp2_student_calibrated_like_whole", "lora_base_ep2_fsdp_moe", "quantized_lora_base_fsdp",
         "quantized_lora_base_ep2_fsdp_moe"]
FOUR_PROCESS_CASES = ["tp2_fsdp_qwen3", "tp2_ep2_fsdp_moe", "tp2_fsdp_student_calibrated_like_whole"]
# the worker's cases run in one torchrun per process count with the other files' (conftest.py shared_launch)
SHARED_LAUNCHES = {"test_sharded_load_equals_whole_load": ("sharded_load_worker", 2, CASES),
                   "test_four_processes": ("sharded_load_worker", 4, FOUR_PROCESS_CASES)}


@pytest.fixture(scope="module")
def results(shared_launch) -> dict:
    return shared_launch("sharded_load_worker", 2)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sharded_load_equals_whole_load(results, case):
    assert results[case] == "ok", results[case]


@pytest.mark.slow
def test_four_processes(shared_launch):
    """2-D and 3-D meshes: TP 2 x FSDP2 2 (also the student calibrated as laid out), TP 2 x EP 2 x FSDP2."""
    results = shared_launch("sharded_load_worker", 4)
    assert results == {case: "ok" for case in FOUR_PROCESS_CASES}, results


# ----------------------------------------------------------------- the real entrypoint

@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny random Qwen3 (tied embeddings) saved in bf16 by transformers."""
    import torch

    from tests.unit.hf_fixtures import build_tiny_hf_model

    directory = tmp_path_factory.mktemp("hf") / "qwen3-bf16"
    build_tiny_hf_model("qwen3-tied").to(torch.bfloat16).save_pretrained(directory)
    return directory


def pretrain_start(checkpoint) -> list[str]:
    return [f"model.hf_checkpoint={checkpoint}", "training.train_iters=2"]


@pytest.fixture(scope="module")
def one_process_pretrain(tmp_path_factory, bf16_checkpoint) -> list[float]:
    """The losses of `python -m train.pretrain` from the bf16 checkpoint in one process (the reference)."""
    return pretrain(tmp_path_factory.mktemp("one"), pretrain_start(bf16_checkpoint), processes=1)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["parallel.data_parallel=fsdp"], ["parallel.tensor_parallel_size=2"]],
                         ids=["fsdp", "tp2"])
def test_pretrain_from_hf_checkpoint_two_processes_match_one(tmp_path, bf16_checkpoint, one_process_pretrain,
                                                             overrides):
    """`torchrun -m train.pretrain model.hf_checkpoint=...`: each rank reads its part; the losses
    equal one process's (which reads the whole model the same way)."""
    one = one_process_pretrain
    two = pretrain(tmp_path / "two", [*pretrain_start(bf16_checkpoint), *overrides], processes=2)
    assert len(two) == 2 and two == pytest.approx(one, rel=1e-4)


# ----------------------------------------------------------------- the QAD student

def checkpoint_amax(directory) -> dict:
    """Every quantizer amax of a DCP checkpoint, read whole."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(directory, directory.parent / "whole.pt")
    state = torch.load(directory.parent / "whole.pt", weights_only=False)
    (directory.parent / "whole.pt").unlink()
    return {k: v for k, v in state["model"].items() if k.endswith("_amax")}


@pytest.mark.slow
def test_qad_student_loaded_sharded_under_fsdp_matches_one_process_resumes_and_exports(
        tmp_path, models, qad_four_iterations):
    """`torchrun -m train.qad` under FSDP2 with activation checkpointing: the student is read in
    parts and quantized as laid out; its losses and every amax equal one process's (the whole
    student: conftest.py's qad_four_iterations, which test_qad.py resumes too), quantizer_state.pt
    is the same record, resume is bitwise and hf-nvfp4 export works."""
    import shutil

    import torch

    from tests.integration.test_qad import RUN, checkpoints, losses, qad
    from train.export import export

    one_root, _ = qad_four_iterations
    args = ["training.train_iters=4", "checkpoint.save_interval=2"]
    two = qad(tmp_path / "two", models, "20260101_000001", *args, "parallel.data_parallel=fsdp",
              "parallel.activation_checkpointing=true", procs=2)
    assert "each rank reads its part" in two.stdout + two.stderr
    one_losses, two_losses = losses(one_root, "20260101_000001"), losses(tmp_path / "two", "20260101_000001")
    assert len(two_losses) == 4 and two_losses == pytest.approx(one_losses, rel=1e-4)

    middle = {"one": checkpoints(one_root) / "iter_0000002", "two": checkpoints(tmp_path / "two") / "iter_0000002"}
    whole, sharded = checkpoint_amax(middle["one"]), checkpoint_amax(middle["two"])
    assert len(whole) == 56 and sharded.keys() == whole.keys(), sorted(sharded.keys() ^ whole.keys())
    for name, value in sharded.items():
        torch.testing.assert_close(value, whole[name], rtol=1e-6, atol=0, msg=name)
    records = [torch.load(middle[run] / "quantizer_state.pt", weights_only=False) for run in ("one", "two")]
    assert records[1] == records[0]  # the same record (but for attribute order): old checkpoints still restore

    root = tmp_path / "two"
    shutil.rmtree(checkpoints(root) / "iter_0000004")
    (checkpoints(root) / "latest_checkpointed_iteration.txt").write_text("2\n")
    resumed = qad(root, models, "20260101_000002", *args, "parallel.data_parallel=fsdp",
                  "parallel.activation_checkpointing=true", procs=2)
    assert "quantizer state (nvfp4) restored" in resumed.stdout + resumed.stderr
    again = losses(root, "20260101_000002")
    assert sorted(again) == [3, 4] and again == {i: two_losses[i] for i in again}  # bitwise

    out = export(root / RUN, "hf-nvfp4", tmp_path / "export")  # in this process: the CLI has test_export.py
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


@pytest.mark.slow
def test_qad_moe_student_loaded_sharded_under_ep2_matches_one_process(tmp_path, qad_moe_ep2):
    """`torchrun -m train.qad parallel.expert_parallel_size=2` (x FSDP2), tiny-qwen3-moe (the job:
    conftest.py's qad_moe_ep2, which test_qad.py reads too): each rank reads its part (its 2 of the
    4 experts), then quantizes and calibrates its experts on the rows routed to them; the losses
    and every amax (experts included) equal one process's."""
    import json

    import torch

    from tests.integration.test_qad import QAD_MOE_ARGS, qad

    models, two_root, two = qad_moe_ep2
    qad(tmp_path / "one", models, "20260101_000001", *QAD_MOE_ARGS)
    assert "each rank reads its part" in two.stdout + two.stderr and "x ep 2" in two.stdout + two.stderr
    run = "tiny-qwen3-moe-Teacher-tiny-qwen3-moe-Data-synthetic-lr0.0001"
    roots = {"one": tmp_path / "one", "two": two_root}
    one_losses, two_losses = ([json.loads(line)["loss"] for line in path.read_text().splitlines()]
                              for path in (next((roots[root] / run / "logs").glob("*.jsonl"))
                                           for root in ("one", "two")))
    assert len(two_losses) == 2 and two_losses == pytest.approx(one_losses, rel=1e-4)

    final = {root: roots[root] / run / "checkpoints" / "tiny-qwen3-moe" / "iter_0000002" for root in ("one", "two")}
    whole, sharded = checkpoint_amax(final["one"]), checkpoint_amax(final["two"])
    assert sharded.keys() == whole.keys(), sorted(sharded.keys() ^ whole.keys())
    assert len([name for name in whole if ".experts." in name]) == 12, sorted(whole)  # 3 MoE layers x 4
    for name, value in sharded.items():
        torch.testing.assert_close(value, whole[name], rtol=1e-6, atol=0, msg=name)


# ----------------------------------------------------------------- the LoRA base

@pytest.fixture(scope="module")
def lora_base(tmp_path_factory):
    """A tiny-qwen3 HF checkpoint (seed 1234) with a tokenizer."""
    from tests.fixtures.synthetic_data import build_tokenizer, generate_documents
    from train.models import build_model, init_weights, save_hf

    base = tmp_path_factory.mktemp("lora") / "base"
    save_hf(init_weights(build_model("tiny-qwen3", device="cpu"), 1234), base)
    build_tokenizer(str(base), generate_documents(100, 40), 400)
    return base


@pytest.mark.slow
def test_lora_base_loaded_sharded_under_fsdp_matches_one_process_and_exports(tmp_path, lora_base):
    """`torchrun -m train.finetune` under FSDP2: the base is read in parts, the adapters added on
    meta start from one process's values; the losses and the exported (`--format peft`) trained
    adapters equal one process's (the whole base, adapters by apply_lora)."""
    import json

    import torch
    from safetensors.torch import load_file

    from tests.integration.test_finetune import finetune, output
    from train.export import export

    base = lora_base
    run = "tiny-qwen3-finetune-Data-synthetic-lr0.02"  # a high LR: the adapters move from their start
    # LoRA dropout off: its masks come from each rank's generator (seed + rank), unlike one process's
    args = ["lora.dropout=0", "optim.lr=0.02", "optim.warmup_iters=0", "training.train_iters=3", "training.micro_batch_size=2",
            "training.global_batch_size=4", "checkpoint.save_interval=3"]
    losses, adapters = {}, {}
    for procs, extra in ((1, []), (2, ["parallel.data_parallel=fsdp", "parallel.activation_checkpointing=true"])):
        root = tmp_path / f"p{procs}"
        result = finetune(root, base, *args, *extra, procs=procs, env_extra={"RUN_DATETIME": "20260101_000001"})
        assert result.returncode == 0, output(result)
        assert ("each rank reads its part" in result.stdout + result.stderr) == (procs == 2)
        log = next((root / run / "logs").glob("*_20260101_000001.jsonl"))
        losses[procs] = [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]
        exported = export(root / run, "peft", root / "peft")  # in this process: the CLI has test_finetune.py
        adapters[procs] = load_file(exported / "adapter_model.safetensors")
    assert len(losses[2]) == 3 and losses[2] == pytest.approx(losses[1], rel=1e-4)
    assert adapters[2].keys() == adapters[1].keys() and len(adapters[1]) > 0
    for name, value in adapters[2].items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, adapters[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(value.abs().sum() > 0 for name, value in adapters[1].items() if "lora_B" in name)  # trained


@pytest.mark.slow
def test_quantized_lora_base_loaded_sharded_under_fsdp_matches_one_process_and_resumes(tmp_path, lora_base):
    """`torchrun -m train.finetune lora.quantized_base=nvfp4` under FSDP2: the base is read in parts,
    quantized and calibrated as laid out with its adapters hidden; the losses, every amax and the
    quantizer record equal one process's (the whole base quantized before apply_lora), and a
    resume restores the quantizers on the laid-out base and continues bitwise."""
    import json
    import shutil

    import torch

    from tests.integration.test_finetune import finetune, output

    base = lora_base
    run = "tiny-qwen3-finetune-Data-synthetic-lr0.02"
    args = ["lora.quantized_base=nvfp4", "quant.calibration_batches=2", "lora.dropout=0", "optim.lr=0.02",
            "optim.warmup_iters=0", "training.train_iters=3", "training.micro_batch_size=2",
            "training.global_batch_size=4", "checkpoint.save_interval=2"]
    fsdp = ["parallel.data_parallel=fsdp"]

    def losses(root, datetime):
        log = next((root / run / "logs").glob(f"*_{datetime}.jsonl"))
        return {r["iteration"]: r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r}

    for procs, extra in ((1, []), (2, fsdp)):
        result = finetune(tmp_path / f"p{procs}", base, *args, *extra, procs=procs,
                          env_extra={"RUN_DATETIME": "20260101_000001"})
        assert result.returncode == 0, output(result)
        assert ("each rank reads its part" in result.stdout + result.stderr) == (procs == 2)
        assert "quantized with recipe nvfp4" in result.stdout + result.stderr
    one, two = losses(tmp_path / "p1", "20260101_000001"), losses(tmp_path / "p2", "20260101_000001")
    assert sorted(two) == [1, 2, 3] and list(two.values()) == pytest.approx(list(one.values()), rel=1e-4)

    middle = {procs: tmp_path / f"p{procs}" / run / "checkpoints" / "tiny-qwen3" / "iter_0000002"
              for procs in (1, 2)}
    whole, sharded = checkpoint_amax(middle[1]), checkpoint_amax(middle[2])
    assert len(whole) == 56 and sharded.keys() == whole.keys(), sorted(sharded.keys() ^ whole.keys())
    assert any(".q_proj.base_layer.input_quantizer." in name for name in whole)  # quantized before the adapters
    for name, value in sharded.items():
        torch.testing.assert_close(value, whole[name], rtol=1e-6, atol=0, msg=name)
    records = [torch.load(middle[procs] / "quantizer_state.pt", weights_only=False) for procs in (1, 2)]
    assert records[1] == records[0]

    checkpoints = middle[2].parent
    shutil.rmtree(checkpoints / "iter_0000003", ignore_errors=True)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("2\n")
    resumed = finetune(tmp_path / "p2", base, *args, *fsdp, procs=2, env_extra={"RUN_DATETIME": "20260101_000002"})
    assert resumed.returncode == 0, output(resumed)
    assert "quantizer state (nvfp4) restored" in resumed.stdout + resumed.stderr
    assert losses(tmp_path / "p2", "20260101_000002") == {3: two[3]}  # bitwise
