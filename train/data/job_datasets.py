"""The datasets of a training job: seeded synthetic sequences (data.source=synthetic), or the
packed datablend's train split for the loop and its valid split for in-loop validation.

    python -m pytest tests/unit/test_data_datasets.py

Built from a job's config and plan (train.engine.run_job, train/validation.py); the datasets
themselves are train/data/build.py's.
"""

import numpy as np

from train.config import JobConfig
from train.launch.job import JobContext


class SyntheticSequences:
    """Arithmetic token sequences (start + stride * t) mod vocab, seeded per sample index.

    Learnable (the stride is visible in context), so loss falls; needs no files."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        start, stride = rng.integers(0, self.vocab_size), rng.integers(1, 8)
        tokens = (start + stride * np.arange(self.seq_length + 1)) % self.vocab_size
        return {"tokens": tokens.astype(np.int64), "loss_mask": np.ones(self.seq_length, np.float32)}


def build_train_dataset(cfg: JobConfig, ctx: JobContext, vocab_size: int):
    if cfg.data.source == "synthetic":
        return SyntheticSequences(vocab_size, cfg.data.seq_length, cfg.data.seed)
    from train.data import build_datasets

    plan = ctx.plan
    samples = plan.train_iters * plan.global_batch_size
    datasets = build_datasets(plan.blend_path, cfg.data.seq_length, {"train": samples}, seed=cfg.data.seed,
                              cache_dir=str(plan.paths.run_dir / "data_index"))
    return datasets["train"]


EVAL_SEED_OFFSET = 7919  # the synthetic valid split: same generator, other sequences


def build_eval_dataset(cfg: JobConfig, ctx: JobContext, vocab_size: int):
    """The valid split for evaluation; None when the blend has no valid split."""
    if cfg.data.source == "synthetic":
        return SyntheticSequences(vocab_size, cfg.data.seq_length, cfg.data.seed + EVAL_SEED_OFFSET)
    from train.data import build_datasets
    from train.data.blend import load_blend

    plan = ctx.plan
    if "valid" not in load_blend(plan.blend_path).splits:
        return None
    samples = cfg.training.eval_iters * cfg.training.micro_batch_size * plan.data_parallel_size
    datasets = build_datasets(plan.blend_path, cfg.data.seq_length, {"valid": samples}, seed=cfg.data.seed,
                              cache_dir=str(plan.paths.run_dir / "data_index"))
    return datasets.get("valid")
