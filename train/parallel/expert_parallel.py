"""Expert parallelism (EP_SIZE): each MoE layer's experts split over EP ranks, tokens sent to
their expert's rank with all-to-all and back.

    python -m pytest tests/integration/test_expert_parallel.py

Ranks (Megatron's semantics): EP splits the data-parallel ranks. With data-parallel size
dp = world / TP and EP ranks per group, the mesh is (edp, ep) = (dp / EP, EP), flattened to
"dp" for everything that is not an expert (mesh.py):
    ep group   EP consecutive data-parallel ranks; together they hold all E experts,
               rank j of the group experts [j * E/EP, (j+1) * E/EP)
    edp group  the dp / EP ranks holding the same experts (expert data parallelism)
Routers, attention, norms, embeddings, shared experts: DDP or FSDP2 over all dp ranks.
With TP (mesh (edp, ep, tp)): attention is TP-split, each TP rank runs the whole MoE layer on
the same tokens, and the EP group is the ranks with the same TP index (expert TP size 1).
Expert weights: plain local tensors (E/EP, ...) in the module (the MoE code needs no DTensor),
kept out of DDP/FSDP; their gradients are finished here (reduce_expert_gradients) and they
become DTensors Shard(0) over "ep" only inside checkpoints, so DCP reshards them to any EP size.

One MoE layer's routed experts on an EP rank (N rows = tokens x top-k, sorted by expert):
    counts (E,) -> view (EP, E/EP): rows for each destination rank and its local experts
    all-to-all of the counts            -> received (EP, E/EP): rows from each source rank
    all-to-all of the rows (autograd)   -> (M, D) grouped by source rank, then local expert
    stable sort by local expert         -> GroupedExperts(x (M, D), tokens_per_expert (E/EP,))
    un-sort, all-to-all back (autograd) -> (N, D) in the order the rows were sent
The backward of each all-to-all is the reverse all-to-all, so an expert's weight gradient
sums over the tokens of its whole EP group.

Gradients: the loss each rank differentiates is its own mean; DDP/FSDP average the other
gradients over dp ranks. An expert's local gradient already sums the contributions of its EP
group's losses, so the data-parallel mean is: sum over the edp group, divide by dp.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard


@dataclass
class ExpertParallelState:
    """Attached to the model by apply_expert_parallel (model.expert_parallel)."""

    ep_mesh: DeviceMesh  # this rank's EP group (1-D)
    edp_mesh: DeviceMesh | None  # ranks holding the same experts; None when dp == EP
    data_parallel_size: int
    expert_names: set[str]  # FQNs (as in state dicts) of the sharded expert parameters


# ----------------------------------------------------------------- token exchange

def exchange_counts(tokens_per_expert: torch.Tensor, group) -> torch.Tensor:
    """(E,) rows this rank sends to each expert -> (EP, E/EP) rows each source rank sends to
    each of this rank's experts (one small all-to-all, no autograd)."""
    ep = dist.get_world_size(group)
    sent = tokens_per_expert.view(ep, -1).contiguous()  # [destination rank, its local expert]
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=group)
    return received  # [source rank, local expert]


