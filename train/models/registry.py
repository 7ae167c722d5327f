"""Named model sizes as data, plus parameter and FLOP accounting.

Importing this module must stay cheap: no torch, no transformers (the launcher validates
configs with it in milliseconds). `python -m train.models list` prints the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from train.models.errors import ModelConfigError, UnknownModelError
from train.models.family import FAMILIES, SPECS, family_spec

MOE_FAMILIES = tuple(name for name, spec in SPECS.items() if spec.experts == "always")  # always sparse
LAYER_TYPES = ("linear_attention", "full_attention")  # qwen3_next token mixers (HF names)


@dataclass(frozen=True)
class ModelArgs:
    """Shape of one decoder-only model. Frozen: derive variants with dataclasses.replace."""

    name: str
    family: str  # one of FAMILIES: 'gpt2' | 'llama' | 'qwen3' | 'qwen3_moe' | 'qwen3_next'
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # == num_heads: multi-head attention; fewer: grouped-query (GQA)
    head_dim: int  # explicit: Qwen3 decouples it from hidden_size / num_heads
    intermediate_size: int  # MLP width (SwiGLU: width of gate and up projections)
    max_seq_len: int  # GPT-2: learned position table size; RoPE: cache length
    rope_theta: float = 10_000.0  # LLaMA 2: 1e4, LLaMA 3: 5e5, Qwen3: 1e6; unused by GPT-2
    # HF-style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0,
    # "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)  # dicts are unhashable
    tie_embeddings: bool = False  # lm_head shares the token embedding matrix
    norm_eps: float = 1e-5
    init_std: float = 0.02  # std of the normal init (HF initializer_range)
    num_experts: int = 0  # 0 = dense; MoE families set experts and experts per token
    num_experts_per_token: int = 0
    # -- Qwen3-MoE (HF Qwen3MoeConfig names); ignored by dense families -----------------------
    moe_intermediate_size: int = 0  # width of one routed expert's gate/up projections
    norm_topk_prob: bool = True  # renormalize the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss added to the LM loss
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (those get a dense MLP)

    def is_moe_layer(self, layer_index: int) -> bool:
        """HF Qwen3MoeDecoderLayer's rule for a sparse (MoE) MLP at layer_index."""
        return (self.num_experts > 0 and layer_index not in self.mlp_only_layers
                and (layer_index + 1) % self.decoder_sparse_step == 0)

    # -- qwen3_next (hybrid Gated DeltaNet + gated full attention); ignored by other families --
    # (its MoE layers, when num_experts > 0, use the Qwen3-MoE fields above plus a shared expert)
    # Per-layer mixer: an explicit tuple of LAYER_TYPES, or None for the interval rule
    # (layer i is full attention when (i + 1) % full_attention_interval == 0: three linear, one full).
    layer_types: tuple[str, ...] | None = None
    full_attention_interval: int = 4
    linear_num_key_heads: int = 0  # Gated DeltaNet q/k heads
    linear_num_value_heads: int = 0  # v heads; a multiple of the key heads (each k head serves several)
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 4  # depthwise causal conv over q, k, v before the delta rule
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * factor channels (Next: 0.25)
    shared_expert_intermediate_size: int = 0  # MoE layers: 0 no shared expert; else a SwiGLU behind a sigmoid gate

    def resolved_layer_types(self) -> list[str]:
        """Hybrid families (qwen3_next): the mixer of each layer; every other family: all full attention."""
        spec = SPECS.get(self.family)  # None before validate() rejects an unknown family
        if spec is None or not spec.hybrid:
            return ["full_attention"] * self.num_layers
        if self.layer_types is not None:
            return list(self.layer_types)
        return ["full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(self.num_layers)]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self) -> "ModelArgs":
        """Raise ModelConfigError naming the offending field; return self when valid."""
        where = f"model {self.name!r}"
        if self.family not in FAMILIES:
            raise ModelConfigError(f"{where}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        spec = family_spec(self.family)
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "intermediate_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ModelConfigError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"{where}: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if spec.head_dim_from_hidden:
            # These families derive head_dim = hidden_size / num_heads (HF GPT-2 and LLaMA).
            if self.hidden_size % self.num_heads:
                raise ModelConfigError(
                    f"{where}: num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
            if self.head_dim != self.hidden_size // self.num_heads:
                raise ModelConfigError(
                    f"{where}: head_dim={self.head_dim} must equal hidden_size/num_heads="
                    f"{self.hidden_size // self.num_heads} for family {self.family!r}")
        if not spec.gqa and self.num_kv_heads != self.num_heads:
            raise ModelConfigError(f"{where}: family {self.family!r} has no GQA; num_kv_heads must equal num_heads")
        if spec.rope and self.head_dim % 2:
            raise ModelConfigError(f"{where}: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("default", "llama3"):
            raise ModelConfigError(
                f"{where}: rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported "
                "(supported: 'default', 'llama3')")
        if spec.hybrid:
            self._validate_qwen3_next(where)
        if spec.experts == "always" or (spec.experts == "optional" and self.num_experts):
            self._validate_moe(where)
        elif self.num_experts:
            raise ModelConfigError(f"{where}: family {self.family!r} is dense; num_experts must be 0")
        return self

    def _validate_qwen3_next(self, where: str) -> None:
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ModelConfigError(f"{where}: layer_types has {len(self.layer_types)} entries, "
                                       f"num_layers is {self.num_layers}")
            bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
            if bad:
                raise ModelConfigError(f"{where}: layer_types entries {bad} are not one of {', '.join(LAYER_TYPES)}")
        elif self.full_attention_interval <= 0:
            raise ModelConfigError(f"{where}: full_attention_interval must be positive, "
                                   f"got {self.full_attention_interval}")
        if "linear_attention" in self.resolved_layer_types():
            for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                        "linear_value_head_dim", "linear_conv_kernel"):
                if getattr(self, key) <= 0:
                    raise ModelConfigError(f"{where}: {key} must be positive for Gated DeltaNet layers, "
                                           f"got {getattr(self, key)}")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ModelConfigError(f"{where}: linear_num_key_heads={self.linear_num_key_heads} must divide "
                                       f"linear_num_value_heads={self.linear_num_value_heads}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ModelConfigError(f"{where}: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ModelConfigError(f"{where}: RoPE needs an even rotary_dim = head_dim * partial_rotary_factor, "
                                   f"got {self.head_dim} * {self.partial_rotary_factor}")
        if self.num_experts and self.shared_expert_intermediate_size <= 0:
            raise ModelConfigError(f"{where}: qwen3_next MoE layers always have a shared expert (HF "
                                   "Qwen3NextSparseMoeBlock); shared_expert_intermediate_size must be positive")

    def _validate_moe(self, where: str) -> None:
        if self.num_experts <= 0:
            raise ModelConfigError(f"{where}: family {self.family!r} needs num_experts > 0, got {self.num_experts}")
        if not 0 < self.num_experts_per_token <= self.num_experts:
            raise ModelConfigError(f"{where}: num_experts_per_token={self.num_experts_per_token} must be in "
                                   f"1..num_experts={self.num_experts}")
        if self.moe_intermediate_size <= 0:
            raise ModelConfigError(f"{where}: moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if self.decoder_sparse_step <= 0:
            raise ModelConfigError(f"{where}: decoder_sparse_step must be positive, got {self.decoder_sparse_step}")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if outside:
            raise ModelConfigError(f"{where}: mlp_only_layers {outside} are outside 0..{self.num_layers - 1}")
        if self.router_aux_loss_coef < 0:
            raise ModelConfigError(f"{where}: router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")


_LLAMA2 = dict(family="llama", rope_theta=10_000.0, norm_eps=1e-5)
_LLAMA3 = dict(family="llama", rope_theta=500_000.0, norm_eps=1e-5)
_QWEN3 = dict(family="qwen3", rope_theta=1_000_000.0, norm_eps=1e-6)
_GPT2 = dict(family="gpt2", tie_embeddings=True, norm_eps=1e-5)
_QWEN3_MOE = dict(family="qwen3_moe", rope_theta=1_000_000.0, norm_eps=1e-6)

# CPU test sizes: tiny-* a few MB (4 layers, GQA 4:2), debug-* the smallest that still
# exercises every block (2 layers, hidden 64, vocab 512).
_TINY = dict(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
             intermediate_size=384, max_seq_len=512)
_DEBUG = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
              intermediate_size=192, max_seq_len=256)


def _small(name: str, family: dict, shape: dict, **overrides) -> ModelArgs:
    return ModelArgs(name=name, **{**family, **shape, **overrides})


_MODELS = [
    # The users' pretraining scripts' sizes (their enhanced_training_system), trained from scratch at 2048 tokens.
    # GPT-2 "1.36B" is the same 18L-18H-2304D trunk as llama2-1.36b with a 4x GELU MLP and the
    # GPT-2 vocabulary padded to 50304; its real size is ~1.27B (the name is the family's budget).
    ModelArgs(name="gpt2-1.36b", vocab_size=50304, hidden_size=2304, num_layers=18, num_heads=18,
              num_kv_heads=18, head_dim=128, intermediate_size=9216, max_seq_len=2048, **_GPT2),
    # 18L-18H-2304D-6144ff, vocab 32000; 1.294B parameters (name from the 1.36e21 FLOP budget).
    ModelArgs(name="llama2-1.36b", vocab_size=32000, hidden_size=2304, num_layers=18, num_heads=18,
              num_kv_heads=18, head_dim=128, intermediate_size=6144, max_seq_len=2048, **_LLAMA2),
    # 18L-16H-2048D-7168ff, GQA 8 KV, vocab 128256 (LLaMA 3.1 tokenizer); the scripts state ~1.545B.
    # No llama3 rope_scaling: trained from scratch at 2048, scaling only matters past 8192.
    ModelArgs(name="llama3-1.5b", vocab_size=128256, hidden_size=2048, num_layers=18, num_heads=16,
              num_kv_heads=8, head_dim=128, intermediate_size=7168, max_seq_len=2048, **_LLAMA3),
    # 30L-16H-2048D-7168ff, GQA 8 KV (Chinchilla D=20N variant); the scripts state ~2.224B.
    ModelArgs(name="llama3-2.2b", vocab_size=128256, hidden_size=2048, num_layers=30, num_heads=16,
              num_kv_heads=8, head_dim=128, intermediate_size=7168, max_seq_len=2048, **_LLAMA3),
    # 24L-16H-2048D-6144ff, GQA 8 KV, theta 1e6, vocab 151643, untied; the scripts state ~1.830B.
    ModelArgs(name="qwen3-1.8b", vocab_size=151643, hidden_size=2048, num_layers=24, num_heads=16,
              num_kv_heads=8, head_dim=128, intermediate_size=6144, max_seq_len=2048, **_QWEN3),
    # https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
    ModelArgs(name="qwen3-0.6b", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
              num_kv_heads=8, head_dim=128, intermediate_size=3072, max_seq_len=40960,
              tie_embeddings=True, **_QWEN3),
    # https://huggingface.co/Qwen/Qwen3-1.7B/blob/main/config.json
    ModelArgs(name="qwen3-1.7b", vocab_size=151936, hidden_size=2048, num_layers=28, num_heads=16,
              num_kv_heads=8, head_dim=128, intermediate_size=6144, max_seq_len=40960,
              tie_embeddings=True, **_QWEN3),
    # https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
    ModelArgs(name="qwen3-8b", vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32,
              num_kv_heads=8, head_dim=128, intermediate_size=12288, max_seq_len=40960,
              tie_embeddings=False, **_QWEN3),
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json: 128 experts, top-8, every
    # layer sparse (intermediate_size 6144 only matters for mlp_only_layers, none here).
    ModelArgs(name="qwen3-30b-a3b", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32,
              num_kv_heads=4, head_dim=128, intermediate_size=6144, max_seq_len=40960,
              tie_embeddings=False, num_experts=128, num_experts_per_token=8,
              moe_intermediate_size=768, norm_topk_prob=True, router_aux_loss_coef=0.001, **_QWEN3_MOE),
]
_MODELS += [model for size, shape in (("tiny", _TINY), ("debug", _DEBUG)) for model in (
    _small(f"{size}-qwen3", _QWEN3, shape, tie_embeddings=True),
    _small(f"{size}-llama2", _LLAMA2, shape),
    _small(f"{size}-llama3", _LLAMA3, shape),
    _small(f"{size}-gpt2", _GPT2, shape, num_kv_heads=shape["num_heads"]),
    # 8 experts, top-2, expert width hidden/2; layer 0 dense (mlp_only_layers) so both MLP kinds run.
    _small(f"{size}-qwen3-moe", _QWEN3_MOE, shape, num_experts=8, num_experts_per_token=2,
           moe_intermediate_size=shape["hidden_size"] // 2, mlp_only_layers=(0,),
           router_aux_loss_coef=0.01),
)]

# small-qwen3 (11.1M parameters, 4096-token vocabulary, tied): benchmarks/qad_recovery --model small-qwen3.
# After 1.2M tokens (34 min on a shared 2-core machine) NVFP4 PTQ cost it only 0.003 nats: too early in
# training to measure recovery (docs/qad.md); tiny-qwen3 after 3.1M tokens loses 0.024.
_MODELS.append(ModelArgs(name="small-qwen3", vocab_size=4096, hidden_size=320, num_layers=8, num_heads=4,
                         num_kv_heads=2, head_dim=80, intermediate_size=960, max_seq_len=512,
                         tie_embeddings=True, **_QWEN3))

# Qwen3-Next (the users' Qwen3-Next pretraining setup): hybrid layers, head_dim 128, 2 KV heads, partial RoPE 0.25, theta 1e7 and
# Gated DeltaNet q/k/v heads of 128 as in Qwen3-Next-80B-A3B's config.json; Qwen2 vocabulary, tied.
# That setup gives trunks (layers, hidden, heads) and "3B total, ~1B active" but no MoE shapes: every
# size uses routed experts of width 256, top-4, plus a 512-wide shared expert (active MLP width
# 4 * 256 + 512 = 1536 per token), and the expert count sets the total: 48 -> 1.95B, 56 -> 2.96B
# (0.99B active), 64 -> 5.19B. `python -m train.models info qwen3-next-3b` prints the counts.
_FULL, _LINEAR = "full_attention", "linear_attention"
_QWEN3_NEXT = dict(family="qwen3_next", rope_theta=10_000_000.0, norm_eps=1e-6, vocab_size=151936,
                   num_kv_heads=2, head_dim=128, max_seq_len=4096, tie_embeddings=True,
                   partial_rotary_factor=0.25, linear_key_head_dim=128, linear_value_head_dim=128,
                   num_experts_per_token=4, moe_intermediate_size=256, shared_expert_intermediate_size=512,
                   intermediate_size=1536)  # dense-equivalent width (the active MLP), unused by MoE layers
# The setup's layer_types list for 3B. Its text says "6 full + 18 linear"; the list has 7 full
# (layers 0 3 6 11 14 19 22) and 17 linear. The list is what we build.
_QWEN3_NEXT_3B_LAYERS = (_FULL, _LINEAR, _LINEAR, _FULL, _LINEAR, _LINEAR, _FULL, _LINEAR,
                         _LINEAR, _LINEAR, _LINEAR, _FULL, _LINEAR, _LINEAR, _FULL, _LINEAR,
                         _LINEAR, _LINEAR, _LINEAR, _FULL, _LINEAR, _LINEAR, _FULL, _LINEAR)
_MODELS += [
    ModelArgs(name="qwen3-next-2b", hidden_size=1800, num_layers=20, num_heads=14, num_experts=48,
              linear_num_key_heads=14, linear_num_value_heads=14, **_QWEN3_NEXT),  # interval 4: 5 full
    ModelArgs(name="qwen3-next-3b", hidden_size=2048, num_layers=24, num_heads=16, num_experts=56,
              linear_num_key_heads=16, linear_num_value_heads=16, layer_types=_QWEN3_NEXT_3B_LAYERS,
              **_QWEN3_NEXT),
    ModelArgs(name="qwen3-next-5b", hidden_size=2560, num_layers=30, num_heads=20, num_experts=64,
              linear_num_key_heads=20, linear_num_value_heads=20, **_QWEN3_NEXT),  # interval 4: 7 full
]
# CPU twins: tiny 3 linear + 1 full, debug 1 + 1; layer 0 dense, the others MoE (8 experts, top-2,
# width hidden/2, shared expert of width hidden) so every block kind runs.
_NEXT_SMALL = dict(family="qwen3_next", rope_theta=10_000_000.0, norm_eps=1e-6, partial_rotary_factor=0.25,
                   tie_embeddings=True, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8,
                   num_experts_per_token=2, mlp_only_layers=(0,), router_aux_loss_coef=0.01)
_MODELS += [
    _small("tiny-qwen3-next", _NEXT_SMALL, _TINY, linear_key_head_dim=32, linear_value_head_dim=32,
           moe_intermediate_size=64, shared_expert_intermediate_size=128),
    _small("debug-qwen3-next", _NEXT_SMALL, _DEBUG, linear_key_head_dim=16, linear_value_head_dim=16,
           moe_intermediate_size=32, shared_expert_intermediate_size=64, layer_types=(_LINEAR, _FULL)),
]
REGISTRY: dict[str, ModelArgs] = {args.name: args.validate() for args in _MODELS}


def list_models() -> list[str]:
    return list(REGISTRY)


def get_model_args(name: str) -> ModelArgs:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


def args_for_display_name(name: str) -> ModelArgs | None:
    """The entry for a model's display name or its longest known dash-prefix, lowercased
    ('Qwen3-30B-A3B-Thinking-2507' -> qwen3-30b-a3b), so confs' names find their shapes; else None."""
    parts = name.lower().split("-")
    for candidate in [name] + ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]:
        if candidate in REGISTRY:
            return REGISTRY[candidate]
    return None


def count_parameters(args: ModelArgs) -> dict[str, int]:
    """Exact parameter counts of the model build_model(args) creates.

    non_embedding follows the Qwen3/Kaplan convention: total minus the token embedding,
    the lm_head (tied or not) and learned position embeddings. active == total for dense.
    """
    spec = family_spec(args.family)
    if spec.hybrid:
        return _count_qwen3_next(args)
    D, F, V = args.hidden_size, args.intermediate_size, args.vocab_size
    q_width, kv_width = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    if spec.bias:
        # LayerNorms with bias, biased q/k/v/o and MLP (HF GPT-2 Conv1D layers), learned positions.
        attention = D * (q_width + 2 * kv_width) + (q_width + 2 * kv_width) + q_width * D + D
        mlp = D * F + F + F * D + D
        per_layer = attention + mlp + 2 * (2 * D)
        final_norm, positions = 2 * D, args.max_seq_len * D
    else:
        attention = D * (q_width + 2 * kv_width) + q_width * D
        if spec.qk_norm:
            attention += 2 * args.head_dim  # per-head q_norm and k_norm weights
        mlp = 3 * D * F  # SwiGLU: gate, up, down
        per_layer = attention + mlp + 2 * D
        final_norm, positions = D, 0
    embedding = V * D
    lm_head = 0 if args.tie_embeddings else V * D
    layers = args.num_layers * per_layer
    inactive = 0  # expert weights a token does not use
    if spec.experts == "always":
        # A sparse layer swaps the dense MLP for a router (E, D) and E SwiGLU experts of width
        # moe_intermediate_size, of which num_experts_per_token run per token.
        expert = 3 * D * args.moe_intermediate_size
        sparse = sum(args.is_moe_layer(i) for i in range(args.num_layers))
        layers += sparse * (args.num_experts * D + args.num_experts * expert - mlp)
        inactive = sparse * (args.num_experts - args.num_experts_per_token) * expert
    total = embedding + positions + layers + final_norm + lm_head
    non_embedding = total - embedding - positions - lm_head
    return dict(total=total, non_embedding=non_embedding, active=total - inactive)


def _count_qwen3_next(args: ModelArgs) -> dict[str, int]:
    """Per layer: two zero-centred norms, a Gated DeltaNet or a gated attention, an MLP or MoE."""
    D, V = args.hidden_size, args.vocab_size
    key_dim = args.linear_num_key_heads * args.linear_key_head_dim
    value_dim = args.linear_num_value_heads * args.linear_value_head_dim
    linear_mixer = (D * (2 * key_dim + 2 * value_dim)  # in_proj_qkvz
                    + D * 2 * args.linear_num_value_heads  # in_proj_ba
                    + (2 * key_dim + value_dim) * args.linear_conv_kernel  # depthwise conv1d
                    + 2 * args.linear_num_value_heads  # dt_bias, A_log
                    + args.linear_value_head_dim  # gated norm
                    + value_dim * D)  # out_proj
    q_width, kv_width = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    full_mixer = D * 2 * q_width + 2 * D * kv_width + q_width * D + 2 * args.head_dim  # q_proj is query+gate
    expert = 3 * D * args.moe_intermediate_size
    shared = 3 * D * args.shared_expert_intermediate_size + D if args.shared_expert_intermediate_size else 0
    sparse_mlp = D * args.num_experts + args.num_experts * expert + shared  # router, experts, shared + gate
    sparse = sum(args.is_moe_layer(i) for i in range(args.num_layers))
    mlps = sparse * sparse_mlp + (args.num_layers - sparse) * 3 * D * args.intermediate_size
    inactive = sparse * (args.num_experts - args.num_experts_per_token) * expert  # idle experts per token
    mixers = sum(linear_mixer if kind == "linear_attention" else full_mixer for kind in args.resolved_layer_types())
    embedding, lm_head = V * D, (0 if args.tie_embeddings else V * D)
    total = embedding + lm_head + mixers + mlps + args.num_layers * 2 * D + D  # + block norms, final norm
    return dict(total=total, non_embedding=total - embedding - lm_head, active=total - inactive)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) used for MFU.

    PaLM (Chowdhery et al. 2022, appendix B): 6 * N + 12 * L * H * Q * T, where
    N = non-embedding parameters + the lm_head matmul (V * D, counted even when tied since it
    is computed), L layers, H query heads, Q head_dim, T = seq_len. The attention term counts
    QK^T and attention*V in full (no causal halving), as PaLM does. Embedding lookups are free.
    """
    counts = count_parameters(args)
    matmul_params = counts["non_embedding"] + args.vocab_size * args.hidden_size
    if args.num_experts:  # MoE: only the active share of the experts is computed per token
        matmul_params -= counts["total"] - counts["active"]
    full_layers = args.resolved_layer_types().count("full_attention")
    attention = 12 * full_layers * args.num_heads * args.head_dim * seq_len
    if family_spec(args.family).hybrid:
        # Gated DeltaNet: per token and value head, read S^T k, write k u^T, read S^T q on a
        # (dk, dv) state: 3 * 2 * dk * dv forward, x3 for forward + backward; no seq_len term.
        linear_layers = args.num_layers - full_layers
        attention += 18 * linear_layers * args.linear_num_value_heads * args.linear_key_head_dim \
            * args.linear_value_head_dim
    return float(6 * matmul_params + attention)


def describe(args: ModelArgs, seq_len: int | None = None) -> dict[str, Any]:
    """Everything `python -m train.models info` prints, as JSON-ready data."""
    seq_len = seq_len or args.max_seq_len
    info = dataclasses.asdict(args)
    info.update(parameters=count_parameters(args), seq_len=seq_len,
                flops_per_token=flops_per_token(args, seq_len))
    return info
