"""Data parallelism over the mesh's "dp" dimension: ddp | fsdp | fsdp_zero2 | zero1.

    python -m pytest tests/integration/test_parallel.py

Memory per rank for P parameters trained with AdamW in fp32 (16 bytes/parameter: weights,
gradients, two moments), dp data-parallel ranks:
    ddp         16 P                   replicas; gradients all-reduced in buckets during backward
    zero1       8 P + 8 P / dp         DDP, but each rank keeps and steps 1/dp of the moments
    fsdp_zero2  ~16 P / dp + gathered  FSDP2, parameters stay gathered from forward to backward
    fsdp        16 P / dp + one block  FSDP2, parameters resharded after forward (ZeRO-3)

Gradients are synchronized once per optimizer step (gradient_sync): with accumulation the
micro-batches before the last keep their gradients local (DDP no_sync; FSDP2 keeps full
unsharded gradients of its parameters until the last micro-batch's reduce-scatter).
"""

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from train.config import OptimConfig, ParallelConfig


def wants_zero_redundancy_optimizer(parallel_cfg: ParallelConfig) -> bool:
    """True when the trainer must build its optimizer with build_zero_redundancy_optimizer."""
    return parallel_cfg.data_parallel == "zero1"


def build_zero_redundancy_optimizer(model: nn.Module, optim_cfg: OptimConfig, dp_mesh: DeviceMesh | None = None):
    """AdamW as train.optim.build_optimizer builds it, its state sharded over the data-parallel ranks.

    Each rank owns whole parameters (greedy by size), steps them, then broadcasts them to the
    others. The state dict is not a DCP one: consolidate_state_dict(to=0) gathers it on rank 0.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return ZeroRedundancyOptimizer(
        groups, optimizer_class=torch.optim.AdamW, lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
        process_group=dp_mesh.get_group() if dp_mesh is not None else None)


def parameter_fqn(name: str) -> str:
    """A parameter's checkpoint name: wrapper prefixes dropped, as get_state_dict does."""
    return name.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")


def zero_redundancy_optimizer_state_dict(model: nn.Module, optimizer) -> dict:
    """This rank's share of a ZeRO-1 AdamW state, in get_state_dict's layout (keys: parameter FQNs).

        {"state": {fqn: {"step": (), "exp_avg": param shape, "exp_avg_sq": param shape}},
         "param_groups": [{lr, betas, ..., "params": [fqn, ...]}]}   groups list every FQN

    The ranks' "state" entries are disjoint: DCP merges them into one checkpoint that DDP/FSDP
    runs load as usual. For a load, pass the dict to dcp.load: the tensors are the optimizer's
    own and are filled in place (before the first step they are created as zeros, step 0,
    which is what AdamW's first step would create).
    """
    names = {parameter: parameter_fqn(name) for name, parameter in model.named_parameters()}
    local = optimizer.optim  # the AdamW over this rank's parameters only
    state = {}
    for group in local.param_groups:
        for parameter in group["params"]:
            if parameter not in local.state:
                local.state[parameter] = {"step": torch.zeros((), dtype=torch.get_default_dtype()),
                                          "exp_avg": torch.zeros_like(parameter),
                                          "exp_avg_sq": torch.zeros_like(parameter)}
            state[names[parameter]] = local.state[parameter]
    groups = [{**{key: value for key, value in group.items() if key != "params"},
               "params": [names[parameter] for parameter in group["params"]]}
              for group in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device: str, ignored: set | frozenset = frozenset()) -> nn.Module:
    """ignored: parameters DDP neither broadcasts nor all-reduces (EP-sharded experts)."""
    if ignored:
        names = [name for name, p in model.named_parameters() if p in ignored]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=dp_mesh.get_group())


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool,
               ignored: set | frozenset = frozenset(), mixed_precision: bool = False) -> nn.Module:
    """FSDP2: each block is one all-gather/reduce-scatter unit; the root takes embeddings, norm, lm_head.

    Parameters become DTensors Shard(0) over dp_mesh (2-D DTensors when TP split them first).
    The root keeps its parameters gathered after forward: lm_head runs last in forward and first
    in backward, so resharding it would only add an all-gather. mixed_precision: FSDP2's
    MixedPrecisionPolicy, the sharded fp32 parameters all-gathered and computed with in bf16 and
    the gradients reduce-scattered in fp32 (half the all-gather bytes of bf16 autocast, which
    gathers fp32 and casts after).
    """
    ignored = set(ignored) or None  # EP-sharded experts stay plain local tensors
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored,
                    mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, ignored_params=ignored, mp_policy=policy)
    return model


@contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Around one micro-batch's forward and backward: sync=False keeps its gradients local (they
    add up in .grad), sync=True (the step's last micro-batch) reduces the accumulated sum over the
    data-parallel ranks: one all-reduce (DDP) or reduce-scatter (FSDP2) per step, not per
    micro-batch. Expert gradients (EP) are outside both and reduced once per step anyway
    (expert_parallel.reduce_expert_gradients). Other models (one process, TP only): nothing to do."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with nullcontext() if sync else model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)  # every FSDP2 module of the model (recursive)
        yield
    else:
        yield
