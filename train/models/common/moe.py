"""Mixture of experts: softmax top-k router, grouped expert weights, load-balancing statistics.

Parameter names equal HF Qwen3-MoE / Qwen3-Next (transformers 5) minus 'model.layers.N.mlp.':
  gate.weight                (E, D)       router (kept out of quantization: '*mlp.gate.*')
  experts.gate_up_proj       (E, 2F, D)   gate rows first, then up rows
  experts.down_proj          (E, D, F)
  shared_expert.{gate,up,down}_proj.weight, shared_expert_gate.weight (1, D)   optional

One forward, in small steps so expert parallelism can swap the middle from outside:
  route     (N, D) -> weights (N, k), indices (N, k)       softmax, top-k, renormalize
  dispatch  (N, D) -> (N*k, D) rows sorted by expert, tokens_per_expert (E,)
  experts   (N*k, D) sorted -> (N*k, D)                    GroupedExperts (local experts)
  combine   (N*k, D) -> (N, D)                             un-sort, weight, sum the k slots
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.models.common.mlp import SwiGLU


def _grouped_mm():
    """torch's grouped GEMM: F.grouped_mm (torch >= 2.10, SM80+) or torch._grouped_mm (SM90+)."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm, (8, 0)
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm, (9, 0)
    return None, None


def _grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused grouped GEMM would run in, or None when the loop must be used.

    Used on CUDA in bf16 only (the dtype its kernels target); under autocast the matmul runs
    in the autocast dtype, as F.linear would. CPU keeps the loop: torch 2.13's CPU kernel
    fails in backward on stride-0 gradients, and CPU runs are tests.
    """
    kernel, capability = _grouped_mm()
    if kernel is None or not x.is_cuda:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < capability:
        return None
    return dtype


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e @ weight[e].T for rows already sorted by expert.

    x (N, in), weight (E, out, in), tokens_per_expert (E,) int64 summing to N -> (N, out).
    """
    dtype = _grouped_mm_dtype(x)
    if dtype is not None:
        # One kernel for all experts; offs are the end row of each group (int32, cumulative).
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        return _grouped_mm()[0](x.to(dtype), weight.to(dtype).transpose(-2, -1), offs=offsets)
    # CPU (tests) and fallback: one matmul per expert; .tolist() syncs, fine off the hot path.
    chunks = x.split(tokens_per_expert.tolist())
    return torch.cat([F.linear(chunk, weight[e]) for e, chunk in enumerate(chunks)])


def swiglu_experts(x: torch.Tensor, tokens_per_expert: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, hidden_hook=None) -> torch.Tensor:
    """down_e(silu(gate_e(x)) * up_e(x)) for sorted rows; hidden_hook sees the (N, F) input of down."""
    gate, up = grouped_linear(x, gate_up_proj, tokens_per_expert).chunk(2, dim=-1)  # (N, F) each
    hidden = F.silu(gate) * up
    if hidden_hook is not None:
        hidden = hidden_hook(hidden)
    return grouped_linear(hidden, down_proj, tokens_per_expert)  # (N, D)


