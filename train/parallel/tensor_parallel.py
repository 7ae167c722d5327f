"""Tensor parallelism with DTensor: Megatron's column/row split of every block, from outside.

    python -m pytest tests/integration/test_parallel.py -k tensor_parallel

Per block (TP ranks t = 0..TP-1, D hidden, H/KV heads of hd, F MLP hidden):
    q/k/v_proj, gate/up_proj  colwise: weight (out/TP, D) Shard(0); output (B, T, out/TP) stays local
    o_proj, down_proj         rowwise: weight (D, in/TP) Shard(1); partial outputs all-reduced
    so rank t computes heads [t*H/TP, (t+1)*H/TP) and KV heads [t*KV/TP, ...): GQA stays local.
    q_norm/k_norm (Qwen3)     weight (hd,) Replicate; the input (B, T, H/TP, hd) is Shard(2) (heads),
                              so the weight gradient, a sum over heads, is reduced over TP ranks
Outside the blocks:
    embed_tokens              rowwise: (vocab/TP, D) Shard(0), output all-reduced to Replicate
    lm_head                   colwise: (vocab/TP, D) Shard(0), logits gathered to (B, T, vocab)
    tied embeddings           both Shard(0) on vocab: re-tied after the split
Every other parameter (norms, GPT-2 positions) becomes a Replicate DTensor on the TP mesh, so
all parameters live on one mesh (clip_grad_norm_ and the optimizer see one kind of tensor).
MoE blocks (Megatron's expert TP size 1): attention splits as above; the MoE input (B, T, D) is
the same on every TP rank, so each TP rank runs the whole MoE: the router (and a shared expert)
as Replicate DTensors, the routed experts as plain tensors, split over EP ranks instead
(expert_parallel.py) or whole. Experts then sit in an AdamW group of their own (train/optim.py)
and expert_parallel.clip_gradients sums norms over both kinds.
"""

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def block_plan(block: nn.Module) -> dict:
    """The parallelize_module plan of one TransformerBlock (names as in HF; GPT-2 has no gate_proj)."""
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel()}
    if is_moe(block.mlp):  # replicated: see the module docstring
        return plan
    plan.update({"mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    if hasattr(block.mlp, "gate_proj"):
        plan["mlp.gate_proj"] = ColwiseParallel()
    return plan


def is_moe(module: nn.Module) -> bool:
    from train.models.common.moe import MoE

    return isinstance(module, MoE)


def is_routed_experts(module: nn.Module) -> bool:
    from train.models.common.moe import GroupedExperts

    return isinstance(module, GroupedExperts)


# Tied or not, embedding and lm_head split the vocabulary (dim 0 of both weights).
OUTER_PLAN = {
    "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    "lm_head": ColwiseParallel(output_layouts=Replicate()),  # logits (B, T, vocab) on every rank
}


def _local_to_dtensor(placement, module, inputs, mesh):
    return tuple(DTensor.from_local(x, mesh, [placement], run_check=False)
                 if isinstance(x, torch.Tensor) else x for x in inputs)


def _dtensor_to_local(module, output, mesh):
    return output.to_local() if isinstance(output, DTensor) else output


def replicate_module(module: nn.Module, mesh: DeviceMesh, input_placement=Replicate()) -> None:
    """Parameters become Replicate DTensors; the module keeps plain tensors in and out.

    input_placement says how each rank's plain input relates to the whole: Replicate() (every
    rank holds the same activations) or Shard(d) (each rank holds a slice along d); DTensor then
    reduces the parameter gradients over the TP ranks exactly where the math needs it.
    """
    distribute_module(module, mesh, input_fn=partial(_local_to_dtensor, input_placement),
                      output_fn=_dtensor_to_local)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Splits `model` (a CausalLM) over tp_mesh in place; returns it."""
    tied = model.args.tie_embeddings
    parallelize_module(model, tp_mesh, OUTER_PLAN)
    if tied:
        model.tie_weights()  # parallelize_module made two DTensors out of the one shared weight
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan(block))
        attention = block.self_attn
        if attention.q_norm is not None:  # (B, T, heads/TP, hd): local heads, dim 2
            replicate_module(attention.q_norm, tp_mesh, Shard(2))
            replicate_module(attention.k_norm, tp_mesh, Shard(2))
    # Whatever is still a plain parameter: norms, GPT-2's learned positions, MoE routers; not the
    # routed experts, which take sorted rows and per-expert counts, not activations.
    for module in model.modules():
        if is_routed_experts(module):
            continue
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            replicate_module(module, tp_mesh)
    return model
