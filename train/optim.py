"""AdamW and the learning-rate schedules: warmup, then cosine, WSD or constant."""

import math

import torch


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    """Weight decay on matrices only: norms, biases and gains (ndim < 2) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update, on CUDA and (torch >= 2.4) on CPU, where the
    # element-wise AdamW math is ~25% of a small model's step (benchmarks/train_throughput)
    fused = bool(decay) and (decay[0].is_cuda or decay[0].device.type == "cpu")
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps, fused=fused)


def learning_rate(iteration: int, total_iters: int, optim_cfg) -> float:
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


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ in effect; returns the total gradient norm before clipping.

    With our fused AdamW on plain tensors the clipping factor is not applied to the gradients
    here but handed to the optimizer as `grad_scale` (the fused kernel divides each gradient
    by it while it reads it anyway): one pass over all gradients less per step (~3% of a
    small model's CPU step). The next optimizer.step() consumes it; grads stay unclipped
    until then. Sharded (DTensor) or other optimizers clip in place as before.
    """
    parameters = [p for p in model.parameters() if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    optimizer.grad_scale = None
    foldable = (isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")
                and type(total_norm) is torch.Tensor and all(type(p.data) is torch.Tensor for p in parameters))
    if foldable:
        # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the kernel divides by this
        optimizer.grad_scale = ((total_norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    else:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm
