"""Chunked KD loss: KL(teacher || student) at temperature T (x T^2) plus an optional LM term,
computed over chunks of token positions so the (positions, vocab) fp32 logits never exist at once.

    python -m pytest tests/unit/test_distill_chunked.py

Inputs are the final-norm hidden states and the lm_head weights of both models, flattened to
N = B x T positions. For each chunk of C positions (C = chunk_size):

    zs = h_s[c] @ W_s^T, zt = h_t[c] @ W_t^T          (C, V) in fp32
    ls = log_softmax(zs / T), lt = log_softmax(zt / T), pt = exp(lt)
    loss += k T^2 * sum_c m * sum_v pt (lt - ls)  +  w * sum_c m * (logsumexp(zs) - zs[target])
    dloss/dzs = k T * m * (exp(ls) - pt)  +  w * m * (softmax(zs) - onehot(target))

(k = kd_loss_weight, default 1; 0 leaves the LM term alone: QAT with the same job), and the gradient is finished at once in the forward (Liger's "fused linear" trick):
grad_h[c] = g @ W_s and grad_W += g^T @ h_s[c]. Backward only scales the two stored
gradients by the incoming scalar, so nothing of size (N, V) is kept for backward and
no logits are recomputed: four (C, D) x (D, V) matmuls per chunk, the same as the naive
loss. Peak extra memory: a few (C, V) fp32 tensors + grad_W (V, D) + grad_h (N, D).

Both terms are sums over the loss mask divided by `tokens` (None: mask.sum(), the mean), like
train.distill.loss.kd_loss_reference and train.losses.masked_cross_entropy; the trainer passes
the global batch's loss tokens per micro-batch (train/trainer.py loss_tokens). The teacher's
inputs are detached: no gradient is computed for them. chunked_distill_terms also
returns the terms unweighted, for the logs: kd_loss = T^2 KL and (only when lm_loss_weight > 0,
the only time it is computed) lm_loss = CE.

`vocab` (optional) restricts both softmaxes to the first `vocab` logits: the rule for a
teacher and a student whose vocabularies differ only by padding rows past the tokenizer's size
(train/distill/kd_config.py resolve_vocab). The padding rows of W_s then get zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses import loss_positions, mask_tokens, matmul_dtype


class ChunkedDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, mask, temperature: float,
                lm_loss_weight: float, chunk_size: int, vocab: int | None, kd_loss_weight: float = 1.0,
                tokens=None):
        # hidden (N, D) student, weight (V_s, D); teacher_hidden (N, D_t), teacher_weight (V_t, D_t);
        # targets (N,) int64, mask (N,) float. Returns the scalar loss sum / tokens and its two unweighted
        # terms (T^2 KL, CE, each sum / tokens: no gradient flows through them).
        device_type = hidden.device.type
        dtype = matmul_dtype(device_type, weight.dtype)
        vocab = vocab or weight.shape[0]
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        mask = mask.float()
        count = mask_tokens(mask, tokens)
        w_s, w_t = weight[:vocab].to(dtype), teacher_weight[:vocab].to(dtype)  # views unless cast
        grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)  # sum of T^2 KL over the mask
        lm_total = torch.zeros((), dtype=torch.float32, device=hidden.device)  # sum of CE over the mask
        with torch.autocast(device_type, enabled=False):  # dtypes are explicit below
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                m = mask[rows]  # (C,)
                if not bool(m.any()):
                    continue  # masked-out chunk: no loss, no gradient
                h = hidden[rows].to(dtype)  # (C, D)
                student = (h @ w_s.T).float()  # zs (C, V)
                teacher = (teacher_hidden[rows].to(dtype) @ w_t.T).float()
                log_teacher = F.log_softmax(teacher.div_(temperature) if temperature != 1 else teacher, dim=-1)
                del teacher
                log_student = F.log_softmax(student / temperature if temperature != 1 else student, dim=-1)
                teacher_probs = log_teacher.exp()  # pt
                # KL = sum_v pt (lt - ls), as two batched dot products: no (C, V) temporary
                kl = (teacher_probs[:, None, :] @ log_teacher[:, :, None]
                      - teacher_probs[:, None, :] @ log_student[:, :, None]).flatten()  # (C,)
                kd_total += temperature**2 * (kl * m).sum()
                del log_teacher
                # d(T^2 KL)/dzs = T (softmax(zs / T) - pt), in the buffer of ls
                grad = log_student.exp_().sub_(teacher_probs).mul_(temperature * kd_loss_weight)  # (C, V)
                del teacher_probs, log_student
                if lm_loss_weight:  # CE = -log_softmax(zs)[target]; dCE/dzs = softmax(zs) - onehot
                    probs = F.log_softmax(student, dim=-1)
                    picked = probs.gather(1, targets[rows, None]).squeeze(1)  # (C,)
                    lm_total += (-picked * m).sum()
                    probs.exp_().scatter_add_(1, targets[rows, None], torch.full_like(picked[:, None], -1.0))
                    grad.add_(probs, alpha=lm_loss_weight)
                    del probs
                del student
                grad.mul_((m / count)[:, None])
                grad = grad.to(dtype)
                if want_hidden_grad:
                    grad_hidden[rows] = (grad @ w_s).to(hidden.dtype)
                if want_weight_grad:
                    if dtype == torch.float32:
                        grad_weight[:vocab].addmm_(grad.T, h)  # (V, C) @ (C, D), no temporary
                    else:
                        grad_weight[:vocab].add_((grad.T @ h).float())
                del grad
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        kd, lm = kd_total / count, lm_total / count
        ctx.mark_non_differentiable(kd, lm)
        return kd_loss_weight * kd + lm_loss_weight * lm, kd, lm

    @staticmethod
    def backward(ctx, grad_output, _kd_grad, _lm_grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_output if grad_hidden is not None else None
        grad_weight = grad_weight * grad_output if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def chunked_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                         **settings) -> torch.Tensor:
    """kd_loss_weight x T^2 KL(teacher || student) + lm_loss_weight x CE, sums over the mask / tokens
    (None: means over the mask), chunk by chunk.

    hidden (B, T, D) or (N, D); weight (V, D); teacher_* likewise; targets, mask (B, T) or (N,);
    settings: the keywords of chunked_distill_terms."""
    return chunked_distill_terms(hidden, weight, teacher_hidden, teacher_weight, targets, mask, **settings)[0]


def chunked_distill_terms(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                          teacher_weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                          temperature: float = 1.0, lm_loss_weight: float = 0.0, chunk_size: int = 512,
                          vocab: int | None = None, kd_loss_weight: float = 1.0,
                          tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """(the loss of chunked_distill_loss, {"kd_loss": T^2 KL, ["lm_loss": CE]}): the terms unweighted,
    detached and divided by the same `tokens`; lm_loss only when lm_loss_weight > 0."""
    if weight.shape[0] != teacher_weight.shape[0] and vocab is None:
        raise ValueError(f"vocabulary mismatch: student {weight.shape[0]} vs teacher {teacher_weight.shape[0]} "
                         "logits (only padding past the tokenizer's size may differ: pass vocab=)")
    if vocab is not None and vocab > min(weight.shape[0], teacher_weight.shape[0]):
        raise ValueError(f"vocab {vocab} exceeds the student ({weight.shape[0]}) or teacher "
                         f"({teacher_weight.shape[0]}) vocabulary")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not torch.is_grad_enabled():  # no backward will come: skip the gradient work in forward
        hidden, weight = hidden.detach(), weight.detach()
    # the loss tokens only (answer-only masks): (K, D) hidden rows, (K,) targets and mask
    mask, hidden, teacher_hidden, targets = loss_positions(mask, hidden, teacher_hidden.detach(), targets)
    loss, kd, lm = ChunkedDistillLoss.apply(
        hidden, weight, teacher_hidden, teacher_weight.detach(), targets, mask, float(temperature),
        float(lm_loss_weight), int(chunk_size), vocab, float(kd_loss_weight), tokens)
    return loss, {"kd_loss": kd, **({"lm_loss": lm} if lm_loss_weight else {})}
