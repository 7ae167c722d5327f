"""The decoder skeleton every family shares: embeddings, pre-norm blocks, final norm, lm_head.

A family subclasses CausalLM and fills in build_block / build_norm / init_parameters (and,
for positions, embed / rope). Everything here runs on one device; FSDP, TP, activation
checkpointing and compile wrap `model.layers` from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from train.models.common.moe import MoE, combined_aux_loss
from train.models.registry import ModelArgs


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2 and LLaMA alike)."""

    def __init__(self, input_layernorm: nn.Module, self_attn: nn.Module,
                 post_attention_layernorm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)  # (B, T, D)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """input_ids (B, T) -> logits (B, T, vocab). State-dict names follow HF LLaMA minus 'model.'."""

    def __init__(self, args: ModelArgs, *, attention_backend: str = "sdpa", device=None, dtype=None):
        super().__init__()
        self.args = args.validate()
        self.attention_backend = attention_backend
        factory = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, **factory)
        self.layers = nn.ModuleList(self.build_block(i, factory) for i in range(args.num_layers))
        self.norm = self.build_norm(factory)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, **factory)
        self.tie_weights()

    # -- family hooks -------------------------------------------------------------------
    def build_block(self, layer_index: int, factory: dict) -> nn.Module:
        raise NotImplementedError

    def build_norm(self, factory: dict) -> nn.Module:
        raise NotImplementedError

    def init_parameters(self, generator: torch.Generator) -> None:
        """Fill every parameter from `generator` (the reference implementation's scheme)."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE cache) after to_empty / checkpoint load."""

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(self, seq_len: int, position_ids: torch.Tensor | None, dtype: torch.dtype):
        return None

    # -- shared --------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share the embedding with lm_head when tied; needed again after to_empty/assign."""
        if self.args.tie_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight  # (a pipeline stage holds one of the two, or none)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) activations after the final norm."""
        x = self.embed(input_ids, position_ids)  # (B, T, D)
        rope = self.rope(input_ids.shape[1], position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., vocab); lets a trainer compute the loss in chunks."""
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab); return_hidden: the (B, T, D) final-norm activations instead, still
        through the wrapper's forward (DDP, FSDP2 hooks), for losses computed in chunks."""
        hidden = self.hidden_states(input_ids, position_ids)
        return hidden if return_hidden else self.output_logits(hidden)

    def auxiliary_loss(self) -> torch.Tensor:
        """Loss terms to add to the task loss for the last forward: the MoE load-balancing
        loss times args.router_aux_loss_coef (HF's aux_loss * coef), a scalar zero for dense
        models (and for MoE models before any forward)."""
        device = self.embed_tokens.weight.device
        aux = combined_aux_loss([m for m in self.modules() if isinstance(m, MoE)])
        if aux is None:
            return torch.zeros((), device=device)
        return self.args.router_aux_loss_coef * aux
