"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024), the linear-attention mixer of Qwen3-Next.

    python -m pytest tests/unit/test_models_qwen3_next.py -k deltanet

Per value head, a (dk, dv) state S is decayed, corrected toward v by the delta rule and read by q:
    S_t = exp(g_t) * S_{t-1}
    u_t = beta_t * (v_t - S_t^T k_t)          the "new value" the step writes
    S_t = S_t + k_t u_t^T
    o_t = S_t^T q_t                           q scaled by 1/sqrt(dk); q and k L2-normalized
with beta = sigmoid(b) in (0, 1) and g = -exp(A_log) * softplus(a + dt_bias) < 0 (log-decay).

Two pure-PyTorch forms compute the same outputs (tests compare them):
- recurrent_gated_delta_rule: the loop above, one token at a time (the reference).
- chunk_gated_delta_rule: chunks of 64 tokens. Inside a chunk with cumulative log-decay G and
  start state S0, the writes U solve the unit lower-triangular system
      (I + A) U = beta*V - (beta*exp(G)*K) S0,   A_ij = beta_i exp(G_i - G_j) k_i.k_j  (j < i)
  (one triangular solve for all chunks at once); outputs and the next state then follow from
  matrix products, so only the state hand-off between chunks is sequential (T/64 steps).
On CUDA, flash-linear-attention's chunk kernel and causal-conv1d's conv replace them when installed.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from train.models.common.norms import GatedRMSNorm

CHUNK_SIZE = 64  # fla's chunk size; a multiple of 16 for its tensor-core tiles


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def fla_chunk_gated_delta_rule():
    """flash-linear-attention's Triton kernel, or None when fla is not installed."""
    return _optional("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")


