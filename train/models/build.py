"""build_model and init_weights: construct on the meta device, materialize, seed-initialize."""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from train.models.common.attention import resolve_attention_backend
from train.models.common.transformer import CausalLM
from train.models.family import family_spec
from train.models.registry import ModelArgs, get_model_args


def model_class(family: str) -> type[CausalLM]:
    return family_spec(family).load("model_class")


def build_model(args_or_name: ModelArgs | str, *, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32, attention_backend: str = "sdpa",
                seed: int | None = 0) -> CausalLM:
    """A CausalLM for a registry name or ModelArgs.

    device='meta' returns an unmaterialized model (shapes only): parallelize it, then
    `model.to_empty(device=...)` and `init_weights(model, seed)`. On a real device the model
    is built the same way and initialized with `seed` (None leaves the memory uninitialized,
    e.g. before loading a checkpoint).
    """
    args = get_model_args(args_or_name) if isinstance(args_or_name, str) else args_or_name
    args.validate()
    backend = resolve_attention_backend(attention_backend, device, dtype)
    with torch.device("meta"):
        model = model_class(args.family)(args, attention_backend=backend, dtype=dtype)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        if seed is None:
            model.tie_weights()
            model.init_buffers()
        else:
            init_weights(model, seed)
    return model


@torch.no_grad()
def init_weights(model: CausalLM, seed: int) -> CausalLM:
    """Deterministic init: same seed, same device type -> bit-identical weights.

    Each piece of the model (the embedding, each block `layers.<i>`, the final norm, lm_head,
    GPT-2's positions) is initialized by the family's scheme (init_parameters) from a generator
    seeded by (seed, its name) alone, so a piece's values do not depend on which other pieces
    the model holds: a pipeline stage (train/parallel/pipeline.py) initializes its own blocks to
    the values the whole model gives them. A tied lm_head without the embedding (the last stage's
    copy) takes the embedding's values. Re-ties embeddings and rebuilds the RoPE cache, so it is
    the step after `to_empty`.
    """
    model.tie_weights()
    model.init_buffers()
    device = next(model.parameters()).device
    tied = model.args.tie_embeddings
    for name, piece in list(model.named_children()):
        if piece is None or (tied and name == "lm_head" and model.embed_tokens is not None):
            continue  # absent on this stage; a tied lm_head is the embedding, initialized as it
        if name == "layers":
            for index, block in list(piece.named_children()):  # a stage's indices have gaps
                with only_piece(model, name, nn.ModuleDict({index: block})):
                    model.init_parameters(piece_generator(device, seed, f"layers.{index}"))
        elif tied and name == "lm_head":  # the tied copy alone: drawn as the embedding is
            embedding = nn.Embedding(*piece.weight.shape, device="meta")
            embedding.weight = piece.weight
            with only_piece(model, "embed_tokens", embedding):
                model.init_parameters(piece_generator(device, seed, "embed_tokens"))
        else:
            with only_piece(model, name, piece):
                model.init_parameters(piece_generator(device, seed, name))
    return model


def piece_generator(device: torch.device, seed: int, name: str) -> torch.Generator:
    """A generator on `device` seeded by (seed, piece name): a stable 63-bit hash of both."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@contextlib.contextmanager
def only_piece(model: CausalLM, name: str, piece: nn.Module):
    """Inside: `model` holds `piece` under `name` and None for every other child (named_parameters
    and modules() skip them; self.lm_head reads None), so the family's init_parameters, which walks
    the whole model, fills that piece alone. The children are put back after."""
    children = dict(model._modules)
    model._modules.update({other: None for other in children})
    model._modules[name] = piece
    try:
        yield
    finally:
        model._modules.clear()
        model._modules.update(children)