def all_to_all(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows (N, D): backward is the reverse exchange."""
    out = funcol.all_to_all_single_autograd(rows, output_splits, input_splits, group)
    return funcol.wait_tensor(out)


def local_expert_order(received_counts: torch.Tensor) -> torch.Tensor:
    """received_counts (EP, L) -> permutation taking rows grouped (source rank, local expert)
    to rows grouped by local expert (source ranks in order within one expert)."""
    ep, local = received_counts.shape
    expert_of_row = torch.arange(local, device=received_counts.device).repeat(ep)  # (EP * L,)
    expert_of_row = expert_of_row.repeat_interleave(received_counts.flatten())  # (M,)
    return torch.argsort(expert_of_row, stable=True)


def dispatch_and_combine(rows: torch.Tensor, tokens_per_expert: torch.Tensor, local_experts, group) -> torch.Tensor:
    """rows (N, D) sorted by global expert, tokens_per_expert (E,) -> (N, D), each row through
    its expert, wherever in the EP group that expert lives. local_experts(x, counts (E/EP,))."""
    received_counts = exchange_counts(tokens_per_expert, group)  # (EP, L)
    send_splits = tokens_per_expert.view(received_counts.shape[0], -1).sum(1).tolist()
    receive_splits = received_counts.sum(1).tolist()
    received = all_to_all(rows, receive_splits, send_splits, group)  # (M, D) by source rank
    order = local_expert_order(received_counts)
    out = local_experts(received[order], received_counts.sum(0))  # (M, D) by local expert
    back = torch.empty_like(out).index_copy(0, order, out)  # by source rank again
    return all_to_all(back, send_splits, receive_splits, group)


# ----------------------------------------------------------------- applying it

def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, MoE) pairs: modules with a router `gate` and grouped `experts`."""
    from train.models.common.moe import MoE

    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def state_dict_name(name: str) -> str:
    """A parameter's checkpoint name: wrapper prefixes dropped, as get_state_dict does."""
    return name.removeprefix("module.").replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, edp_mesh: DeviceMesh | None,
                          data_parallel_size: int) -> nn.Module:
    """Keeps this rank's E/EP experts of every MoE layer and routes tokens to the others.

    The model must hold the full (identical on every rank) expert weights: built from the
    same seed or loaded from the same checkpoint. In place; returns the model.
    """
    ep, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    group = ep_mesh.get_group()
    layers = moe_layers(model)
    if not model.args.num_experts:  # a pipeline stage of a MoE model may hold no MoE layer: nothing to split
        raise ValueError(f"EP_SIZE={ep}: model {getattr(model.args, 'name', '?')} has no MoE layers")
    names = set()
    for layer_name, moe in layers:
        experts = moe.experts
        if moe.num_experts % ep:
            raise ValueError(f"EP_SIZE={ep} does not divide the {moe.num_experts} experts of {layer_name}")
        for name, parameter in list(experts.named_parameters(recurse=False)):
            local = parameter.detach().chunk(ep)[ep_rank].clone()  # (E/EP, ...)
            setattr(experts, name, nn.Parameter(local, requires_grad=parameter.requires_grad))
            names.add(state_dict_name(f"{layer_name}.experts.{name}"))
        experts.num_experts = moe.num_experts // ep
        # the experts module is called as it is (its class's forward over the local experts, the
        # quantized one if modelopt converts it before or after this): no patched forward
        moe.expert_dispatch = functools.partial(dispatch_and_combine, group=group)
    model.expert_parallel = ExpertParallelState(ep_mesh, edp_mesh, data_parallel_size, names)
    return model


def expert_parallel_state(model: nn.Module) -> ExpertParallelState | None:
    return getattr(getattr(model, "module", model), "expert_parallel", None)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    state = expert_parallel_state(model)
    if state is None:
        return []
    return [p for n, p in model.named_parameters() if state_dict_name(n) in state.expert_names]


# ----------------------------------------------------------------- gradients

def reduce_expert_gradients(model: nn.Module) -> None:
    """After backward, before clipping: expert gradients become the data-parallel mean."""
    state = expert_parallel_state(model)
    if state is None:
        return
    for parameter in expert_parameters(model):
        if parameter.grad is None:
            continue
        if state.edp_mesh is not None and state.edp_mesh.size() > 1:
            dist.all_reduce(parameter.grad, group=state.edp_mesh.get_group())
        parameter.grad.div_(state.data_parallel_size)


def squared_norm(gradients: list[torch.Tensor]) -> torch.Tensor:
    """The squared 2-norm of all `gradients` together, fp32; DTensor shards (FSDP2, TP) counted
    whole: torch's norm per tensor kind (plain, or one DTensor mesh), one reduction each."""
    kinds: dict = {}
    for gradient in gradients:
        kinds.setdefault(_mesh_of(gradient), []).append(gradient)
    total = torch.zeros(())
    for group in kinds.values():
        norm = torch.nn.utils.get_total_norm(group)
        norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).float()
        total = total.to(norm.device) + norm ** 2
    return total


