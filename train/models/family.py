"""FamilySpec: what the rest of the stack needs to know about one model family, as data.

Registry validation, parameter counting, HF conversion, export and the parallelism checks look
a family up with family_spec(name) instead of branching on its name. Torch-free: the
torch-backed pieces (the model class, the HF adapters) are "module:attribute" strings that
FamilySpec.load imports on first use. Each family module (gpt2.py, llama.py, ...) re-exports
its spec as SPEC; the specs are defined here so that the launcher reads them without torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from train.models.errors import ModelConfigError

_ADAPTERS = "train.models.hf_adapters"


@dataclass(frozen=True)
class FamilySpec:
    name: str  # ModelArgs.family
    model_type: str  # HF config.json model_type (AutoConfig.for_model)
    hf_architecture: str  # HF config.json architectures[0]
    model_class: str  # "module:Class" of our CausalLM subclass
    # -- shape rules (ModelArgs.validate) and parameter accounting -----------------------------
    head_dim_from_hidden: bool = False  # head_dim must equal hidden_size / num_heads (HF GPT-2, LLaMA)
    gqa: bool = True  # num_kv_heads may be below num_heads
    rope: bool = True  # rotary positions (even head_dim); False: a learned position table
    bias: bool = False  # biased linears and LayerNorms (GPT-2's Conv1D layers)
    qk_norm: bool = False  # per-head q/k RMSNorm weights
    experts: str = "none"  # "none": dense only; "always": MoE needs num_experts > 0; "optional"
    hybrid: bool = False  # per-layer mixers (layer_types): Gated DeltaNet and gated attention
    # -- what the rest of the stack supports --------------------------------------------------
    tensor_parallel: bool = True  # a DTensor TP plan exists
    nvfp4_export: bool = False  # export --format hf-nvfp4
    # -- HF conversion (hf_adapters.py) ------------------------------------------------------
    args_from_hf: str = f"{_ADAPTERS}:_decoder_args_from_hf"  # (config, name, spec) -> ModelArgs
    hf_rope_theta: float = 1_000_000.0  # rope_theta when config.json has none
    hf_extra_args: str | None = None  # "module:function" (config) -> extra ModelArgs fields
    hf_config_kwargs: str = f"{_ADAPTERS}:_decoder_config_kwargs"  # (args) -> transformers config kwargs
    to_hf: str = f"{_ADAPTERS}:_llama_to_hf"  # (state, args) -> HF state dict
    from_hf: str = f"{_ADAPTERS}:_llama_from_hf"  # (state, args) -> our state dict
    hf_optional_prefix: str = ""  # HF checkpoints may omit this prefix (GPT2Model vs GPT2LMHeadModel)
    hf_grouped_experts: bool = False  # HF checkpoints may hold grouped expert tensors

    def load(self, field: str) -> Any:
        """Import the "module:attribute" reference held in `field`."""
        module, _, attribute = getattr(self, field).partition(":")
        return getattr(importlib.import_module(module), attribute)


_SPECS = (
    FamilySpec(name="gpt2", model_type="gpt2", hf_architecture="GPT2LMHeadModel",
               model_class="train.models.gpt2:GPT2", head_dim_from_hidden=True, gqa=False, rope=False,
               bias=True, args_from_hf=f"{_ADAPTERS}:_gpt2_args_from_hf",
               hf_config_kwargs=f"{_ADAPTERS}:_gpt2_config_kwargs", to_hf=f"{_ADAPTERS}:_gpt2_to_hf",
               from_hf=f"{_ADAPTERS}:_gpt2_from_hf", hf_optional_prefix="transformer."),
    FamilySpec(name="llama", model_type="llama", hf_architecture="LlamaForCausalLM",
               model_class="train.models.llama:Llama", head_dim_from_hidden=True, nvfp4_export=True,
               hf_rope_theta=10_000.0),
    FamilySpec(name="qwen3", model_type="qwen3", hf_architecture="Qwen3ForCausalLM",
               model_class="train.models.qwen3:Qwen3", qk_norm=True, nvfp4_export=True),
    FamilySpec(name="qwen3_moe", model_type="qwen3_moe", hf_architecture="Qwen3MoeForCausalLM",
               model_class="train.models.qwen3_moe:Qwen3Moe", qk_norm=True, experts="always",
               hf_extra_args=f"{_ADAPTERS}:_moe_args_from_hf",
               hf_config_kwargs=f"{_ADAPTERS}:_qwen3_moe_config_kwargs", to_hf=f"{_ADAPTERS}:_qwen3_moe_to_hf",
               from_hf=f"{_ADAPTERS}:_qwen3_moe_from_hf", hf_grouped_experts=True),
    # Same HF state-dict names and per-expert layout as qwen3_moe.
    FamilySpec(name="qwen3_next", model_type="qwen3_next", hf_architecture="Qwen3NextForCausalLM",
               model_class="train.models.qwen3_next:Qwen3Next", experts="optional", hybrid=True,
               hf_extra_args=f"{_ADAPTERS}:_qwen3_next_fields",
               hf_config_kwargs=f"{_ADAPTERS}:_qwen3_next_config_kwargs", to_hf=f"{_ADAPTERS}:_qwen3_moe_to_hf",
               from_hf=f"{_ADAPTERS}:_qwen3_moe_from_hf"),
)
SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in _SPECS}
FAMILIES = tuple(SPECS)


def family_spec(family: str) -> FamilySpec:
    """The spec of a family name (ModelArgs.family); KeyError names the known families."""
    try:
        return SPECS[family]
    except KeyError:
        raise KeyError(f"family {family!r} is not one of {', '.join(FAMILIES)}") from None


def spec_for_model_type(model_type: str | None, source: str) -> FamilySpec:
    """The spec whose HF model_type is `model_type`; ModelConfigError for the others."""
    for spec in _SPECS:
        if spec.model_type == model_type:
            return spec
    raise ModelConfigError(f"{source}: model_type {model_type!r} is not supported "
                           f"(supported: {', '.join(spec.model_type for spec in _SPECS)})")
