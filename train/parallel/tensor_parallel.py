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
Qwen3-Next (train/models/qwen3_next.py; heads whole on each rank, t's share the t-th):
    gated attention           q_proj (2 H hd, D) colwise: per head [query hd | gate hd], so
                              Shard(0) keeps whole heads; k/v_proj colwise, o_proj rowwise;
                              q_norm/k_norm as Qwen3's (Replicate, input Shard(2))
    Gated DeltaNet            nk key heads of dk, nv = r nk value heads of dv, C = 2 nk dk + nv dv:
      in_proj_qkvz            (nk (2 dk + 2 r dv), D) colwise: per key head [q | k | v | z],
                              contiguous, so Shard(0) gives rank t key heads [t nk/TP, ...) whole
      in_proj_ba              (2 nv, D) colwise: per key head [b (r) | a (r)], the same heads
      A_log, dt_bias          (nv,) Shard(0): value heads [t nv/TP, ...), those of t's key heads
      conv1d.weight           (C, 1, K) Replicate; see split_gated_deltanet
      norm.weight             (dv,) Replicate, input (B, T, nv/TP, dv) Shard(2), as q_norm
      out_proj                (D, nv dv) rowwise
    the delta-rule state (B, nv/TP, dk, dv) of each head stays on its rank: no communication
    inside the mixer, one all-reduce after out_proj as after o_proj.
MoE blocks (Megatron's expert TP size 1): attention splits as above; the MoE input (B, T, D) is
the same on every TP rank, so each TP rank runs the whole MoE: the router (and a shared expert)
as Replicate DTensors, the routed experts as plain tensors, split over EP ranks instead
(expert_parallel.py) or whole. Experts then sit in an AdamW group of their own (train/optim.py)
and expert_parallel.clip_gradients sums norms over both kinds.
Quantized students (modelopt's QuantLinear: an nn.Linear with input_quantizer/weight_quantizer
submodules holding the calibrated per-tensor `_amax` buffers) split the same way:
    the split styles below shard only the Linear's own weight and bias, never its quantizers;
    modelopt's TensorQuantizer.forward unwraps a DTensor input or weight, fake-quantizes the
    local shard and wraps the result again with the same placements, and the amax it uses
    stays a plain tensor, the global one, the same on every rank (calibrated on the whole
    student before the split, or, loaded sharded, after it: each rank's amax of its shard,
    MAX all-reduced by modelopt, with the rowwise Linears computed whole during calibration,
    rowwise_computed_whole, so that the activations are one device's);
    NVFP4 scales one block of 16 along the last (input) dim: colwise shards keep whole rows,
    rowwise shards (weight (D, in/TP), input (B, T, in/TP)) must start on a block boundary,
    so in/TP must be a multiple of 16 (check_quantized_split), and then every block holds the
    same 16 values as on one device: the same numbers as TP_SIZE=1.
"""

import contextlib
import sys
from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


class LinearColwise(ColwiseParallel):
    """ColwiseParallel that shards the Linear's own weight and bias (dim 0) and none of its
    submodules: torch's version shards every parameter below the Linear, and RowwiseParallel
    reads `.weight` of each submodule, which modelopt's quantizers do not have."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name:  # a submodule of the Linear (a quantizer): its buffers stay whole
            return
        for key, param in module.named_parameters(recurse=False):
            module.register_parameter(key, nn.Parameter(
                distribute_tensor(param, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad))


class LinearRowwise(RowwiseParallel):
    """RowwiseParallel for the Linear's own weight (dim 1) and bias (Replicate) only."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name:
            return
        for key, param in module.named_parameters(recurse=False):
            placement = Shard(1) if key == "weight" else Replicate()
            module.register_parameter(key, nn.Parameter(
                distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad))


def block_plan(block: nn.Module) -> dict:
    """The parallelize_module plan of one TransformerBlock (names as in HF; GPT-2 has no gate_proj;
    a Qwen3-Next block holds self_attn or linear_attn)."""
    if hasattr(block, "linear_attn"):  # Gated DeltaNet: split_gated_deltanet does the rest
        plan = {"linear_attn.in_proj_qkvz": LinearColwise(), "linear_attn.in_proj_ba": LinearColwise(),
                "linear_attn.out_proj": LinearRowwise()}
    else:
        plan = {"self_attn.q_proj": LinearColwise(), "self_attn.k_proj": LinearColwise(),
                "self_attn.v_proj": LinearColwise(), "self_attn.o_proj": LinearRowwise()}
    if is_moe(block.mlp):  # replicated: see the module docstring
        return plan
    plan.update({"mlp.up_proj": LinearColwise(), "mlp.down_proj": LinearRowwise()})
    if hasattr(block.mlp, "gate_proj"):
        plan["mlp.gate_proj"] = LinearColwise()
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
    "lm_head": LinearColwise(output_layouts=Replicate()),  # logits (B, T, vocab) on every rank
}


def quantizers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """modelopt's TensorQuantizers below `module` as (name, quantizer); none when modelopt was never
    imported (nothing can be quantized then, and plain training does not pay for the import)."""
    quant_nn = sys.modules.get("modelopt.torch.quantization.nn")
    if quant_nn is None:
        return []
    return [(name, m) for name, m in module.named_modules() if isinstance(m, quant_nn.TensorQuantizer)]


def block_size(quantizer) -> int | None:
    """The block length along the last dim of an enabled block quantizer (NVFP4: 16), else None."""
    sizes = getattr(quantizer, "block_sizes", None)
    if not quantizer.is_enabled or not isinstance(sizes, dict):
        return None
    return sizes.get(-1)


def check_quantized_split(model: nn.Module, tp: int) -> None:
    """Raises ValueError (naming the quantizer) when a quantized Linear of the block plan cannot
    be split over `tp` ranks (no-op for an unquantized model):
    - rowwise: the input shard (in/TP) must hold whole quantization blocks (NVFP4: 16), and the
      output, partial sums all-reduced after the Linear, cannot be quantized;
    - an enabled quantizer that sees a shard (weights, rowwise inputs) needs a calibrated amax:
      a dynamic per-tensor amax would be the max over one rank's shard, not the whole tensor."""
    for index, block in enumerate(model.layers):
        for target, style in block_plan(block).items():
            linear = block.get_submodule(target)
            rowwise = isinstance(style, RowwiseParallel)
            for name, quantizer in quantizers(linear):
                where = f"model.layers.{index}.{target}.{name}"
                sees_shard = rowwise or name == "weight_quantizer"  # colwise inputs are whole
                if rowwise and name == "output_quantizer" and quantizer.is_enabled:
                    raise ValueError(f"TP_SIZE={tp}: quantizer {where} is enabled, but a rowwise split Linear "
                                     "outputs partial sums (all-reduced after it): use a recipe without "
                                     "output quantizers or TP_SIZE=1")
                if quantizer.is_enabled and sees_shard and not hasattr(quantizer, "_amax"):
                    raise ValueError(f"TP_SIZE={tp}: quantizer {where} has no calibrated amax (quant.calibration_batches"
                                     "=0?); under tensor parallelism each rank would compute its own "
                                     "amax over its shard: calibrate with quant.calibration_batches >= 1")
                size = block_size(quantizer)
                if rowwise and size and linear.in_features // tp % size:
                    raise ValueError(
                        f"TP_SIZE={tp} splits the input dim of {where} ({linear.in_features}) into shards of "
                        f"{linear.in_features // tp}, not a multiple of the quantization block size {size}: "
                        f"use a TP_SIZE that leaves multiples of {size}")


def keep_quantizer_buffers_local(model: nn.Module) -> None:
    """distribute_module turned every buffer below a split module into a Replicate DTensor; the
    quantizers compute on local tensors (their forward unwraps DTensor inputs), so their amax
    goes back to a plain tensor: rank 0's value, broadcast by the split, the same on every rank."""
    for _, quantizer in quantizers(model):
        for key, buffer in quantizer._buffers.items():
            if isinstance(buffer, DTensor):
                quantizer._buffers[key] = buffer.to_local()


@contextlib.contextmanager
def rowwise_computed_whole(model: nn.Module):
    """Inside: every rowwise-split Linear (weight Shard(1) on "tp": o_proj, down_proj) computes its
    output from the whole input and the whole weight, all-gathered one Linear at a time, instead
    of adding the ranks' partial sums; no-op without TP. For calibration on a laid-out student
    (train/quant/recipes.py quantize_model): partial sums added in another order move an
    activation's last bits, the input amax calibrated from it moves with them, and NVFP4 turns a
    moved amax into whole quantization steps for the values on a rounding boundary; computed
    whole, every activation and amax is one device's (bit for bit on the CPU). Its quantizers
    see the whole tensors; the outputs (B, T, D) are Replicate, as after the all-reduce."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and isinstance(m.weight, DTensor)
               and Shard(1) in m.weight.placements]
    for linear in linears:
        linear.forward = partial(_whole_rowwise_forward, linear)
    try:
        yield model
    finally:
        for linear in linears:
            del linear.forward  # the class's (modelopt's QuantLinear) forward again


def _whole_rowwise_forward(linear: nn.Linear, inputs: DTensor) -> DTensor:
    """inputs: (B, T, in) Shard(-1), as RowwiseParallel's input hook makes it; the weight as FSDP2
    unsharded it for this forward, (out, in) Shard(1)."""
    def unchanged(tensor):
        return tensor

    quantize_input, quantize_weight, quantize_output = (getattr(linear, f"{name}_quantizer", unchanged)
                                                        for name in ("input", "weight", "output"))
    bias = linear.bias.full_tensor() if linear.bias is not None else None
    output = torch.nn.functional.linear(quantize_input(inputs.full_tensor()),
                                        quantize_weight(linear.weight.full_tensor()), bias)
    return DTensor.from_local(quantize_output(output), inputs.device_mesh, [Replicate()], run_check=False)


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


def split_gated_deltanet(deltanet: nn.Module, mesh: DeviceMesh) -> None:
    """The parameters of a Gated DeltaNet that are not Linears (the module docstring has the plan).

    The conv's C channels are laid out [q of all nk heads | k of all nk | v of all nv], so rank
    t's channels, its heads' q, k and v, are three blocks, not one:
        q [t kd/TP, (t+1) kd/TP)  k kd + [the same]  v 2 kd + [t vd/TP, (t+1) vd/TP)
    (kd = nk dk, vd = nv dv). A Shard(0) of the weight would give rank t rows [t C/TP, ...): the
    wrong channels. So the weight (C, 1, K), a few thousand numbers, stays a Replicate DTensor,
    whole in checkpoints (DCP loads it into any layout), and each forward cuts the rank's
    channels out of the local copy: (C/TP, 1, K), in the order of its local [q | k | v].
    to_local(grad_placements=[Partial()]): each rank's gradient is nonzero on its own channels
    only, and their sum over the TP ranks is the whole gradient (reduced where a Replicate
    parameter needs it: FSDP2, the optimizer step). A_log and dt_bias are Shard(0) DTensors: the
    rank's value heads are contiguous. The module computes on plain tensors, as one device does;
    its head_parameters method is replaced on this instance to hand it the rank's share."""
    conv = deltanet.conv1d
    conv.register_parameter("weight", nn.Parameter(distribute_tensor(conv.weight, mesh, [Replicate()])))
    for name in ("A_log", "dt_bias"):
        deltanet.register_parameter(name, nn.Parameter(distribute_tensor(getattr(deltanet, name), mesh, [Shard(0)])))
    replicate_module(deltanet.norm, mesh, Shard(2))  # (B, T, nv/TP, dv) and its gate z: local heads
    deltanet.head_parameters = partial(_rank_head_parameters, deltanet)


def _rank_head_parameters(deltanet: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GatedDeltaNet.head_parameters of a TP rank: conv weight (C/TP, 1, K), A_log and dt_bias
    (nv/TP,), plain tensors (under FSDP2 the DTensors it unsharded for this forward)."""
    weight = deltanet.conv1d.weight
    rank, ranks = weight.device_mesh.get_local_rank(), weight.device_mesh.size()
    q, k, v = weight.to_local(grad_placements=[Partial()]).split(
        (deltanet.key_dim, deltanet.key_dim, deltanet.value_dim))
    local = torch.cat([part.chunk(ranks)[rank] for part in (q, k, v)])
    return local, deltanet.A_log.to_local(), deltanet.dt_bias.to_local()


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Splits `model` (a CausalLM) over tp_mesh in place; returns it."""
    tied = model.args.tie_embeddings
    check_quantized_split(model, tp_mesh.size())
    # a pipeline stage (pipeline.py) holds the embedding, the lm_head, both or neither
    parallelize_module(model, tp_mesh, {name: style for name, style in OUTER_PLAN.items()
                                        if getattr(model, name) is not None})
    if tied and model.embed_tokens is not None and model.lm_head is not None:
        model.tie_weights()  # parallelize_module made two DTensors out of the one shared weight
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan(block))
        if hasattr(block, "linear_attn"):
            split_gated_deltanet(block.linear_attn, tp_mesh)
            continue
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
    keep_quantizer_buffers_local(model)
    return model
