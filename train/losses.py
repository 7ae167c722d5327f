"""The language-model losses, in one place: masked next-token cross entropy (through the logits,
or fused with lm_head), the model's auxiliary loss (MoE load balancing) and their sum, the default
training loss. The KD loss of QAD lives in train/distill/loss.py and builds on these.

    python -m pytest tests/unit/test_losses.py tests/unit/test_models_moe.py

masked_cross_entropy(logits, targets, mask) = sum(mask * ce) / max(sum(mask), 1): the mean over
the loss-masked tokens (masked_cross_entropy_sum: the numerator). Training (language_model_loss),
in-loop validation (train/validation.py) and the KD loss's LM term all use this one definition.

`tokens` (every token loss here and in train/distill/): the denominator of the token sum. None
is this micro-batch's own mask count (its mean). The trainer passes one number for every
micro-batch of a step, the global batch's loss tokens per micro-batch (train/trainer.py
loss_tokens), so that the step's loss and gradient are the global token mean whatever the
split into micro-batches, accumulation steps and data-parallel ranks.

The fused path, linear_cross_entropy: the same value computed from the final hidden states in
row chunks, so the (N, vocab) fp32 logits never exist whole. For each chunk of C positions (rows
of hidden (N, D), weight (V, D)):

    z = h @ W^T                                   (C, V), matmul in the autocast dtype, then fp32
    p = exp(z - max z); s = sum_v p               one exp pass, in place
    loss += sum_c m * (max z + log s - z[target])
    dloss/dz = m / count * (p / s - onehot(target))

and the gradient is finished in the forward: grad_h[c] = dz @ W, grad_W += dz^T @ h. Backward
only scales the two stored gradients, so nothing of size (C, V) outlives its chunk. Compared
with F.cross_entropy on whole logits this saves the fp32 copy of the logits, log_softmax's
second exp pass in backward and the (N, V) gradient buffer: ~20% of the lm_head + loss time
on CPU in bf16 (benchmarks/model_step), and the logits' memory on GPU. Positions the loss mask
drops (the prompts of chat data) never reach lm_head: only the K kept rows of hidden are
multiplied, a third less lm_head work on typical SFT data (benchmarks/lora_step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

CHUNK_BYTES = 1 << 30  # fp32 logits per chunk: 1 GiB -> 8192 rows at vocab 32768, 1766 at 151936


def matmul_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype F.linear would use here: autocast's (bf16 runs) or the tensors' own. The chunked
    losses (here and train/distill/chunked.py) cast explicitly, under autocast disabled."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def masked_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy summed over the loss mask (fp32); logits (B, T, V), targets and
    mask (B, T). Validation sums it over batches and ranks before dividing by the token count."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum()


def mask_tokens(mask: torch.Tensor, tokens: torch.Tensor | float | None = None) -> torch.Tensor | float:
    """The denominator of a masked token mean: `tokens` when given, else the mask's count (at least 1)."""
    return mask.sum().clamp(min=1) if tokens is None else tokens


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                         tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross entropy summed over the loss mask / tokens (None: the mask's mean)."""
    return masked_cross_entropy_sum(logits, targets, mask) / mask_tokens(mask, tokens)


def loss_positions(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mask, *tensors) flattened to positions (N,) and (N, ...), and only the K positions the mask
    weights when it drops any (answer-only masks: chat, SFT, LoRA), so that the vocabulary-sized
    work of a chunked loss runs on the loss tokens only. tensors: (B, T, ...) like mask (B, T), or
    (N, ...); index_select's backward scatters the gradients back to every position."""
    rows = [t.flatten(0, mask.dim() - 1) for t in tensors]
    mask = mask.flatten().float()
    if bool(mask.all()):
        return (mask, *rows)
    kept = mask.nonzero().squeeze(1)  # (K,)
    return (mask[kept], *(t.index_select(0, kept) for t in rows))


def fused_loss_applies(lm_head: nn.Module) -> bool:
    """A plain nn.Linear with a local weight: not TP-split (vocab-sharded DTensor), not a
    modelopt QuantLinear or a LoRA wrapper (subclasses / other modules), no bias."""
    return (type(lm_head) is nn.Linear and lm_head.bias is None
            and not isinstance(lm_head.weight, DTensor))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, chunk_rows: int, tokens):
        # hidden (N, D), weight (V, D), targets (N,) int64, mask (N,) float -> scalar loss sum / tokens
        dtype = matmul_dtype(hidden.device.type, weight.dtype)
        # a frozen weight (LoRA's lm_head) gets no gradient: no (V, C) @ (C, D) per chunk
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        row_weight = mask / mask_tokens(mask, tokens)  # (N,) each position's share of the loss
        w = weight.to(dtype)  # a view when no cast is needed
        grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit below
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                m, t = row_weight[rows, None], targets[rows, None]  # (C, 1)
                if not bool(m.any()):
                    continue  # masked-out chunk: no loss, no gradient
                h = hidden[rows].to(dtype)  # (C, D)
                z = (h @ w.T).float()  # (C, V) fp32 (a no-op cast when already fp32)
                picked = z.gather(1, t)  # (C, 1) target logits, before z is overwritten
                z_max = z.amax(1, keepdim=True)
                probs = z.sub_(z_max).exp_()  # unnormalized softmax, in z's buffer
                sums = probs.sum(1, keepdim=True)
                total += ((z_max + sums.log() - picked) * m).sum()
                grad = probs.mul_(m / sums)  # m * softmax
                grad.scatter_add_(1, t, -m)  # - m * onehot(target)
                grad = grad.to(dtype)
                if want_hidden_grad:
                    grad_hidden[rows] = (grad @ w).to(hidden.dtype)
                if want_weight_grad:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad.T, h)  # (V, C) @ (C, D), no temporary
                    else:
                        grad_weight.add_(grad.T @ h)
                del z, probs, grad
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_output if grad_hidden is not None else None
        grad_weight = grad_weight * grad_output if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor, chunk_bytes: int = CHUNK_BYTES,
                         tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Masked cross entropy of logits = hidden @ weight^T summed / tokens (None: the mask's mean),
    chunk by chunk.

    hidden (B, T, D) or (N, D); weight (V, D) (lm_head.weight, read after the model's forward so
    that FSDP2 has unsharded it); targets, mask (B, T) or (N,)."""
    if not torch.is_grad_enabled():  # no backward will come: skip the gradient work
        hidden, weight = hidden.detach(), weight.detach()
    chunk_rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    mask, hidden, targets = loss_positions(mask, hidden, targets)
    return LinearCrossEntropy.apply(hidden, weight, targets, mask, chunk_rows, tokens)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 and TP work in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """The model's extra loss terms for its last forward (MoE load balancing, coefficient
    included; zero for dense models), looked up through a DDP wrapper."""
    return unwrap(model).auxiliary_loss()


def language_model_loss(model, inputs, targets, mask, tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """The default training loss: masked next-token cross entropy (summed / tokens; None: the
    micro-batch's mean) plus auxiliary_loss (a mean over this micro-batch's routed tokens, whatever
    `tokens` is).

    Fused with lm_head (linear_cross_entropy: chunked, no whole fp32 logits) when lm_head is a
    plain Linear; through the logits for a TP-split, quantized or adapted lm_head. The model runs
    through its wrapper either way (DDP / FSDP2 hooks fire), and lm_head.weight is read after
    that forward, when FSDP2 has unsharded it. Under torch.compile the logits path is taken:
    inductor fuses it, while the fused loss's chunk loop would break the graph."""
    hidden = model(inputs, return_hidden=True)  # (B, T, D)
    return token_loss(unwrap(model), hidden, targets, mask, tokens) + auxiliary_loss(model)


def token_loss(inner: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """The cross-entropy term of language_model_loss from the final hidden states (B, T, D) of the
    unwrapped model `inner` (the pipeline's last stage calls it too: train/parallel/pipeline.py).
    Decided after the forward: FSDP2 has unsharded lm_head.weight by now (a DTensor before it)."""
    if fused_loss_applies(inner.lm_head) and not torch.compiler.is_compiling():
        return linear_cross_entropy(hidden, inner.lm_head.weight, targets, mask, tokens=tokens)
    return masked_cross_entropy(inner.output_logits(hidden), targets, mask, tokens)


def split_loss(result) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss_fn returns the loss, or (loss, terms): terms {name: detached scalar} are parts of it the
    metrics log next to it (QAD: kd_loss, lm_loss). -> (loss, terms)."""
    return result if isinstance(result, tuple) else (result, {})
