"""build_model and init_weights: construct on the meta device, materialize, seed-initialize."""

from __future__ import annotations

import torch

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

    Re-ties embeddings and rebuilds the RoPE cache, so it is the step after `to_empty`.
    """
    model.tie_weights()
    model.init_buffers()
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    model.init_parameters(generator)
    return model
