"""torchrun --nproc-per-node=2 tests/integration/sharded_load_worker.py RESULTS.json  (driven by test_sharded_load.py)

Each case saves a tiny random HF checkpoint (rank 0, next to RESULTS.json), builds our model on
the meta device, lays it out with train.parallel (FSDP2, TP 2, EP 2) and loads it with
load_hf_sharded; the reference is load_hf's whole model on every rank. Weights gathered whole
must be bit-identical to the reference's, logits equal (FSDP2: bit-identical; TP/EP add partial
sums in another order), and each rank must hold only its share of the bytes.
"""

import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from train.config import ParallelConfig
from train.models import build_model, hf_args, load_hf
from train.parallel import ParallelLayout, build_mesh, load_hf_sharded, parallelize
from train.parallel.expert_parallel import expert_parallel_state
from train.parallel.sharded_load import local_bytes, our_name
from worker_cases import cases_of, run_cases  # same folder: the shared main()

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.unit.hf_fixtures import build_tiny_hf_model  # noqa: E402


def checkpoint(kind: str, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny random HF checkpoint of `kind` saved in `dtype` (once, by rank 0)."""
    directory = Path(sys.argv[1]).parent / f"{kind}-{str(dtype).removeprefix('torch.')}"
    if dist.get_rank() == 0 and not directory.exists():
        build_tiny_hf_model(kind).to(dtype).save_pretrained(directory)
    dist.barrier()
    return directory


def sharded(path: Path, cfg: ParallelConfig, dtype: torch.dtype = torch.float32):
    """Meta model -> parallelize (TP/EP/FSDP2) -> each rank reads its part."""
    mesh = build_mesh(dist.get_world_size(), cfg.tensor_parallel_size, ep=cfg.expert_parallel_size)
    model = build_model(hf_args(path), device="meta", dtype=dtype)
    return parallelize(model, cfg, mesh, "cpu", materialize=partial(load_hf_sharded, path=path, dtype=dtype))


def whole_tensor(model, name: str, parameter: torch.Tensor) -> torch.Tensor:
    """The global tensor of a parameter: DTensors gathered, EP experts gathered over "ep"."""
    if isinstance(parameter, DTensor):
        return parameter.full_tensor()
    state = expert_parallel_state(model)  # through a DDP wrapper
    if state is not None and our_name(name) in state.expert_names:
        parts = [torch.empty_like(parameter) for _ in range(state.ep_mesh.size())]
        dist.all_gather(parts, parameter.contiguous(), group=state.ep_mesh.get_group())
        return torch.cat(parts)
    return parameter


def assert_loaded_like_whole(model, reference, exact_logits: bool) -> None:
    references = dict(reference.named_parameters())
    names = [our_name(n) for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(references), (names, list(references))
    for name, parameter in model.named_parameters():
        got = whole_tensor(model, name, parameter.detach())
        assert got.dtype == references[our_name(name)].dtype, (name, got.dtype)
        assert torch.equal(got, references[our_name(name)]), f"{name}: differs from the whole load"
    tokens = torch.randint(0, reference.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, expected = model(tokens), reference(tokens)
    if exact_logits:
        assert torch.equal(logits, expected), (logits - expected).abs().max()
    else:
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def compare(kind: str, exact_logits: bool, **parallel) -> None:
    path = checkpoint(kind)
    model = sharded(path, ParallelConfig(**parallel))
    assert_loaded_like_whole(model, load_hf(path, torch.float32), exact_logits)


def case_ddp_qwen3_tied():
    """DDP replicas (plain tensors, whole on every rank), loaded before DDP wraps the model;
    to_empty unties lm_head from the embedding, the load ties them again."""
    compare("qwen3-tied", exact_logits=True, data_parallel="ddp")


def case_fsdp_qwen3_tied():
    """FSDP2 Shard(0); tied embeddings: one parameter, read once, still tied."""
    compare("qwen3-tied", exact_logits=True, data_parallel="fsdp")


def case_fsdp_gpt2():
    """q/k/v from GPT-2's fused, transposed c_attn; Conv1D weights transposed."""
    compare("gpt2", exact_logits=True, data_parallel="fsdp")


def case_tp2_qwen3():
    """TP 2: colwise Shard(0) (q/k/v/gate/up, lm_head, embedding), rowwise Shard(1) (o/down)."""
    compare("qwen3", exact_logits=False, tensor_parallel_size=2)


def case_tp2_gpt2():
    """TP 2 on GPT-2: a rank's q rows are a column range of the fused c_attn."""
    compare("gpt2", exact_logits=False, tensor_parallel_size=2)


def case_tp2_fsdp_qwen3():
    """4 processes: TP 2 x FSDP2 2 on the 2-D mesh (q/k/v rows split by TP, then by FSDP2)."""
    compare("qwen3", exact_logits=False, tensor_parallel_size=2, data_parallel="fsdp")


def case_tp2_ep2_fsdp_moe():
    """4 processes: TP 2 x EP 2 x FSDP2 (the qwen3-30b-a3b layout in small)."""
    compare("qwen3-moe", exact_logits=False, tensor_parallel_size=2, expert_parallel_size=2, data_parallel="fsdp")


def case_ep2_fsdp_moe():
    """EP 2: each rank reads its 2 of the 4 experts (per-expert tensors on disk); FSDP2 the rest."""
    compare("qwen3-moe", exact_logits=False, expert_parallel_size=2, data_parallel="fsdp")


def case_fsdp_qwen3_next():
    """Qwen3-Next: Gated DeltaNet (fused in_proj_qkvz/ba, conv, A_log), gated attention, routed
    experts per expert on disk and a shared expert, under FSDP2."""
    compare("qwen3-next", exact_logits=True, data_parallel="fsdp")


def case_tp2_qwen3_next():
    """TP 2 on Qwen3-Next: each rank reads its key heads' rows of the fused in_proj_qkvz/ba (HF's
    per-key-head layout), its value heads of A_log and dt_bias, the whole conv weight (Replicate),
    the MoE layers whole."""
    compare("qwen3-next", exact_logits=False, tensor_parallel_size=2)


def case_ep2_ddp_moe():
    """EP 2 under DDP: loaded before DDP wraps (and broadcasts) the model."""
    compare("qwen3-moe", exact_logits=False, expert_parallel_size=2, data_parallel="ddp")


def case_bf16_checkpoint_into_fp32():
    """A bf16 checkpoint into fp32 trainable parameters (master weights): the bf16 values exactly."""
    path = checkpoint("qwen3", torch.bfloat16)
    model = sharded(path, ParallelConfig(data_parallel="fsdp"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in model.parameters())
    assert_loaded_like_whole(model, load_hf(path, torch.float32), exact_logits=True)


def case_fsdp_shares_bytes():
    """Under FSDP2 each rank holds about 1/2 of the parameter bytes, and the ranks together all."""
    path = checkpoint("qwen3")
    model = sharded(path, ParallelConfig(data_parallel="fsdp"))
    whole = sum(p.numel() * p.element_size() for p in load_hf(path, torch.float32).parameters())
    mine = torch.tensor(local_bytes(model))
    assert mine <= 0.55 * whole, (int(mine), whole)
    dist.all_reduce(mine)
    assert mine == whole, (int(mine), whole)


def assert_calibrated_like_whole(kind: str, quantizer_count: int, exact: bool, exact_logits: bool | None = None,
                                 **parallel) -> dict:
    """The QAD job's path (train/engine.py loads_sharded), without the job: a student loaded sharded,
    then fake-quantized (nvfp4) and calibrated as laid out, gets every amax of the whole student
    calibrated in one process on the same batches (exact: bit for bit), and its logits
    (exact_logits, default exact: bit for bit)."""
    from train.parallel.tensor_parallel import quantizers
    from train.quant.recipes import quantize_model

    path = checkpoint(kind, torch.bfloat16)
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))]
    reference = quantize_model(load_hf(path, torch.float32), "nvfp4", batches)
    model = quantize_model(sharded(path, ParallelConfig(**parallel)), "nvfp4", batches)
    expected = {n: q._amax for n, q in quantizers(reference) if hasattr(q, "_amax")}
    amax = {our_name(n): q._amax for n, q in quantizers(model) if hasattr(q, "_amax")}
    assert amax.keys() == expected.keys(), sorted(amax.keys() ^ expected.keys())
    assert len(amax) == quantizer_count, len(amax)
    whole = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert local_bytes(model) <= 0.6 * whole, (local_bytes(model), whole)  # not the whole student
    for name, value in amax.items():
        if exact:
            assert torch.equal(value, expected[name]), (name, value, expected[name])
        else:
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=0, msg=name)
    with torch.no_grad():
        logits, whole = model(batches[0]), reference(batches[0])
    if exact if exact_logits is None else exact_logits:
        assert torch.equal(logits, whole)
    else:
        torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)
    return amax


