"""LLaMA 2 / LLaMA 3: RMSNorm, RoPE (theta, llama3 scaling), SwiGLU, grouped-query attention.

Module names equal HF LlamaForCausalLM's without the 'model.' prefix, so checkpoints map 1:1.
"""

from __future__ import annotations

import torch
from torch import nn

from train.models.common.attention import Attention
from train.models.common.mlp import SwiGLU
from train.models.common.norms import RMSNorm
from train.models.common.rope import rope_cache, rope_for_positions
from train.models.common.transformer import CausalLM, TransformerBlock
from train.models.family import family_spec

SPEC = family_spec("llama")  # what registry, HF conversion, export and checks know (family.py)


class Llama(CausalLM):
    qk_norm = False  # Qwen3 turns on per-head q/k RMSNorm

    def __init__(self, args, *, attention_backend: str = "sdpa", device=None, dtype=None):
        super().__init__(args, attention_backend=attention_backend, device=device, dtype=dtype)
        # (max_seq_len, 2, head_dim) float32 cos/sin; non-persistent: rebuilt, never saved.
        self.register_buffer("rope_cache", self._rope_table(), persistent=False)

    def build_block(self, layer_index: int, factory: dict) -> nn.Module:
        a = self.args
        attention = Attention(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, bias=False,
                              qk_norm=self.qk_norm, norm_eps=a.norm_eps,
                              backend=self.attention_backend, **factory)
        return TransformerBlock(RMSNorm(a.hidden_size, a.norm_eps, **factory), attention,
                                RMSNorm(a.hidden_size, a.norm_eps, **factory),
                                self.build_mlp(layer_index, factory))

    def build_mlp(self, layer_index: int, factory: dict) -> nn.Module:
        return SwiGLU(self.args.hidden_size, self.args.intermediate_size, **factory)

    def build_norm(self, factory: dict) -> nn.Module:
        return RMSNorm(self.args.hidden_size, self.args.norm_eps, **factory)

    def _rope_table(self) -> torch.Tensor:
        a = self.args
        return rope_cache(a.max_seq_len, a.head_dim, a.rope_theta, a.rope_scaling,
                          device=next(self.parameters()).device)  # a pipeline stage may lack embed_tokens

    def init_buffers(self) -> None:
        self.rope_cache = self._rope_table()  # follows the weights' device (after to_empty/assign)

    def rope(self, seq_len: int, position_ids: torch.Tensor | None, dtype: torch.dtype):
        return rope_for_positions(self.rope_cache, seq_len, position_ids, dtype)

    def init_parameters(self, generator: torch.Generator) -> None:
        # HF LlamaPreTrainedModel: every Linear and Embedding ~ N(0, initializer_range), norms 1.
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            else:
                param.normal_(0.0, self.args.init_std, generator=generator)
