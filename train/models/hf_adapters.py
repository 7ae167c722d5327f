"""HF <-> ours: config.json to ModelArgs and back, and state-dict renaming/reshaping per family.

LLaMA and Qwen3 differ from HF only by the 'model.' prefix. GPT-2 HF stores Conv1D weights
transposed ((in, out) instead of nn.Linear's (out, in)) and q, k, v fused in c_attn.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from train.models.errors import ModelConfigError
from train.models.family import SPECS, FamilySpec, family_spec, spec_for_model_type
from train.models.registry import ModelArgs

if TYPE_CHECKING:  # torch is imported where tensors are joined: the plan reads configs without it
    import torch

SUPPORTED_MODEL_TYPES = {spec.model_type: spec.name for spec in SPECS.values()}  # HF model_type -> family
HF_ARCHITECTURES = {spec.name: spec.hf_architecture for spec in SPECS.values()}

# Keys some HF checkpoints carry that are buffers, not weights.
IGNORED_HF_KEYS = re.compile(r"(\.attn\.(masked_)?bias$)|(rotary_emb\.inv_freq$)")


def family_for_model_type(model_type: str | None, source: str) -> str:
    return spec_for_model_type(model_type, source).name


def _rope_settings(config: dict[str, Any], default_theta: float) -> tuple[float, dict | None]:
    # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; 4.x wrote
    # rope_theta and rope_scaling at the top level. Accept both.
    params = dict(config.get("rope_parameters") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", default_theta))
    scaling = params if params.get("rope_type", "default") != "default" else config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    if scaling is not None and "rope_type" not in scaling:
        scaling = {**scaling, "rope_type": scaling.get("type")}
    return float(theta), scaling


def args_from_hf_config(config: dict[str, Any], name: str) -> ModelArgs:
    """ModelArgs for an HF config.json dict; ModelConfigError for what we cannot represent."""
    spec = spec_for_model_type(config.get("model_type"), name)
    return spec.load("args_from_hf")(config, name, spec)


def _gpt2_args_from_hf(config: dict[str, Any], name: str, spec: FamilySpec) -> ModelArgs:
    """GPT2Config names (n_embd, n_layer, ...); GELU (tanh) only."""
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelConfigError(f"{name}: GPT-2 activation_function "
                               f"{config['activation_function']!r} is not supported (gelu_new only)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(flag):
            raise ModelConfigError(f"{name}: GPT-2 option {flag}=true is not supported")
    hidden, heads = config["n_embd"], config["n_head"]
    return ModelArgs(
        name=name, family=spec.name, vocab_size=config["vocab_size"], hidden_size=hidden,
        num_layers=config["n_layer"], num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, intermediate_size=config.get("n_inner") or 4 * hidden,
        max_seq_len=config["n_positions"], norm_eps=config.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", True),
        init_std=config.get("initializer_range", 0.02)).validate()


def _decoder_args_from_hf(config: dict[str, Any], name: str, spec: FamilySpec) -> ModelArgs:
    """LLaMA-style config.json (RMSNorm, RoPE, SwiGLU) plus the family's extra fields."""
    family = spec.name
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if config.get(flag):
            raise ModelConfigError(f"{name}: {flag}=true is not supported for {family}")
    if config.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{name}: hidden_act {config['hidden_act']!r} is not supported (silu only)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    theta, scaling = _rope_settings(config, spec.hf_rope_theta)
    extra = spec.load("hf_extra_args")(config) if spec.hf_extra_args else {}
    return ModelArgs(
        name=name, family=family, vocab_size=config["vocab_size"], hidden_size=hidden,
        num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        intermediate_size=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048), rope_theta=theta,
        rope_scaling=scaling, norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=config.get("tie_word_embeddings", False),
        init_std=config.get("initializer_range", 0.02), **extra).validate()


def _moe_args_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    # Defaults are Qwen3MoeConfig's (transformers 5), used when a key is absent. transformers 5
    # writes num_local_experts (num_experts is its attribute alias), 4.x and the Hub num_experts.
    return dict(num_experts=config.get("num_experts", config.get("num_local_experts", 128)),
                num_experts_per_token=config.get("num_experts_per_tok", 8),
                moe_intermediate_size=config.get("moe_intermediate_size", 768),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
                decoder_sparse_step=config.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(config.get("mlp_only_layers") or ()))


