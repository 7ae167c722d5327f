"""Tiny HF models and tokenizers built locally (nothing downloaded); import from tests, not run.

    from tests.unit.hf_fixtures import save_tiny_hf_model, save_tiny_tokenizer
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 256
_SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a language model predicts the next token",
    "distillation teaches a small student with a large teacher",
    "quantization keeps four bits per weight",
]


def save_tiny_tokenizer(directory: str | Path, vocab_size: int = TINY_VOCAB) -> Path:
    """Train a byte-level BPE on a few sentences; AutoTokenizer.from_pretrained(directory) loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_SENTENCES * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(directory)
    return Path(directory)


def tiny_hf_config(kind: str, **overrides):
    """transformers config for kind in qwen3, qwen3-tied, qwen3-moe, qwen3-next, llama2, llama3, gpt2
    (2 layers, GQA 4:2; qwen3-moe: 4 experts top-2 in layer 0, layer 1 dense; qwen3-next: a Gated
    DeltaNet and a gated attention layer, 4 experts top-2 and a shared expert in both)."""
    from transformers import GPT2Config, LlamaConfig, Qwen3Config, Qwen3MoeConfig, Qwen3NextConfig

    if kind == "gpt2":
        base = dict(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=160,
                    bos_token_id=0, eos_token_id=0)
        return GPT2Config(**{**base, **overrides})
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128)
    if kind in ("qwen3", "qwen3-tied"):
        # head_dim 32 != 64 / 4: Qwen3 decouples head_dim from hidden_size / heads.
        base = dict(common, head_dim=32, rope_theta=1e6, tie_word_embeddings=kind == "qwen3-tied")
        return Qwen3Config(**{**base, **overrides})
    if kind == "qwen3-moe":
        base = dict(common, head_dim=32, rope_theta=1e6, moe_intermediate_size=48, num_experts=4,
                    num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])
        return Qwen3MoeConfig(**{**base, **overrides})
    if kind == "qwen3-next":
        base = dict(common, head_dim=32, layer_types=["linear_attention", "full_attention"],
                    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25),
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=24, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=48, shared_expert_intermediate_size=48)
        return Qwen3NextConfig(**{**base, **overrides})
    if kind == "llama2":
        return LlamaConfig(**{**common, "rope_theta": 10_000.0, "rms_norm_eps": 1e-5, **overrides})
    if kind == "llama3":
        # original_max_position_embeddings small so the scaled frequency bands matter at T=32.
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
        return LlamaConfig(**{**common, "rope_theta": 500_000.0, "rope_scaling": scaling, **overrides})
    raise ValueError(f"unknown tiny HF model kind {kind!r}")


def build_tiny_hf_model(kind: str, seed: int = 0, **overrides):
    """A random transformers *ForCausalLM (fp32, eval mode) for `kind`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(kind, **overrides))
    with torch.no_grad():  # randomize norms too, so a swapped norm weight cannot go unnoticed
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def save_tiny_hf_model(directory: str | Path, kind: str, seed: int = 0, **overrides):
    """save_pretrained a random tiny model into directory; returns the transformers model."""
    model = build_tiny_hf_model(kind, seed, **overrides)
    model.save_pretrained(directory)
    return model
