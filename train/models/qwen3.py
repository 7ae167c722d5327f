"""Qwen3 (dense): the LLaMA architecture plus per-head q/k RMSNorm before RoPE.

Differences from llama.py are all data (ModelArgs): RoPE theta 1e6, head_dim independent of
hidden_size / num_heads (Qwen3-0.6B: 16 heads x 128 = 2048 != hidden 1024), optional tied
embeddings, rms eps 1e-6. Module names equal HF Qwen3ForCausalLM's without 'model.'.
"""

from train.models.family import family_spec
from train.models.llama import Llama

SPEC = family_spec("qwen3")  # what registry, HF conversion, export and checks know (family.py)


class Qwen3(Llama):
    qk_norm = True
