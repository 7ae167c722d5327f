"""Feed-forward blocks: SwiGLU (LLaMA, Qwen3) and the GELU MLP of GPT-2."""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); no biases."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """down(gelu_tanh(up(x))) with biases: GPT-2's `gelu_new` is the tanh approximation."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim, bias=True, device=device, dtype=dtype)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
