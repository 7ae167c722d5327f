"""Qwen3-Next full attention: GQA with an output gate, zero-centred q/k norms, partial RoPE.

Differences from attention.Attention (HF Qwen3NextAttention names):
- q_proj is twice as wide: per head [query (hd) | gate (hd)]; the attention output is
  multiplied by sigmoid(gate) before o_proj (a per-channel output gate);
- q_norm / k_norm are zero-centred RMSNorms (scale 1 + weight);
- RoPE rotates only the first rotary_dim = head_dim * partial_rotary_factor channels.
"""

from __future__ import annotations

import torch
from torch import nn

from train.models.common.attention import attention_scores
from train.models.common.norms import ZeroCenteredRMSNorm
from train.models.common.rope import apply_rope


class GatedAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, *,
                 norm_eps: float = 1e-6, backend: str = "sdpa", device=None, dtype=None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotary_dim, self.backend = rotary_dim, backend
        linear = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(dim, num_heads * head_dim * 2, **linear)  # query and gate
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, **linear)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, **linear)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, **linear)
        self.q_norm = ZeroCenteredRMSNorm(head_dim, norm_eps, device=device, dtype=dtype)
        self.k_norm = ZeroCenteredRMSNorm(head_dim, norm_eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        query, gate = self.q_proj(x).view(batch, seq_len, -1, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(query)  # (B, T, H, hd)
        k = self.k_norm(self.k_proj(x).view(batch, seq_len, -1, self.head_dim))  # (B, T, KV, hd)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim)
        r = self.rotary_dim  # rotate the first r channels, pass the rest through
        q = torch.cat((apply_rope(q[..., :r], *rope), q[..., r:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :r], *rope), k[..., r:]), dim=-1)
        out = attention_scores(q, k, v, self.backend) * torch.sigmoid(gate)  # (B, T, H, hd)
        return self.o_proj(out.reshape(batch, seq_len, -1))