def _mesh_of(tensor: torch.Tensor):
    """A DTensor's DeviceMesh, None for a plain tensor."""
    return tensor.device_mesh if isinstance(tensor, DTensor) else None


def gradient_square(model: nn.Module, parameters: list[nn.Parameter]) -> torch.Tensor:
    """The squared 2-norm (fp32) of the gradients of `parameters` (of `model`, expert gradients
    already finished: reduce_expert_gradients), each element counted once over the ranks: DTensor
    shards (FSDP2, TP) whole, EP's local experts summed over the EP group. Plain torch's norm where
    all gradients are one tensor kind; else the experts (plain under TP, on dp's mesh under TP x
    FSDP2, local under EP) and the rest apart, since torch stacks norms of one mesh only."""
    from train.optim import expert_parameter_ids

    state = expert_parallel_state(model)
    experts = expert_parameter_ids(model)
    grads = [p.grad for p in parameters if p.grad is not None]
    if state is None and len({_mesh_of(g) for g in grads}) <= 1:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
    expert_square = squared_norm([p.grad for p in parameters if p.grad is not None and id(p) in experts])
    if state is not None:
        dist.all_reduce(expert_square, group=state.ep_mesh.get_group())
    dense = [p.grad for p in parameters if p.grad is not None and id(p) not in experts]
    return squared_norm(dense).to(expert_square.device) + expert_square


def scale_gradients(parameters: list[nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """clip_grads_with_norm_ with the norm over all of them, one call per tensor kind (plain, or
    a DTensor mesh): its foreach kernels take one kind at a time."""
    kinds: dict = {}
    for parameter in parameters:
        kinds.setdefault(_mesh_of(parameter.grad), []).append(parameter)
    for group in kinds.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over the whole model, whatever its tensor kinds: the expert
    gradients finished first (EP: reduce_expert_gradients), the norm by gradient_square."""
    reduce_expert_gradients(model)
    parameters = [p for p in model.parameters() if p.grad is not None]
    total = gradient_square(model, parameters).sqrt()
    scale_gradients(parameters, max_norm, total)
    return total


# ----------------------------------------------------------------- checkpoints

def _experts_as_dtensors(state: dict, names: set[str], mesh: DeviceMesh) -> dict:
    return {key: (DTensor.from_local(value, mesh, [Shard(0)], run_check=False)
                  if key in names and isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
                  else value) for key, value in state.items()}


def expert_checkpoint_view(model: nn.Module, tensors: dict) -> dict:
    """{"model": ..., "optimizer": ...} from get_state_dict, with each local expert tensor (and
    its AdamW moments) shown as a DTensor Shard(0) over "ep" of the global shape (E, ...):
    DCP then saves global tensors and loads them into any EP size. The DTensors share the
    local tensors' memory, so a dcp.load fills the model's tensors in place."""
    state = expert_parallel_state(model)
    if state is None:
        return tensors
    out = dict(tensors)
    out["model"] = _experts_as_dtensors(tensors["model"], state.expert_names, state.ep_mesh)
    if "optimizer" in tensors:
        optimizer = dict(tensors["optimizer"])
        optimizer["state"] = {fqn: (_experts_as_dtensors(values, {k for k in values if k != "step"}, state.ep_mesh)
                                    if fqn in state.expert_names else values)
                              for fqn, values in optimizer["state"].items()}
        out["optimizer"] = optimizer
    return out


def local_view(tensors: dict) -> dict:
    """The inverse of expert_checkpoint_view, for set_state_dict: DTensors on "ep" -> local."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, DTensor) and value.device_mesh.mesh_dim_names == ("ep",):
            return value.to_local()
        return value
    return strip(tensors)
