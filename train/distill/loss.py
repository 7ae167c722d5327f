"""The KD loss of QAD, in one module: distill_loss(student, teacher, inputs, targets, mask, cfg.distill),
its full-logits fallback and the naive reference they are tested against.

    python -m pytest tests/unit/test_distill_chunked.py tests/integration/test_distill_parallel.py

The student runs through its wrapper (DDP / FSDP2) with return_hidden=True, so every
parallel hook fires as in a normal forward; its lm_head weight is read after that forward
(FSDP2 leaves the root module's parameters unsharded after forward, so the weight is the
full (V, D) tensor and its gradient reaches FSDP's reduce-scatter). The teacher (frozen,
laid out like the student by train/qad.py: FSDP2-sharded or TP-split) runs the same way
under no_grad. Then train.distill.chunked computes KL + LM term chunk by
chunk. Full-logits fallback (full_logits_loss) where the chunked path does not apply: a
tensor-parallel lm_head (vocab-sharded DTensor) or an lm_head with enabled quantizers.

kd_loss_reference is the naive, unchunked KL term on whole (B, T, V) logits: the definition the
chunked loss must match (tests/unit/test_distill_chunked.py, benchmarks/kd_loss) and the KL part
of the fallback. The LM term is train.losses.masked_cross_entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from train.config import DistillConfig
from train.distill.chunked import chunked_distill_terms
from train.losses import mask_tokens, masked_cross_entropy


def kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      temperature: float, tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, scaled by T^2, summed over the mask / tokens
    (None: the mean over the mask): the naive definition on whole logits. logits: (B, T, V); mask: (B, T)."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"vocabulary mismatch: student {student_logits.shape[-1]} vs teacher "
                         f"{teacher_logits.shape[-1]} logits")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)  # (B, T)
    return (per_token * mask).sum() / mask_tokens(mask, tokens) * temperature**2


def _lm_head_quantized(lm_head: torch.nn.Module) -> bool:
    return any(getattr(getattr(lm_head, name, None), "is_enabled", False)
               for name in ("input_quantizer", "weight_quantizer", "output_quantizer"))


def full_logits_loss(logits, teacher_logits, targets, mask, distill_cfg: DistillConfig, vocab: int | None,
                     tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """The naive loss on whole (B, T, V) logits: kd_loss_weight x kd_loss_reference + lm_loss_weight x CE; the
    reference for distill_loss and its fallback."""
    return full_logits_terms(logits, teacher_logits, targets, mask, distill_cfg, vocab, tokens)[0]


def full_logits_terms(logits, teacher_logits, targets, mask, distill_cfg: DistillConfig, vocab: int | None,
                      tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """(full_logits_loss, its computed terms unweighted and detached: kd_loss when kd_loss_weight > 0,
    lm_loss when lm_loss_weight > 0)."""
    if vocab is not None:
        logits, teacher_logits = logits[..., :vocab], teacher_logits[..., :vocab]
    kd_weight = distill_cfg.kd_loss_weight
    loss, terms = logits.sum() * 0.0, {}
    if kd_weight:
        kd = kd_loss_reference(logits, teacher_logits, mask, distill_cfg.temperature, tokens)
        loss, terms["kd_loss"] = kd_weight * kd, kd.detach()
    if distill_cfg.lm_loss_weight:
        lm = masked_cross_entropy(logits, targets, mask, tokens)
        loss, terms["lm_loss"] = loss + distill_cfg.lm_loss_weight * lm, lm.detach()
    return loss, terms


def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor, distill_cfg: DistillConfig, vocab: int | None = None,
                 tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """kd_loss_weight x T^2 KL(teacher || student) + lm_loss_weight x CE over the loss mask; inputs/targets/mask (B, T).
    Returns (loss, terms): terms {"kd_loss": T^2 KL, "lm_loss": CE}, unweighted and detached, for the logs
    (each only when computed: lm_loss when lm_loss_weight > 0).

    distill_cfg: temperature, lm_loss_weight, kd_loss_weight (default 1; 0 with lm_loss_weight 1 is QAT:
    the same quantized student trained on the LM loss only), chunk_size (cfg.distill). vocab: compare only the
    first `vocab` logits (train.distill.kd_config.resolve_vocab); None: all of them. tokens: the
    denominator of both terms' sums over the mask (train.losses); None: their means."""
    inner = getattr(student, "module", student)  # DDP keeps the model in .module; FSDP2 in place
    hidden = student(inputs, return_hidden=True)  # (B, T, D)
    with torch.no_grad():  # the teacher may be FSDP2-sharded or TP-split like the student: its forward too
        teacher_hidden = teacher(inputs, return_hidden=True)  # (B, T, D_teacher)
    return distill_terms(inner, getattr(teacher, "module", teacher), hidden, teacher_hidden, targets, mask,
                         distill_cfg, vocab, tokens)


def distill_terms(inner: torch.nn.Module, teacher: torch.nn.Module, hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                  targets: torch.Tensor, mask: torch.Tensor, distill_cfg: DistillConfig, vocab: int | None = None,
                  tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """distill_loss from the final hidden states (B, T, D) and (B, T, D_teacher) of the unwrapped
    student and teacher, after their forwards (PP_SIZE > 1: the last stage's, train/parallel/pipeline.py)."""
    weight = inner.lm_head.weight  # read after the forward: FSDP2 has unsharded it
    teacher_weight = teacher.lm_head.weight
    if isinstance(weight, DTensor) or isinstance(teacher_weight, DTensor) or _lm_head_quantized(inner.lm_head):
        with torch.no_grad():
            teacher_logits = teacher.output_logits(teacher_hidden)
        return full_logits_terms(inner.output_logits(hidden), teacher_logits, targets, mask, distill_cfg, vocab,
                                 tokens)
    return chunked_distill_terms(hidden, weight, teacher_hidden, teacher_weight, targets, mask,
                                 temperature=distill_cfg.temperature, lm_loss_weight=distill_cfg.lm_loss_weight,
                                 chunk_size=distill_cfg.chunk_size, vocab=vocab,
                                 kd_loss_weight=distill_cfg.kd_loss_weight, tokens=tokens)