def _qwen3_next_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The qwen3_next block of ModelArgs from a Qwen3NextConfig dict (absent keys: its defaults)."""
    rope = config.get("rope_parameters") or {}
    layer_types = config.get("layer_types")
    num_experts = config.get("num_experts", 512)
    moe = dict(num_experts=num_experts, num_experts_per_token=config.get("num_experts_per_tok", 10),
               moe_intermediate_size=config.get("moe_intermediate_size", 512),
               shared_expert_intermediate_size=config.get("shared_expert_intermediate_size", 512),
               norm_topk_prob=bool(config.get("norm_topk_prob", True)),
               router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
               decoder_sparse_step=config.get("decoder_sparse_step", 1),
               mlp_only_layers=tuple(config.get("mlp_only_layers") or ())) if num_experts else {}
    return dict(
        layer_types=tuple(layer_types) if layer_types else None,
        full_attention_interval=config.get("full_attention_interval", 4),
        linear_num_key_heads=config.get("linear_num_key_heads", 16),
        linear_num_value_heads=config.get("linear_num_value_heads", 32),
        linear_key_head_dim=config.get("linear_key_head_dim", 128),
        linear_value_head_dim=config.get("linear_value_head_dim", 128),
        linear_conv_kernel=config.get("linear_conv_kernel_dim", 4),
        partial_rotary_factor=rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25)),
        **moe)


def hf_config_kwargs(args: ModelArgs) -> dict[str, Any]:
    """Keyword arguments for transformers' config class of args.family (4.x and 5.x accept them)."""
    return family_spec(args.family).load("hf_config_kwargs")(args)


def _gpt2_config_kwargs(args: ModelArgs) -> dict[str, Any]:
    return dict(vocab_size=args.vocab_size, n_embd=args.hidden_size, n_layer=args.num_layers,
                n_head=args.num_heads, n_inner=args.intermediate_size, n_positions=args.max_seq_len,
                layer_norm_epsilon=args.norm_eps, activation_function="gelu_new",
                tie_word_embeddings=args.tie_embeddings, initializer_range=args.init_std)


def _qwen3_next_config_kwargs(args: ModelArgs) -> dict[str, Any]:
    return dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                num_key_value_heads=args.num_kv_heads, head_dim=args.head_dim,
                intermediate_size=args.intermediate_size, max_position_embeddings=args.max_seq_len,
                rope_parameters=dict(rope_type="default", rope_theta=args.rope_theta,
                                     partial_rotary_factor=args.partial_rotary_factor),
                rms_norm_eps=args.norm_eps, tie_word_embeddings=args.tie_embeddings,
                initializer_range=args.init_std, attention_bias=False, hidden_act="silu",
                layer_types=args.resolved_layer_types(),
                linear_num_key_heads=args.linear_num_key_heads,
                linear_num_value_heads=args.linear_num_value_heads,
                linear_key_head_dim=args.linear_key_head_dim,
                linear_value_head_dim=args.linear_value_head_dim,
                linear_conv_kernel_dim=args.linear_conv_kernel, num_experts=args.num_experts,
                num_experts_per_tok=args.num_experts_per_token or 1,
                moe_intermediate_size=args.moe_intermediate_size,
                shared_expert_intermediate_size=args.shared_expert_intermediate_size,
                norm_topk_prob=args.norm_topk_prob, router_aux_loss_coef=args.router_aux_loss_coef,
                decoder_sparse_step=args.decoder_sparse_step, mlp_only_layers=list(args.mlp_only_layers))


def _qwen3_moe_config_kwargs(args: ModelArgs) -> dict[str, Any]:
    return _decoder_config_kwargs(args, moe=dict(
        num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_token,
        moe_intermediate_size=args.moe_intermediate_size, norm_topk_prob=args.norm_topk_prob,
        router_aux_loss_coef=args.router_aux_loss_coef, decoder_sparse_step=args.decoder_sparse_step,
        mlp_only_layers=list(args.mlp_only_layers)))


