"""build_datasets: the train/valid/test datasets of a datablend, ready for the sampler."""

from train.data.blend import SPLITS, Blend, load_blend, parse_blend
from train.data.blended_dataset import BlendedDataset
from train.data.gpt_dataset import GPTDataset

# Each split shuffles with its own seed so that valid/test never mirror train's order.
SPLIT_SEED_OFFSET = {"train": 0, "valid": 1, "test": 2}


def build_datasets(
    blend_path_or_dict: str | dict | Blend,
    seq_length: int,
    samples_per_split: dict[str, int | None],
    seed: int = 1234,
    cache_dir: str | None = None,
    eod_token_id: int | None = None,
    eod_mask_loss: bool = False,
) -> dict[str, object]:
    """{split: GPTDataset | BlendedDataset} for each split named in both the blend and
    samples_per_split (a count of 0 skips the split; None means one epoch of a single
    prefix). Index arrays are cached in cache_dir (the run directory) when given.
    """
    if isinstance(blend_path_or_dict, Blend):
        blend = blend_path_or_dict
    elif isinstance(blend_path_or_dict, dict):
        blend = parse_blend(blend_path_or_dict)
    else:
        blend = load_blend(blend_path_or_dict)
    datasets = {}
    for split in SPLITS:
        samples = samples_per_split.get(split, 0)
        if split not in blend.splits or samples == 0:
            continue
        weights = [weight for weight, _ in blend.splits[split]]
        prefixes = [prefix for _, prefix in blend.splits[split]]
        split_seed = seed + SPLIT_SEED_OFFSET[split]
        options = dict(
            seq_length=seq_length,
            seed=split_seed,
            cache_dir=cache_dir,
            split=split,
            eod_token_id=eod_token_id,
            eod_mask_loss=eod_mask_loss,
        )
        if len(prefixes) == 1:
            datasets[split] = GPTDataset(prefixes[0], num_samples=samples, **options)
            continue
        if samples is None:
            raise ValueError(f"split {split!r} blends {len(prefixes)} prefixes; give its sample count")
        counts = BlendedDataset.samples_per_dataset(weights, samples)
        parts = [
            # Each source gets its own seed too: two prefixes must not share an order.
            GPTDataset(prefix, num_samples=count, **{**options, "seed": split_seed + 97 * number})
            for number, (prefix, count) in enumerate(zip(prefixes, counts))
        ]
        datasets[split] = BlendedDataset(parts, weights, samples)
    return datasets