def case_fsdp_student_calibrated_like_whole():
    """FSDP2: bit-identical amax and logits."""
    assert_calibrated_like_whole("qwen3", 28, exact=True, data_parallel="fsdp")


def case_ep2_fsdp_student_calibrated_like_whole():
    """EP 2 x FSDP2 (qwen3-moe, 4 experts): each rank calibrates its 2 experts on the rows routed
    to them from both ranks; modelopt's MAX all-reduce of every amax makes a layer's expert
    quantizers (one per grouped GEMM) cover all 4 experts, as in the whole student."""
    amax = assert_calibrated_like_whole("qwen3-moe", 26, exact=False, expert_parallel_size=2, data_parallel="fsdp")
    experts = sorted(name for name in amax if ".experts." in name)
    assert len(experts) == 4, experts  # its MoE layer: gate_up/down x input/weight


def case_tp2_student_calibrated_like_whole():
    """TP 2 (train/engine.py loads_sharded): a colwise weight quantizer sees its rank's rows, and
    modelopt's MAX all-reduce over the ranks gives the whole weight's amax; the rowwise Linears
    compute whole during calibration (tensor_parallel.rowwise_computed_whole), so every activation
    is one device's: every amax bit for bit (the logits after it, TP's partial sums, within 1e-5)."""
    assert_calibrated_like_whole("qwen3", 28, exact=True, exact_logits=False, tensor_parallel_size=2)


