"""torchrun --nproc-per-node=2 tests/integration/tp_quant_worker.py RESULTS.json [CASES]  (driven by test_tp_quant.py;
the *_tp2_ep2_fsdp case needs --nproc-per-node=4)

Fake-quantized students (modelopt, our CPU NVFP4 kernel; FP8) under tensor parallelism 2:
every rank quantizes its own copy of a debug model exactly as a QAD job does (calibrated on
the same batch, amax all-reduced with MAX), keeps one as the single-device reference and
splits the other with train.parallel. Losses, gradients and weights over a few AdamW steps
must match the reference, the quantizers' amax must stay plain tensors, equal on both ranks.
Rank 0 writes {case: "ok" | the first failing rank's traceback} to RESULTS.json (worker_cases.py).
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from expert_parallel_worker import expected_share
from parallel_worker import GLOBAL_BATCH, batch, clean, fresh_model, full, loss_of, optim_cfg, parallel_cfg
from train.optim import build_optimizer
from train.parallel import build_mesh, clip_gradients, parallelize
from train.parallel.tensor_parallel import quantizers
from train.quant.recipes import quantize_model
from worker_cases import cases_of, run_cases  # same folder: the shared main()

MAX_NORM = 0.5  # as expert_parallel_worker: clip_gradients (split and plain tensors) against clip_grad_norm_


def quantized(name: str, recipe: str):
    """The debug model `name`, fake-quantized with `recipe`, calibrated on one batch (2, 16)."""
    model = fresh_model(name)
    return quantize_model(model, recipe, [batch(model.args.vocab_size, 99)[:2, :-1]])


def amax_values(model) -> dict[str, torch.Tensor]:
    return {clean(n): q._amax for n, q in quantizers(model) if hasattr(q, "_amax")}


def check_amax(model, reference) -> None:
    """Each amax: a plain tensor, equal to the reference's, the same on both ranks."""
    values, expected = amax_values(model), amax_values(reference)
    assert values.keys() == expected.keys() and values, sorted(values.keys() ^ expected.keys())
    for name, amax in values.items():
        assert not isinstance(amax, DTensor), name
        torch.testing.assert_close(amax, expected[name], rtol=0, atol=0, msg=name)
        gathered = [torch.empty_like(amax) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, amax)
        assert all(torch.equal(g, amax) for g in gathered), (name, gathered)


def train_and_compare(name: str, recipe: str, steps: int = 3, **parallel) -> None:
    """TP 2 (default: dp 1 on 2 ranks, both see the whole batch) against the single-device
    reference; `parallel` overrides parallel_cfg (EP, FSDP on 4 ranks). Gradients are compared
    after clipping (expert_parallel.clip_gradients: one norm over split and plain tensors)."""
    cfg = parallel_cfg(tensor_parallel_size=2, **parallel)
    world, rank, tp, ep = dist.get_world_size(), dist.get_rank(), cfg.tensor_parallel_size, cfg.expert_parallel_size
    reference = quantized(name, recipe)
    reference_optimizer = build_optimizer(reference, optim_cfg())
    model = parallelize(quantized(name, recipe), cfg, build_mesh(world, tp, ep=ep), "cpu")
    optimizer = build_optimizer(model, optim_cfg())
    attention = next(block.self_attn for block in model.layers if hasattr(block, "self_attn"))
    assert attention.q_proj.weight.placements[-1] == Shard(0) and attention.o_proj.weight.placements[-1] == Shard(1)
    assert attention.o_proj.weight_quantizer.is_enabled and attention.o_proj.input_quantizer.is_enabled
    check_amax(model, reference)
    dp_rank = rank // tp
    share = GLOBAL_BATCH // (world // tp)
    for step in range(steps):
        tokens = batch(reference.args.vocab_size, step)
        reference_loss = loss_of(reference, tokens)
        reference_loss.backward()
        reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        loss = loss_of(model, tokens[dp_rank * share:(dp_rank + 1) * share])
        loss.backward()
        norm = clip_gradients(model, MAX_NORM)
        loss = loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # TP ranks hold the same loss
        torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"step {step} loss: {m}")
        torch.testing.assert_close(full(norm), reference_norm, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} norm: {m}")
        reference_grads = {n: p.grad for n, p in reference.named_parameters()}
        for n, p in model.named_parameters():
            expected = expected_share(reference_grads[clean(n)], clean(n), ep, tp)
            torch.testing.assert_close(full(p.grad), expected, rtol=1e-3, atol=1e-5,
                                       msg=lambda m, n=n: f"step {step} grad {n}: {m}")
        reference_optimizer.step(), reference_optimizer.zero_grad()
        optimizer.step(), optimizer.zero_grad()
    reference_params = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        expected = expected_share(reference_params[clean(n)].detach(), clean(n), ep, tp)
        torch.testing.assert_close(full(p.detach()), expected, rtol=1e-3, atol=1e-4,
                                   msg=lambda m, n=n: f"weight {n}: {m}")
    check_amax(model, reference)  # training moves weights, never the calibrated amax


def case_nvfp4_qwen3():  # o_proj in 64 / 2 = 32, down_proj in 192 / 2 = 96: whole NVFP4 blocks
    train_and_compare("debug-qwen3", "nvfp4")


def case_fp8_qwen3():  # per-tensor E4M3: modelopt's own CPU kernel on the local shards
    train_and_compare("debug-qwen3", "fp8")


def case_nvfp4_llama2():  # untied lm_head, no q/k norm
    train_and_compare("debug-llama2", "nvfp4")


def case_nvfp4_qwen3_moe():  # attention split; the MoE (quantized grouped experts) whole on each rank
    train_and_compare("debug-qwen3-moe", "nvfp4")


def case_nvfp4_qwen3_next():
    """Gated DeltaNet split by key heads: in_proj_qkvz (colwise) and out_proj (rowwise, input
    64 / 2 = 32: whole NVFP4 blocks) quantized; in_proj_ba, the conv and the routers are not
    (modelopt's defaults); gated attention as Qwen3's; the MoE whole on each rank."""
    deltanet = quantized("debug-qwen3-next", "nvfp4").layers[0].linear_attn
    assert deltanet.in_proj_qkvz.weight_quantizer.is_enabled and deltanet.out_proj.input_quantizer.is_enabled
    assert not deltanet.in_proj_ba.weight_quantizer.is_enabled
    train_and_compare("debug-qwen3-next", "nvfp4")


def case_nvfp4_qwen3_moe_tp2_ep2_fsdp():
    """4 processes: conf.d/qwen3-30b-a3b-thinking-2507-moe.conf in small (TP pairs, experts split
    over EP 2 across them, FSDP2 over the 2 data-parallel ranks), with its nvfp4 student."""
    train_and_compare("debug-qwen3-moe", "nvfp4", expert_parallel_size=2, data_parallel="fsdp")


if __name__ == "__main__":
    run_cases(cases_of(globals()))