def causal_conv1d_kernel():
    """causal-conv1d's CUDA kernel, or None when it is not installed."""
    return _optional("causal_conv1d", "causal_conv1d_fn")


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension (fla's l2norm, eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):
    """(B, T, H, d) / (B, T, H) inputs -> float32 (B, H, T, ...) with q, k normalized, q scaled."""
    q, k = l2_normalize(q.float()), l2_normalize(k.float())
    q = q / math.sqrt(q.shape[-1])
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))  # (B, H, T, d)
    g, beta = (x.transpose(1, 2).float() for x in (g, beta))  # (B, H, T)
    return q, k, v, g, beta


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference. q, k: (B, T, H, dk); v: (B, T, H, dv); g, beta: (B, T, H).

    Returns (B, T, H, dv) in v's dtype. O(T) Python steps: for tests and benchmarks.
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    batch, heads, _, dk = k.shape
    state = q.new_zeros(batch, heads, dk, v.shape[-1])  # (B, H, dk, dv)
    outputs = []
    steps = zip(*(x.unbind(dim=2) for x in (q, k, v, g.exp(), beta)))  # per token; see chunk_gated_delta_rule
    for q_t, k_t, v_t, decay_t, beta_t in steps:
        state = state * decay_t[..., None, None]
        remembered = torch.einsum("bhkv,bhk->bhv", state, k_t)  # S^T k: (B, H, dv)
        write = beta_t[..., None] * (v_t - remembered)  # u_t: (B, H, dv)
        state = state + k_t[..., :, None] * write[..., None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t))
    return torch.stack(outputs, dim=2).transpose(1, 2).to(out_dtype)  # (B, T, H, dv)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Chunked form, same arguments and result as recurrent_gated_delta_rule, float32 inside."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    batch, heads, seq_len, dk = k.shape
    dv = v.shape[-1]
    # Zero padding is inert: k = 0 and beta = 0 write nothing, g = 0 decays nothing.
    pad = (chunk_size - seq_len % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    chunks = (seq_len + pad) // chunk_size
    # (B, H, N, C, d) and (B, H, N, C): N chunks of C tokens
    q, k, v = (x.reshape(batch, heads, chunks, chunk_size, -1) for x in (q, k, v))
    g, beta = g.reshape(batch, heads, chunks, chunk_size), beta.reshape(batch, heads, chunks, chunk_size)

    G = g.cumsum(dim=-1)  # cumulative log-decay inside each chunk, (B, H, N, C)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(G_i - G_j) for j <= i, 0 above the diagonal (masked before exp: no overflow)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B,H,N,C,C)
    eye = torch.eye(chunk_size, device=q.device)
    A = (decay * (k @ k.transpose(-1, -2)) * beta[..., :, None]).tril(-1)  # strictly lower
    system = A + eye  # I + A: unit lower triangular
    # Both right-hand sides in one solve: [beta*V | beta*exp(G)*K] -> (B, H, N, C, dv + dk)
    rhs = torch.cat((v * beta[..., None], k * (beta * G.exp())[..., None]), dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    write_from_v, write_per_state = solved.split((dv, dk), dim=-1)  # U = write_from_v - write_per_state @ S0

    intra = (q @ k.transpose(-1, -2)) * decay  # (B, H, N, C, C), causal
    q_decayed = q * G.exp()[..., None]  # reads the chunk's start state
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # decay from step j to the chunk's end
    chunk_decay = G[..., -1, None, None].exp()  # (B, H, N, 1, 1): decay over a whole chunk
    # unbind once: indexing [:, :, n] in the loop would make backward allocate a full-size
    # gradient per chunk (quadratic in T); unbind's backward stacks the pieces once.
    per_chunk = zip(*(x.unbind(dim=2) for x in (write_from_v, write_per_state, q_decayed, intra, k_to_end,
                                                 chunk_decay)))
    state = q.new_zeros(batch, heads, dk, dv)
    outputs = []
    for from_v, per_state, q_n, intra_n, k_n, decay_n in per_chunk:
        write = from_v - per_state @ state  # U: (B, H, C, dv)
        outputs.append(q_n @ state + intra_n @ write)  # (B, H, C, dv)
        state = state * decay_n + k_n.transpose(-1, -2) @ write
    out = torch.stack(outputs, dim=2).reshape(batch, heads, chunks * chunk_size, dv)[:, :, :seq_len]
    return out.transpose(1, 2).to(out_dtype)  # (B, T, H, dv)


class GatedDeltaNet(nn.Module):
    """Qwen3-Next linear attention (HF Qwen3NextGatedDeltaNet names and fused layouts).

    in_proj_qkvz packs, per key head, [q (dk), k (dk), v (r*dv), z (r*dv)] with r = value heads
    per key head; in_proj_ba packs [b (r), a (r)] per key head. Checkpoints depend on that order.
    """

    def __init__(self, dim: int, num_key_heads: int, num_value_heads: int, key_head_dim: int,
                 value_head_dim: int, conv_kernel_size: int = 4, norm_eps: float = 1e-6,
                 kernel: str = "auto", device=None, dtype=None):
        super().__init__()
        self.num_key_heads, self.num_value_heads = num_key_heads, num_value_heads
        self.key_head_dim, self.value_head_dim = key_head_dim, value_head_dim
        self.key_dim, self.value_dim = num_key_heads * key_head_dim, num_value_heads * value_head_dim
        self.kernel = kernel  # 'auto': fla/causal-conv1d on CUDA when installed; 'chunk'; 'recurrent'
        factory = dict(device=device, dtype=dtype)
        self.in_proj_qkvz = nn.Linear(dim, 2 * self.key_dim + 2 * self.value_dim, bias=False, **factory)
        self.in_proj_ba = nn.Linear(dim, 2 * num_value_heads, bias=False, **factory)
        conv_channels = 2 * self.key_dim + self.value_dim  # q, k and v are convolved, z is not
        # Depthwise causal conv over time: padding K-1 on both sides, the right overhang is cut.
        self.conv1d = nn.Conv1d(conv_channels, conv_channels, conv_kernel_size, groups=conv_channels,
                                padding=conv_kernel_size - 1, bias=False, **factory)
        self.dt_bias = nn.Parameter(torch.empty(num_value_heads, **factory))
        self.A_log = nn.Parameter(torch.empty(num_value_heads, **factory))
        self.norm = GatedRMSNorm(value_head_dim, norm_eps, **factory)
        self.out_proj = nn.Linear(self.value_dim, dim, bias=False, **factory)

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator, std: float) -> None:
        """HF: linears and conv ~ N(0, std), dt_bias 1, A = exp(A_log) ~ U(0, 16), norm weight 1."""
        for linear in (self.in_proj_qkvz, self.in_proj_ba, self.out_proj, self.conv1d):
            linear.weight.normal_(0.0, std, generator=generator)
        self.dt_bias.fill_(1.0)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16, generator=generator).log())
        self.norm.reset_parameters()

    def _split_projections(self, x: torch.Tensor):
        """Head counts from the projections' widths (-1): under tensor parallelism (train/parallel/
        tensor_parallel.py) they hold this rank's key heads only, whole (the per-key-head layout)."""
        batch, seq_len, _ = x.shape
        ratio = self.num_value_heads // self.num_key_heads
        dk, dv = self.key_head_dim, self.value_head_dim
        qkvz = self.in_proj_qkvz(x).view(batch, seq_len, -1, 2 * dk + 2 * ratio * dv)
        q, k, v, z = qkvz.split((dk, dk, ratio * dv, ratio * dv), dim=-1)  # per key head
        ba = self.in_proj_ba(x).view(batch, seq_len, -1, 2 * ratio)
        b, a = ba.split((ratio, ratio), dim=-1)
        # (B, T, nk, r*dv) -> (B, T, nv, dv): value heads of one key head are adjacent
        z = z.reshape(batch, seq_len, -1, dv)
        b, a = b.reshape(batch, seq_len, -1), a.reshape(batch, seq_len, -1)
        return q.reshape(batch, seq_len, -1), k.reshape(batch, seq_len, -1), v.reshape(batch, seq_len, -1), z, b, a

    def head_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conv weight (C, 1, K), A_log (nv,), dt_bias (nv,)) as forward computes with them: the
        parameters themselves. Tensor parallelism replaces this method per instance with one that
        returns a rank's channels and heads as plain tensors (train/parallel/tensor_parallel.py)."""
        return self.conv1d.weight, self.A_log, self.dt_bias

    def _conv(self, mixed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> silu(causal depthwise conv) (B, T, C); weight (C, 1, K), one kernel a channel."""
        kernel = causal_conv1d_kernel() if self.kernel == "auto" and mixed.is_cuda else None
        if kernel is not None:
            weight = weight.squeeze(1).to(mixed.dtype)  # (C, K); autocast leaves custom ops alone
            out = kernel(mixed.transpose(1, 2), weight, None, activation="silu")
            return out.transpose(1, 2)
        seq_len, size = mixed.shape[1], weight.shape[-1]
        # padding K-1 on both sides, the right overhang cut: causal (as self.conv1d computes it)
        out = F.conv1d(mixed.transpose(1, 2), weight, padding=size - 1, groups=weight.shape[0])
        return F.silu(out[..., :seq_len]).transpose(1, 2)

    def _delta_rule(self, q, k, v, g, beta):
        fla = fla_chunk_gated_delta_rule() if self.kernel == "auto" and q.is_cuda else None
        if fla is not None:
            out, _ = fla(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
            return out
        rule = recurrent_gated_delta_rule if self.kernel == "recurrent" else chunk_gated_delta_rule
        return rule(q, k, v, g, beta)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        conv_weight, A_log, dt_bias = self.head_parameters()
        q, k, v, z, b, a = self._split_projections(x)
        widths = (q.shape[-1], k.shape[-1], v.shape[-1])  # key_dim, key_dim, value_dim (or a TP rank's share)
        mixed = self._conv(torch.cat((q, k, v), dim=-1), conv_weight)  # (B, T, 2*key_dim + value_dim)
        q, k, v = mixed.split(widths, dim=-1)
        q = q.reshape(batch, seq_len, -1, self.key_head_dim)
        k = k.reshape(batch, seq_len, -1, self.key_head_dim)
        v = v.reshape(batch, seq_len, -1, self.value_head_dim)
        beta = b.sigmoid()  # (B, T, nv), write strength in (0, 1)
        # float32: in fp16/bf16 exp(A_log) * softplus(.) can overflow to -inf
        g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())  # (B, T, nv)
        ratio = self.num_value_heads // self.num_key_heads
        if ratio > 1:  # each key head serves `ratio` adjacent value heads
            q, k = q.repeat_interleave(ratio, dim=2), k.repeat_interleave(ratio, dim=2)
        out = self._delta_rule(q, k, v, g, beta)  # (B, T, nv, dv)
        out = self.norm(out, z)  # RMSNorm per value head, gated by silu(z)
        return self.out_proj(out.reshape(batch, seq_len, -1))
