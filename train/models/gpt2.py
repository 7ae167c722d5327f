"""GPT-2: learned absolute positions, pre-norm LayerNorm with bias, GELU (tanh) MLP, tied lm_head.

Our layer names are the LLaMA-style ones shared by all families (self_attn.q_proj, mlp.up_proj,
input_layernorm...); hf_adapters.py maps HF's fused, transposed Conv1D c_attn/c_fc/c_proj.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from train.models.common.attention import Attention
from train.models.common.mlp import GeluMLP
from train.models.common.transformer import CausalLM, TransformerBlock
from train.models.family import family_spec

SPEC = family_spec("gpt2")  # what registry, HF conversion, export and checks know (family.py)


class GPT2(CausalLM):
    def __init__(self, args, *, attention_backend: str = "sdpa", device=None, dtype=None):
        super().__init__(args, attention_backend=attention_backend, device=device, dtype=dtype)
        self.embed_positions = nn.Embedding(args.max_seq_len, args.hidden_size, device=device, dtype=dtype)

    def build_block(self, layer_index: int, factory: dict) -> nn.Module:
        a = self.args
        attention = Attention(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, bias=True,
                              backend=self.attention_backend, **factory)
        return TransformerBlock(self.build_norm(factory), attention, self.build_norm(factory),
                                GeluMLP(a.hidden_size, a.intermediate_size, **factory))

    def build_norm(self, factory: dict) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=self.args.norm_eps, **factory)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if position_ids is None:
            if seq_len > self.args.max_seq_len:
                raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.args.max_seq_len}")
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)  # (1, T)
        return self.embed_tokens(input_ids) + self.embed_positions(position_ids)  # (B, T, D)

    def init_parameters(self, generator: torch.Generator) -> None:
        # HF GPT2PreTrainedModel: weights ~ N(0, 0.02), biases 0, LayerNorm 1/0, and the
        # residual output projections scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3).
        residual_std = self.args.init_std / math.sqrt(2 * self.args.num_layers)
        for name, param in self.named_parameters():
            if "layernorm" in name or name.startswith("norm."):
                nn.init.ones_(param) if name.endswith("weight") else nn.init.zeros_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, residual_std, generator=generator)
            else:
                param.normal_(0.0, self.args.init_std, generator=generator)
