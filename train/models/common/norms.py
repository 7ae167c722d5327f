"""Normalization layers: RMSNorm (LLaMA, Qwen3) and LayerNorm (GPT-2 uses torch's own)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as HF LLaMA/Qwen3 do)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast matters only for bf16; for fp32 both casts are no-ops.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight


class ZeroCenteredRMSNorm(RMSNorm):
    """Qwen3-Next: x / rms(x) * (1 + weight), weight initialized to 0 (HF Qwen3NextRMSNorm).

    Storing the offset from 1 keeps weight decay pulling the scale toward 1, not 0. The
    product is taken in float32 before the cast back (HF's order; LLaMA casts first).
    """

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """Gated DeltaNet output norm: rms_norm(x) * weight * silu(gate) (HF Qwen3NextRMSNormGated)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return (normed * F.silu(gate.float())).to(x.dtype)
