"""Datablends: Megatron's per-split JSON, loaded and validated without torch.

File form (`$DATACACHE_DIR/datablend_<name>.json`):

    {"train": [w1, "prefix1", w2, "prefix2", ...], "valid": [...], "test": [...]}

Each list alternates a positive weight and a dataset prefix (the path without .bin/.idx);
a list holding a single prefix means weight 1. Weights need not sum to 1 (they are
normalized when blending). Relative prefixes are resolved against the blend file's
directory, falling back to the working directory, so a data cache directory can move.
"""

import json
import math
import os
from dataclasses import dataclass, field

from train.data.errors import DataError
from train.data.indexed import count_tokens, pair_exists

SPLITS = ("train", "valid", "test")


@dataclass
class Blend:
    path: str
    # split -> [(weight, prefix), ...] in file order; weights as written (not normalized)
    splits: dict[str, list[tuple[float, str]]] = field(default_factory=dict)

    def prefixes(self, split: str | None = None) -> list[str]:
        chosen = [split] if split else list(self.splits)
        return [prefix for name in chosen for _, prefix in self.splits.get(name, [])]


def _parse_split(path: str, split: str, entries: object) -> list[tuple[float, str]]:
    where = f"{path}: split {split!r}"
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{where} must be a non-empty list [weight, prefix, ...], got {entries!r}")
    if len(entries) == 1 and isinstance(entries[0], str):
        return [(1.0, entries[0])]
    if len(entries) % 2:
        raise DataError(
            f"{where} has {len(entries)} entries; expected pairs of weight and prefix"
        )
    pairs = []
    for position in range(0, len(entries), 2):
        weight, prefix = entries[position], entries[position + 1]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise DataError(f"{where}: entry {position} should be a weight, got {weight!r}")
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"{where}: weight {weight!r} for {prefix!r} must be positive")
        if not isinstance(prefix, str) or not prefix:
            raise DataError(f"{where}: entry {position + 1} should be a prefix, got {prefix!r}")
        pairs.append((float(weight), prefix))
    return pairs


def _resolve(prefix: str, blend_directory: str) -> str:
    if os.path.isabs(prefix):
        return prefix
    beside_blend = os.path.join(blend_directory, prefix)
    if pair_exists(beside_blend) or not pair_exists(prefix):
        return os.path.normpath(beside_blend)
    return prefix


def parse_blend(data: object, path: str = "<blend>", check_files: bool = True) -> Blend:
    """Validate a blend already loaded from JSON (or built in code) and resolve its prefixes."""
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: a blend is a JSON object with keys {list(SPLITS)}, got {data!r}")
    unknown = sorted(set(data) - set(SPLITS))
    if unknown:
        raise DataError(f"{path}: unknown split key(s) {unknown}; expected {list(SPLITS)}")
    directory = os.path.dirname(os.path.abspath(path)) if path != "<blend>" else os.getcwd()
    blend = Blend(path=path)
    for split in SPLITS:
        if split in data:
            pairs = _parse_split(path, split, data[split])
            blend.splits[split] = [(weight, _resolve(prefix, directory)) for weight, prefix in pairs]
    if check_files:
        missing = sorted({p for p in blend.prefixes() if not pair_exists(p)})
        if missing:
            raise DataError(
                f"{path}: {len(missing)} prefix(es) without both .bin and .idx: " + ", ".join(missing)
            )
    return blend


def load_blend(path: str, check_files: bool = True) -> Blend:
    """Read and validate `datablend_*.json`; DataError names the file, key and value at fault.

    check_files: also require `<prefix>.bin` and `<prefix>.idx` for every prefix (all
    missing ones are listed in one message).
    """
    try:
        with open(path) as stream:
            data = json.load(stream)
    except FileNotFoundError:
        raise DataError(f"{path}: blend file not found") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    return parse_blend(data, path, check_files)


def packed_samples(prefix: str, seq_length: int) -> int:
    """floor(tokens / seq_length) for one prefix, from its .idx only."""
    return count_tokens(prefix) // seq_length


def train_samples_for_blend(blend_path: str, seq_length: int) -> int:
    """Packed samples in one epoch of the train split: sum over its prefixes of
    floor(tokens / seq_length). Weights do not enter: this counts every train token once.

    GPTDataset's own count per prefix is (tokens - 1) // seq_length, at most one less.
    """
    if seq_length <= 0:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    blend = load_blend(blend_path)
    if "train" not in blend.splits:
        raise DataError(f"{blend_path}: no 'train' split")
    return sum(packed_samples(prefix, seq_length) for prefix in blend.prefixes("train"))
