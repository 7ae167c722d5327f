"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm) with sparse MoE MLPs.

Layer i gets a MoE MLP (softmax top-k router, grouped experts, no shared expert) when
args.is_moe_layer(i), else the dense SwiGLU of width intermediate_size (HF mlp_only_layers /
decoder_sparse_step). Module names equal HF Qwen3MoeForCausalLM's without 'model.'.
"""

from __future__ import annotations

from torch import nn

from train.models.common.moe import MoE
from train.models.family import family_spec
from train.models.qwen3 import Qwen3

SPEC = family_spec("qwen3_moe")  # what registry, HF conversion, export and checks know (family.py)


class Qwen3Moe(Qwen3):
    def build_mlp(self, layer_index: int, factory: dict) -> nn.Module:
        a = self.args
        if not a.is_moe_layer(layer_index):
            return super().build_mlp(layer_index, factory)
        return MoE(a.hidden_size, a.num_experts, a.num_experts_per_token, a.moe_intermediate_size,
                   normalize_top_k=a.norm_topk_prob, **factory)