def case_tp2_fsdp_student_calibrated_like_whole():
    """4 processes: TP 2 x FSDP2 2, every amax of the whole student bit for bit."""
    assert_calibrated_like_whole("qwen3", 28, exact=True, exact_logits=False, tensor_parallel_size=2,
                                 data_parallel="fsdp")


def assert_lora_base_like_whole(kind: str, recipe: str | None, **parallel) -> None:
    """The LoRA job's sharded path (train/engine.py sharded_model_path), without the job: the base
    built on meta with its adapters, laid out and read in parts, then (recipe) fake-quantized and
    calibrated with the adapters hidden, equals the whole base quantized, then adapted by
    apply_lora (train/engine.py whole_model_path): the same quantizers and amax, the same record,
    and with every lora_B set to 0.01 (the adapters then count) the same logits."""
    from train.config import LoraConfig
    from train.engine import sharded_lora_model
    from train.lora import adapters_hidden, apply_lora
    from train.parallel.tensor_parallel import quantizers
    from train.quant.recipes import quantize_model, quantizer_state

    path = checkpoint(kind, torch.bfloat16)
    cfg = SimpleNamespace(lora=LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj,o_proj"))
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))]
    torch.manual_seed(7)
    reference = load_hf(path, torch.float32)
    if recipe:
        reference = quantize_model(reference, recipe, batches)
        expected_record = quantizer_state(reference)
    reference = apply_lora(reference, cfg.lora)

    torch.manual_seed(7)
    mesh = build_mesh(dist.get_world_size(), 1, ep=parallel.get("expert_parallel_size", 1))
    model, materialize = sharded_lora_model(cfg, build_model(hf_args(path), device="meta"),
                                            partial(load_hf_sharded, path=path, dtype=torch.float32))
    model = parallelize(model, ParallelConfig(**parallel), mesh, "cpu", materialize=materialize)
    if recipe:
        with adapters_hidden(model):
            model = quantize_model(model, recipe, batches)
            assert quantizer_state(model) == expected_record
        amax = {our_name(n): q._amax for n, q in quantizers(model) if hasattr(q, "_amax")}
        expected = {our_name(n): q._amax for n, q in quantizers(reference) if hasattr(q, "_amax")}
        assert amax.keys() == expected.keys() and amax, sorted(amax.keys() ^ expected.keys())
        for name, value in amax.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=0, msg=name)
    for module in (model, reference):
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.data.fill_(0.01)
    whole = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert local_bytes(model) <= 0.6 * whole, (local_bytes(model), whole)
    with torch.no_grad():
        torch.testing.assert_close(model(batches[0]), reference(batches[0]), rtol=1e-5, atol=1e-5)


def case_lora_base_ep2_fsdp_moe():
    """The unquantized LoRA base of a MoE model under EP 2 x FSDP2: each rank its 2 of 4 experts."""
    assert_lora_base_like_whole("qwen3-moe", None, expert_parallel_size=2, data_parallel="fsdp")


def case_quantized_lora_base_fsdp():
    """lora.quantized_base=nvfp4 under FSDP2: quantized after the sharded load, adapters hidden."""
    assert_lora_base_like_whole("qwen3", "nvfp4", data_parallel="fsdp")


def case_quantized_lora_base_ep2_fsdp_moe():
    """lora.quantized_base=nvfp4 on a MoE base under EP 2 x FSDP2."""
    assert_lora_base_like_whole("qwen3-moe", "nvfp4", expert_parallel_size=2, data_parallel="fsdp")


def case_teacher_fsdp_bf16():
    """train.qad.build_teacher: frozen, in the checkpoint's dtype (bf16), FSDP2-sharded."""
    from train.qad import build_teacher

    path = checkpoint("qwen3", torch.bfloat16)
    cfg = SimpleNamespace(distill=SimpleNamespace(teacher_checkpoint=str(path)),
                          parallel=ParallelConfig(data_parallel="fsdp"))
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = ParallelLayout(world, rank, 1, 1, "cpu", build_mesh(world, 1))
    teacher = build_teacher(cfg, layout)
    assert all(isinstance(p, DTensor) and not p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16} and not teacher.training
    assert_loaded_like_whole(teacher, load_hf(path).eval(), exact_logits=True)


if __name__ == "__main__":
    run_cases(cases_of(globals()))
