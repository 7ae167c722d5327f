"""Data pipeline: Megatron .bin/.idx files, preprocessing, packed GPT and blended datasets.

Nothing here imports torch but collate.py (to_batch: samples to tensors, for the jobs); names are
loaded on first use (PEP 562) so that `from train.data import load_blend` stays cheap for the
launcher. job_datasets.py builds a job's train and valid datasets from its config.
"""

import importlib

_EXPORTS = {
    "DataError": "train.data.errors",
    "IndexedDataset": "train.data.indexed",
    "check_vocab": "train.data.indexed",
    "count_tokens": "train.data.indexed",
    "token_dtype_for_vocab": "train.data.indexed",
    "IndexedDatasetWriter": "train.data.indexed_writer",
    "Blend": "train.data.blend",
    "load_blend": "train.data.blend",
    "parse_blend": "train.data.blend",
    "train_samples_for_blend": "train.data.blend",
    "GPTDataset": "train.data.gpt_dataset",
    "BlendedDataset": "train.data.blended_dataset",
    "build_blending_indices": "train.data.blended_dataset",
    "build_datasets": "train.data.build",
    "MicroBatchSampler": "train.data.sampler",
    "parse_iterations_to_skip": "train.data.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