def _decoder_config_kwargs(args: ModelArgs, moe: dict[str, Any] | None = None) -> dict[str, Any]:
    """LLaMA-style config kwargs (llama, qwen3; qwen3_moe adds its MoE fields)."""
    moe = moe or {}
    return dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                num_key_value_heads=args.num_kv_heads, head_dim=args.head_dim,
                intermediate_size=args.intermediate_size, max_position_embeddings=args.max_seq_len,
                rope_theta=args.rope_theta, rope_scaling=args.rope_scaling, rms_norm_eps=args.norm_eps,
                tie_word_embeddings=args.tie_embeddings, initializer_range=args.init_std,
                attention_bias=False, hidden_act="silu", **moe)


# -- state dicts ---------------------------------------------------------------------------
StateDict = dict[str, "torch.Tensor"]


def _llama_to_hf(state: StateDict, args: ModelArgs) -> StateDict:
    return {(key if key == "lm_head.weight" else f"model.{key}"): value for key, value in state.items()
            if not (args.tie_embeddings and key == "lm_head.weight")}


def _llama_from_hf(state: StateDict, args: ModelArgs) -> StateDict:
    return {key.removeprefix("model."): value for key, value in state.items()}


# Qwen3-MoE experts. In memory (ours, transformers 5) they are grouped 3-D tensors:
#   mlp.experts.gate_up_proj (E, 2F, D) = [gate rows; up rows], mlp.experts.down_proj (E, D, F).
# On disk (the Hub's Qwen3-30B-A3B, transformers 4.x, and transformers 5's save_pretrained)
# each expert is three Linear weights: mlp.experts.{j}.{gate,up}_proj.weight (F, D),
# mlp.experts.{j}.down_proj.weight (D, F). We write the per-expert form and read both.
_GROUPED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _split_experts(key: str, value):
    """One grouped key -> its per-expert keys; works on tensors and on shape tuples."""
    prefix, kind = _GROUPED.match(key).groups()
    if isinstance(value, tuple):  # shapes only (key checks)
        experts, rows, cols = value
        if kind == "down_proj":
            return {f"{prefix}.{j}.down_proj.weight": (rows, cols) for j in range(experts)}
        return {f"{prefix}.{j}.{p}.weight": (rows // 2, cols) for j in range(experts) for p in ("gate_proj", "up_proj")}
    out = {}
    for j, weight in enumerate(value.unbind(0)):
        if kind == "down_proj":
            out[f"{prefix}.{j}.down_proj.weight"] = weight
        else:
            gate, up = weight.chunk(2, dim=0)
            out[f"{prefix}.{j}.gate_proj.weight"], out[f"{prefix}.{j}.up_proj.weight"] = gate, up
    return out


def split_grouped_experts(state: dict) -> dict:
    """Grouped expert keys -> per-expert keys (tensors or shape tuples); other keys unchanged."""
    out = {}
    for key, value in state.items():
        grouped = _GROUPED.match(key) and len(value.shape if hasattr(value, "shape") else value) == 3
        out.update(_split_experts(key, value) if grouped else {key: value})
    return out


def _stack_per_expert(state: StateDict) -> StateDict:
    """Per-expert keys -> grouped 3-D tensors (expert order by index); other keys unchanged."""
    out, groups = {}, {}
    for key, value in state.items():
        match = PER_EXPERT.match(key)
        if match is None:
            out[key] = value
        else:
            prefix, j, proj = match.groups()
            groups.setdefault(prefix, {}).setdefault(proj, {})[int(j)] = value
    import torch

    for prefix, projections in groups.items():
        stack = {proj: torch.stack([by_index[j] for j in sorted(by_index)]) for proj, by_index in projections.items()}
        out[f"{prefix}.gate_up_proj"] = torch.cat((stack["gate_proj"], stack["up_proj"]), dim=1)  # (E, 2F, D)
        out[f"{prefix}.down_proj"] = stack["down_proj"]
    return out


def _qwen3_moe_to_hf(state: StateDict, args: ModelArgs) -> StateDict:
    return split_grouped_experts(_llama_to_hf(state, args))


def _qwen3_moe_from_hf(state: StateDict, args: ModelArgs) -> StateDict:
    return _llama_from_hf(_stack_per_expert(state), args)


_GPT2_RENAMES = [  # ours, HF (below 'transformer.'), transposed (HF Conv1D)
    ("embed_tokens.weight", "wte.weight", False),
    ("embed_positions.weight", "wpe.weight", False),
    ("norm.weight", "ln_f.weight", False),
    ("norm.bias", "ln_f.bias", False),
]
_GPT2_LAYER_RENAMES = [
    ("input_layernorm.weight", "ln_1.weight", False), ("input_layernorm.bias", "ln_1.bias", False),
    ("post_attention_layernorm.weight", "ln_2.weight", False),
    ("post_attention_layernorm.bias", "ln_2.bias", False),
    ("self_attn.o_proj.weight", "attn.c_proj.weight", True), ("self_attn.o_proj.bias", "attn.c_proj.bias", False),
    ("mlp.up_proj.weight", "mlp.c_fc.weight", True), ("mlp.up_proj.bias", "mlp.c_fc.bias", False),
    ("mlp.down_proj.weight", "mlp.c_proj.weight", True), ("mlp.down_proj.bias", "mlp.c_proj.bias", False),
]


def gpt2_renames(args: ModelArgs):
    """(our name, HF name, transposed) for every GPT-2 tensor but q/k/v (fused in c_attn) and lm_head."""
    yield from ((ours, f"transformer.{hf}", t) for ours, hf, t in _GPT2_RENAMES)
    for i in range(args.num_layers):
        yield from ((f"layers.{i}.{ours}", f"transformer.h.{i}.{hf}", t) for ours, hf, t in _GPT2_LAYER_RENAMES)


def _gpt2_to_hf(state: StateDict, args: ModelArgs) -> StateDict:
    import torch

    out = {hf: (state[ours].t() if transposed else state[ours]) for ours, hf, transposed in gpt2_renames(args)}
    for i in range(args.num_layers):
        attn = f"layers.{i}.self_attn"
        q, k, v = (state[f"{attn}.{p}_proj.weight"] for p in "qkv")
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat((q, k, v), dim=0).t()  # (D, 3D)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([state[f"{attn}.{p}_proj.bias"] for p in "qkv"])
    if not args.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def _gpt2_from_hf(state: StateDict, args: ModelArgs) -> StateDict:
    if not any(key.startswith("transformer.") for key in state):  # a bare GPT2Model checkpoint
        state = {f"transformer.{key}": value for key, value in state.items()}
    out = {ours: (state[hf].t() if transposed else state[hf])
           for ours, hf, transposed in gpt2_renames(args) if hf in state}
    widths = [args.num_heads * args.head_dim] + 2 * [args.num_kv_heads * args.head_dim]
    for i in range(args.num_layers):
        for suffix in ("weight", "bias"):
            fused = state.get(f"transformer.h.{i}.attn.c_attn.{suffix}")
            if fused is None:
                continue
            parts = (fused.t() if suffix == "weight" else fused).split(widths, dim=0)
            for p, part in zip("qkv", parts):
                out[f"layers.{i}.self_attn.{p}_proj.{suffix}"] = part
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def to_hf_state_dict(state: StateDict, args: ModelArgs) -> StateDict:
    """Our state dict -> HF names and layouts (tied lm_head left out, as HF saves it)."""
    return family_spec(args.family).load("to_hf")(state, args)


def from_hf_state_dict(state: StateDict, args: ModelArgs) -> StateDict:
    """HF state dict (already checked with check_hf_keys) -> our names and layouts."""
    return family_spec(args.family).load("from_hf")(state, args)


def check_hf_keys(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  args: ModelArgs) -> list[str]:
    """Every problem at once: missing, unexpected and wrongly shaped keys (HF names)."""
    spec = family_spec(args.family)
    found = {k: v for k, v in found.items() if not IGNORED_HF_KEYS.search(k)}
    prefix = spec.hf_optional_prefix
    if prefix and not any(k.startswith(prefix) for k in found):
        found = {(k if k == "lm_head.weight" else f"{prefix}{k}"): v for k, v in found.items()}
    if args.tie_embeddings:
        found.pop("lm_head.weight", None)  # HF sometimes saves the tied copy too
    if spec.hf_grouped_experts:  # grouped experts on disk: compare in the per-expert form
        found = split_grouped_experts({k: tuple(v) for k, v in found.items()})
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        problems.append("wrong shapes: " + ", ".join(
            f"{k} {tuple(found[k])} (expected {tuple(expected[k])})" for k in wrong))
    return problems
