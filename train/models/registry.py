"""Named model sizes as data, plus parameter and FLOP accounting.

Importing this module must stay cheap: no torch, no transformers (the launcher validates
configs with it in milliseconds). `python -m train.models list` prints the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from train.models.errors import ModelConfigError, UnknownModelError

FAMILIES = ("gpt2", "llama", "qwen3", "qwen3_moe")
MOE_FAMILIES = ("qwen3_moe",)


@dataclass(frozen=True)
class ModelArgs:
    """Shape of one decoder-only model. Frozen: derive variants with dataclasses.replace."""

    name: str
    family: str  # 'gpt2' | 'llama' | 'qwen3' | 'qwen3_moe'
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

    def validate(self) -> "ModelArgs":
        """Raise ModelConfigError naming the offending field; return self when valid."""
        where = f"model {self.name!r}"
        if self.family not in FAMILIES:
            raise ModelConfigError(f"{where}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "intermediate_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ModelConfigError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"{where}: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.family in ("gpt2", "llama"):
            # These families derive head_dim = hidden_size / num_heads (HF GPT-2 and LLaMA).
            if self.hidden_size % self.num_heads:
                raise ModelConfigError(
                    f"{where}: num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
            if self.head_dim != self.hidden_size // self.num_heads:
                raise ModelConfigError(
                    f"{where}: head_dim={self.head_dim} must equal hidden_size/num_heads="
                    f"{self.hidden_size // self.num_heads} for family {self.family!r}")
        if self.family == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ModelConfigError(f"{where}: GPT-2 has no GQA; num_kv_heads must equal num_heads")
        if self.family != "gpt2" and self.head_dim % 2:
            raise ModelConfigError(f"{where}: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("default", "llama3"):
            raise ModelConfigError(
                f"{where}: rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported "
                "(supported: 'default', 'llama3')")
        if self.family in MOE_FAMILIES:
            self._validate_moe(where)
        elif self.num_experts:
            raise ModelConfigError(f"{where}: family {self.family!r} is dense; num_experts must be 0")
        return self

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
    # Seed 003 (enhanced_training_system) sizes, trained from scratch at 2048 tokens.
    # GPT-2 "1.36B" is the same 18L-18H-2304D trunk as llama2-1.36b with a 4x GELU MLP and the
    # GPT-2 vocabulary padded to 50304; its real size is ~1.27B (the name is the family's budget).
    ModelArgs(name="gpt2-1.36b", vocab_size=50304, hidden_size=2304, num_layers=18, num_heads=18,
              num_kv_heads=18, head_dim=128, intermediate_size=9216, max_seq_len=2048, **_GPT2),
    # 18L-18H-2304D-6144ff, vocab 32000; 1.294B parameters (name from the 1.36e21 FLOP budget).
    ModelArgs(name="llama2-1.36b", vocab_size=32000, hidden_size=2304, num_layers=18, num_heads=18,
              num_kv_heads=18, head_dim=128, intermediate_size=6144, max_seq_len=2048, **_LLAMA2),
    # 18L-16H-2048D-7168ff, GQA 8 KV, vocab 128256 (LLaMA 3.1 tokenizer); seed: ~1.545B.
    # No llama3 rope_scaling: trained from scratch at 2048, scaling only matters past 8192.
    ModelArgs(name="llama3-1.5b", vocab_size=128256, hidden_size=2048, num_layers=18, num_heads=16,
              num_kv_heads=8, head_dim=128, intermediate_size=7168, max_seq_len=2048, **_LLAMA3),
    # 30L-16H-2048D-7168ff, GQA 8 KV (Chinchilla D=20N variant); seed: ~2.224B.
    ModelArgs(name="llama3-2.2b", vocab_size=128256, hidden_size=2048, num_layers=30, num_heads=16,
              num_kv_heads=8, head_dim=128, intermediate_size=7168, max_seq_len=2048, **_LLAMA3),
    # 24L-16H-2048D-6144ff, GQA 8 KV, theta 1e6, vocab 151643, untied; seed: ~1.830B.
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
REGISTRY: dict[str, ModelArgs] = {args.name: args.validate() for args in _MODELS}


def list_models() -> list[str]:
    return list(REGISTRY)


def get_model_args(name: str) -> ModelArgs:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


def count_parameters(args: ModelArgs) -> dict[str, int]:
    """Exact parameter counts of the model build_model(args) creates.

    non_embedding follows the Qwen3/Kaplan convention: total minus the token embedding,
    the lm_head (tied or not) and learned position embeddings. active == total for dense.
    """
    D, F, V = args.hidden_size, args.intermediate_size, args.vocab_size
    q_width, kv_width = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    if args.family == "gpt2":
        # LayerNorms with bias, biased q/k/v/o and MLP (HF GPT-2 Conv1D layers).
        attention = D * (q_width + 2 * kv_width) + (q_width + 2 * kv_width) + q_width * D + D
        mlp = D * F + F + F * D + D
        per_layer = attention + mlp + 2 * (2 * D)
        final_norm, positions = 2 * D, args.max_seq_len * D
    else:
        attention = D * (q_width + 2 * kv_width) + q_width * D
        if args.family in ("qwen3", "qwen3_moe"):
            attention += 2 * args.head_dim  # per-head q_norm and k_norm weights
        mlp = 3 * D * F  # SwiGLU: gate, up, down
        per_layer = attention + mlp + 2 * D
        final_norm, positions = D, 0
    embedding = V * D
    lm_head = 0 if args.tie_embeddings else V * D
    layers = args.num_layers * per_layer
    inactive = 0  # expert weights a token does not use
    if args.family in MOE_FAMILIES:
        # A sparse layer swaps the dense MLP for a router (E, D) and E SwiGLU experts of width
        # moe_intermediate_size, of which num_experts_per_token run per token.
        expert = 3 * D * args.moe_intermediate_size
        sparse = sum(args.is_moe_layer(i) for i in range(args.num_layers))
        layers += sparse * (args.num_experts * D + args.num_experts * expert - mlp)
        inactive = sparse * (args.num_experts - args.num_experts_per_token) * expert
    total = embedding + positions + layers + final_norm + lm_head
    non_embedding = total - embedding - positions - lm_head
    return dict(total=total, non_embedding=non_embedding, active=total - inactive)


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
    attention = 12 * args.num_layers * args.num_heads * args.head_dim * seq_len
    return float(6 * matmul_params + attention)


def describe(args: ModelArgs, seq_len: int | None = None) -> dict[str, Any]:
    """Everything `python -m train.models info` prints, as JSON-ready data."""
    seq_len = seq_len or args.max_seq_len
    info = dataclasses.asdict(args)
    info.update(parameters=count_parameters(args), seq_len=seq_len,
                flops_per_token=flops_per_token(args, seq_len))
    return info
