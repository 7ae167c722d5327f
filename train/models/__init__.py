"""Model zoo: GPT-2, LLaMA 2/3 and Qwen3 for one device, HF checkpoints in and out.

`import train.models` and `train.models.registry` stay torch-free; the torch-backed functions
below are imported on first use (module __getattr__), so the launcher validates names fast.
"""

from __future__ import annotations

import importlib

from train.models.errors import CheckpointError, ModelConfigError, UnknownModelError
from train.models.registry import (ModelArgs, count_parameters, flops_per_token, get_model_args,
                                   list_models)

_LAZY = {
    "build_model": "train.models.build",
    "init_weights": "train.models.build",
    "load_hf": "train.models.hf_io",
    "save_hf": "train.models.hf_io",
    "stored_dtype": "train.models.hf_io",
    "hf_args": "train.models.hf_io",
    "load_hf_sharded": "train.parallel.sharded_load",
    "CausalLM": "train.models.common.transformer",
}

__all__ = ["CheckpointError", "ModelArgs", "ModelConfigError", "UnknownModelError",
           "count_parameters", "flops_per_token", "get_model_args", "list_models", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'train.models' has no attribute {name!r}")
