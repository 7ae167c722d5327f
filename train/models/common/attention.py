"""Causal self-attention with GQA, optional RoPE and per-head q/k RMSNorm, three backends.

Backends: 'sdpa' (torch scaled_dot_product_attention, default), 'flash' (flash-attn 3 or 2,
CUDA with fp16/bf16 only) and 'reference' (plain matmul + softmax, for tests and debugging).
"""

from __future__ import annotations

import importlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from train.models.common.norms import RMSNorm
from train.models.common.rope import apply_rope

logger = logging.getLogger("train.models")

ATTENTION_BACKENDS = ("sdpa", "flash", "reference")


def _flash_attn_func():
    """flash-attn 3 (flash_attn_interface) if installed, else flash-attn 2, else None."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(module).flash_attn_func
        except ImportError:
            continue
    return None


def resolve_attention_backend(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend that will run, with one log line saying which (and why, on fallback)."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    chosen, reason = requested, ""
    if requested == "flash":
        device_type = torch.device(device).type
        if _flash_attn_func() is None:
            chosen, reason = "sdpa", "flash-attn is not installed"
        elif device_type not in ("cuda", "meta"):
            chosen, reason = "sdpa", f"flash-attn needs CUDA, model is on {device_type}"
        elif dtype not in (torch.float16, torch.bfloat16) and device_type != "meta":
            chosen, reason = "sdpa", f"flash-attn needs fp16/bf16, parameters are {dtype}"
        elif dtype not in (torch.float16, torch.bfloat16):
            # meta + fp32: parameters for FSDP mixed precision, activations will be bf16.
            reason = "runs on fp16/bf16 activations; fp32 calls use sdpa"
    if reason:
        logger.info("attention backend: %s (requested %s: %s)", chosen, requested, reason)
    else:
        logger.info("attention backend: %s", chosen)
    return chosen


def attention_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal attention. q: (B, T, n_heads, head_dim), k/v: (B, T, n_kv_heads, head_dim).

    Returns (B, T, n_heads, head_dim). Query head h reads KV head h // (n_heads / n_kv_heads).
    """
    if backend == "flash":
        if q.dtype in (torch.float16, torch.bfloat16) and q.is_cuda:
            out = _flash_attn_func()(q, k, v, causal=True)  # native GQA, (B, T, H, hd) layout
            return out[0] if isinstance(out, tuple) else out  # FA3 may also return the LSE
        backend = "sdpa"  # e.g. an fp32 autocast-free call on a flash-built model
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)
    # reference: explicit GQA expansion, float32 softmax
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    seq_len = q.shape[2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return (probs @ v).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention (HF projection names)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 backend: str = "sdpa", device=None, dtype=None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.backend = backend
        linear = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(dim, num_heads * head_dim, **linear)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, **linear)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, **linear)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, **linear)
        # Qwen3: RMSNorm over each head's vector, before RoPE.
        self.q_norm = RMSNorm(head_dim, norm_eps, device=device, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, device=device, dtype=dtype) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds H / TP and KV / TP of them.
        q = self.q_proj(x).view(batch, seq_len, -1, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(batch, seq_len, -1, self.head_dim)  # (B, T, KV, hd)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim)  # (B, T, KV, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention_scores(q, k, v, self.backend)  # (B, T, H, hd)
        return self.o_proj(out.reshape(batch, seq_len, -1))  # (B, T, H * hd) -> (B, T, D)
