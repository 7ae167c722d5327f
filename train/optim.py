"""AdamW and the learning-rate schedules: warmup, then cosine, WSD or constant."""

import math

import torch

from train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only: norms, biases and gains (ndim < 2) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    experts = expert_parameter_ids(model)
    if experts:
        # MoE: routed experts in a group of their own, whatever EP_SIZE (same groups in every
        # checkpoint). Under EP they are plain local tensors while FSDP makes the rest DTensors,
        # and one fused/foreach AdamW call cannot mix the two kinds.
        groups[0]["params"] = [p for p in decay if id(p) not in experts]
        groups.append({"params": [p for p in decay if id(p) in experts], "weight_decay": optim_cfg.weight_decay})
    # fused: one kernel for the whole update, on CUDA and (torch >= 2.4) on CPU, where the
    # element-wise AdamW math is ~25% of a small model's step (benchmarks/train_throughput)
    fused = bool(decay) and (decay[0].is_cuda or decay[0].device.type == "cpu")
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps, fused=fused)


def expert_parameter_ids(model: torch.nn.Module) -> set[int]:
    """ids of the routed experts' weights (GroupedExperts of MoE layers); empty for dense models."""
    from train.models.common.moe import GroupedExperts

    return {id(p) for module in model.modules() if isinstance(module, GroupedExperts)
            for p in module.parameters(recurse=False)}


def learning_rate(iteration: int, total_iters: int, optim_cfg: OptimConfig) -> float:
    """LR for optimizer step `iteration` (0-based) of `total_iters`."""
    peak, floor, warmup = optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_iters
    if warmup and iteration < warmup:
        return peak * (iteration + 1) / warmup
    if optim_cfg.schedule == "constant":
        return peak
    progress = min(1.0, (iteration - warmup) / max(1, total_iters - warmup))
    if optim_cfg.schedule == "cosine":
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    if optim_cfg.schedule == "wsd":  # warmup, stable, then linear decay over the last 20%
        decay_start = 0.8
        return peak if progress < decay_start else peak - (peak - floor) * (progress - decay_start) / (1 - decay_start)
    raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: use cosine, wsd or constant")


def fold_clipping_into_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            max_norm: float) -> torch.Tensor | None:
    """clip_grad_norm_ in effect, for our fused AdamW on plain tensors; None elsewhere (the
    caller clips in place: train.parallel.clip_gradients). Returns the norm before clipping.

    The clipping factor is not applied to the gradients here but handed to the optimizer as
    `grad_scale` (the fused kernel divides each gradient by it while it reads it anyway): one
    pass over all gradients less per step (~3% of a small model's CPU step). The next
    optimizer.step() consumes it; the gradients stay unclipped until then.
    """
    optimizer.grad_scale = None  # also clears the factor of a previous (skipped) step
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not (isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused") and parameters
            and all(type(p.data) is torch.Tensor for p in parameters) and not expert_parameter_ids(model)):
        return None  # sharded (DTensor), MoE experts, ZeRO-1 or another optimizer
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the kernel divides by this
    optimizer.grad_scale = ((total_norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    return total_norm
