"""The naive KD loss on whole (B, T, V) logits: the reference for train/distill/chunked.py (tests, benchmark) and the tensor-parallel fallback."""

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, scaled by T^2, mean over the mask.

    logits: (B, T, V); mask: (B, T)."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"vocabulary mismatch: student {student_logits.shape[-1]} vs teacher "
                         f"{teacher_logits.shape[-1]} logits")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)  # (B, T)
    return (per_token * mask).sum() / mask.sum().clamp(min=1) * temperature**2