class GroupedExperts(nn.Module):
    """num_experts SwiGLU experts stored as two 3-D weights (HF Qwen3MoeExperts layout).

    forward takes rows already sorted by expert: x (N, D), tokens_per_expert (num_experts,)
    int64 -> (N, D). No routing weights here: MoE.combine applies them.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim  # local count
        factory = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return swiglu_experts(x, tokens_per_expert, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    """(B, T, D) -> (B, T, D): routed experts, plus a sigmoid-gated shared expert when asked.

    After each forward, `balance_stats` holds this layer's load-balancing statistics
    (fraction of routed slots per expert (E,), detached; mean router probability (E,)),
    and `aux_loss` the layer's own Switch loss E * sum(fraction * probability).
    CausalLM.auxiliary_loss combines the layers the way HF's load_balancing_loss_func does.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, expert_hidden_dim: int, *,
                 normalize_top_k: bool = True, shared_expert_hidden_dim: int = 0,
                 device=None, dtype=None):
        super().__init__()
        self.num_experts, self.top_k, self.normalize_top_k = num_experts, top_k, normalize_top_k
        factory = dict(device=device, dtype=dtype)
        self.gate = nn.Linear(dim, num_experts, bias=False, **factory)  # router, (E, D) weight
        self.experts = GroupedExperts(num_experts, dim, expert_hidden_dim, **factory)
        if shared_expert_hidden_dim:
            self.shared_expert = SwiGLU(dim, shared_expert_hidden_dim, **factory)
            self.shared_expert_gate = nn.Linear(dim, 1, bias=False, **factory)
        else:
            self.shared_expert = self.shared_expert_gate = None
        # expert parallelism (train/parallel/expert_parallel.py) sets the exchange that runs the
        # rows through experts on other ranks: (rows, tokens_per_expert (E,), local experts) -> rows.
        # Here, not a patched experts.forward: quantization (modelopt) rebinds that to its class's.
        self.expert_dispatch = None
        self.balance_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, k) in x's dtype, expert indices (N, k) int64."""
        logits = self.gate(x)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self._record_balance(logits, indices)
        return weights.to(logits.dtype), indices

    def _record_balance(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        # Switch Transformer eq. 4-6 terms; the probabilities use the logits' dtype as HF does.
        probability = torch.softmax(logits, dim=-1).mean(dim=0)  # (E,), differentiable
        with torch.no_grad():
            counts = torch.bincount(indices.flatten(), minlength=self.num_experts)
            fraction = counts.to(probability.dtype) / indices.shape[0]  # (E,), sums to k
        self.balance_stats = (fraction, probability)
        self.aux_loss = self.num_experts * (fraction * probability).sum()

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor):
        """x (N, D), indices (N, k) -> rows (N*k, D) sorted by expert, tokens_per_expert (E,), order.

        order (N*k,) maps sorted row -> flat (token, slot) position; stable, so within one
        expert the rows keep token order.
        """
        flat = indices.flatten()  # (N*k,) slot-major within a token
        order = torch.argsort(flat, stable=True)
        tokens_per_expert = torch.bincount(flat, minlength=self.num_experts)
        return x[order // self.top_k], tokens_per_expert, order

    def combine(self, y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y (N*k, D) in sorted order -> (N, D): back to (token, slot) order, weighted sum over k."""
        unsorted = y[torch.argsort(order)].view(*weights.shape, -1)  # (N, k, D)
        return (unsorted * weights.unsqueeze(-1)).sum(dim=1)

    def routed_experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The part expert parallelism replaces: (N, D) tokens -> (N, D) weighted expert outputs."""
        rows, tokens_per_expert, order = self.dispatch(x, indices)
        if self.expert_dispatch is None:
            return self.combine(self.experts(rows, tokens_per_expert), order, weights)
        return self.combine(self.expert_dispatch(rows, tokens_per_expert, self.experts), order, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D), N = B * T
        weights, indices = self.route(x)
        out = self.routed_experts(x, weights, indices)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


def combined_aux_loss(moe_layers: list[MoE]) -> torch.Tensor | None:
    """HF load_balancing_loss_func over all MoE layers (no padding mask), unweighted.

    HF concatenates every layer's router logits before averaging, so with equal token
    counts per layer: E * sum_e mean_layers(fraction_e) * mean_layers(probability_e).
    None when no layer has run a forward yet.
    """
    stats = [layer.balance_stats for layer in moe_layers if layer.balance_stats is not None]
    if not stats:
        return None
    fraction = torch.stack([f for f, _ in stats]).mean(dim=0)
    probability = torch.stack([p for _, p in stats]).mean(dim=0)
    return moe_layers[0].num_experts * (fraction * probability).sum()
