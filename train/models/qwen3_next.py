"""Qwen3-Next: a hybrid of Gated DeltaNet (linear) and gated full-attention layers.

Each block is pre-norm like LLaMA, with zero-centred RMSNorms (scale 1 + weight) and a token
mixer chosen per layer by args.resolved_layer_types():
    'linear_attention' -> block.linear_attn  (common/gated_deltanet.GatedDeltaNet)
    'full_attention'   -> block.self_attn    (common/gated_attention.GatedAttention, partial RoPE)
then a SwiGLU MLP or, where args.is_moe_layer(i), routed experts plus a sigmoid-gated shared
expert (common/moe.MoE).
Module names equal HF Qwen3NextForCausalLM's without 'model.'.
"""

from __future__ import annotations

import torch
from torch import nn

from train.models.common.gated_attention import GatedAttention
from train.models.common.gated_deltanet import GatedDeltaNet
from train.models.common.mlp import SwiGLU
from train.models.common.moe import GroupedExperts, MoE
from train.models.common.norms import ZeroCenteredRMSNorm
from train.models.common.rope import rope_cache, rope_for_positions
from train.models.common.transformer import CausalLM
from train.models.family import family_spec

SPEC = family_spec("qwen3_next")  # what registry, HF conversion, export and checks know (family.py)


class HybridBlock(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is linear_attn or self_attn."""

    def __init__(self, layer_type: str, input_layernorm: nn.Module, mixer: nn.Module,
                 post_attention_layernorm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = input_layernorm
        if layer_type == "linear_attention":
            self.linear_attn = mixer
        else:
            self.self_attn = mixer
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.mixer(self.input_layernorm(x), rope)  # (B, T, D); DeltaNet ignores rope
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Next(CausalLM):
    def __init__(self, args, *, attention_backend: str = "sdpa", device=None, dtype=None):
        super().__init__(args, attention_backend=attention_backend, device=device, dtype=dtype)
        # (max_seq_len, 2, rotary_dim) float32 cos/sin for the partial RoPE; rebuilt, never saved.
        self.register_buffer("rope_cache", self._rope_table(), persistent=False)

    def build_block(self, layer_index: int, factory: dict) -> nn.Module:
        a = self.args
        layer_type = a.resolved_layer_types()[layer_index]
        if layer_type == "linear_attention":
            mixer = GatedDeltaNet(a.hidden_size, a.linear_num_key_heads, a.linear_num_value_heads,
                                  a.linear_key_head_dim, a.linear_value_head_dim, a.linear_conv_kernel,
                                  a.norm_eps, **factory)
        else:
            mixer = GatedAttention(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.rotary_dim,
                                   norm_eps=a.norm_eps, backend=self.attention_backend, **factory)
        if a.is_moe_layer(layer_index):  # routed experts + sigmoid-gated shared expert
            mlp = MoE(a.hidden_size, a.num_experts, a.num_experts_per_token, a.moe_intermediate_size,
                      normalize_top_k=a.norm_topk_prob,
                      shared_expert_hidden_dim=a.shared_expert_intermediate_size, **factory)
        else:
            mlp = SwiGLU(a.hidden_size, a.intermediate_size, **factory)
        return HybridBlock(layer_type, ZeroCenteredRMSNorm(a.hidden_size, a.norm_eps, **factory), mixer,
                           ZeroCenteredRMSNorm(a.hidden_size, a.norm_eps, **factory), mlp)

    def build_norm(self, factory: dict) -> nn.Module:
        return ZeroCenteredRMSNorm(self.args.hidden_size, self.args.norm_eps, **factory)

    def _rope_table(self) -> torch.Tensor:
        a = self.args
        return rope_cache(a.max_seq_len, a.rotary_dim, a.rope_theta, a.rope_scaling,
                          device=next(self.parameters()).device)  # a pipeline stage may lack embed_tokens

    def init_buffers(self) -> None:
        self.rope_cache = self._rope_table()

    def rope(self, seq_len: int, position_ids: torch.Tensor | None, dtype: torch.dtype):
        return rope_for_positions(self.rope_cache, seq_len, position_ids, dtype)

    def set_deltanet_kernel(self, kernel: str) -> None:
        """'auto' (fla / causal-conv1d on CUDA when installed), 'chunk' or 'recurrent' (reference)."""
        for module in self.modules():
            if isinstance(module, GatedDeltaNet):
                module.kernel = kernel

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator) -> None:
        # HF Qwen3NextPreTrainedModel: Linear/Embedding/Conv ~ N(0, initializer_range), zero-centred
        # norms 0 (scale 1), gated norms 1, dt_bias 1, A_log = log U(0, 16).
        std = self.args.init_std
        deltanets = [m for m in self.modules() if isinstance(m, GatedDeltaNet)]
        owned = {id(child) for m in deltanets for child in m.modules()}  # initialized by their owner
        for module in self.modules():
            if isinstance(module, GatedDeltaNet):
                module.init_parameters(generator, std)
            elif id(module) in owned:
                continue
            elif isinstance(module, GroupedExperts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
            elif isinstance(module, ZeroCenteredRMSNorm):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)) and not (
                    module is self.lm_head and self.args.tie_embeddings):
                module.weight.normal_(0.0, std, generator=generator)
