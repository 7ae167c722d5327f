"""Datablend recipes: a small YAML/JSON naming sources and shares -> datablend_<name>.json.

Recipe form (weights are shares of the blend and need not sum to 1):

    name: combined_cot_chat
    sources:
      openscience:
        weight: 0.2
        prefixes: [data/openscience_cot_chat_text_document]   # every split
      nemotron_v1:
        weight: {train: 0.5, valid: 0.5}                      # or per split
        prefixes:
          train: [data/nemotron_v1_math_text_document, data/nemotron_v1_code_text_document]
          valid: [data/nemotron_v1_valid_text_document]
      nemotron_v2:
        weight: 0.3
        prefixes: [data/nemotron_v2_text_document]

Within a source each prefix is weighted by its token count (read from its .idx), so a
source's share is split in proportion to the data it holds. Relative prefixes are taken
from the recipe's directory; the written blend holds absolute prefixes.
"""

import json
import os
from dataclasses import dataclass

from train.data.blend import SPLITS, parse_blend
from train.data.errors import DataError
from train.data.indexed import count_tokens, pair_exists


@dataclass
class SourceSplit:
    source: str
    split: str
    prefixes: list[str]
    tokens: list[int]
    weight: float  # the source's share in this split, as written in the recipe


def load_recipe(path: str) -> dict:
    try:
        if path.endswith(".json"):
            with open(path) as stream:
                return json.load(stream)
        import yaml

        with open(path) as stream:
            return yaml.safe_load(stream)
    except FileNotFoundError:
        raise DataError(f"{path}: recipe not found") from None
    except (json.JSONDecodeError, ValueError) as error:
        raise DataError(f"{path}: cannot parse recipe ({error})") from None


def _per_split(value, split: str):
    return value.get(split) if isinstance(value, dict) else value


def resolve_recipe(recipe: dict, recipe_path: str) -> tuple[str, list[SourceSplit]]:
    """(blend name, one SourceSplit per source and split it appears in); DataError if malformed."""
    if not isinstance(recipe, dict) or not recipe.get("name") or not isinstance(recipe.get("sources"), dict):
        raise DataError(f"{recipe_path}: a recipe needs `name` and a `sources` mapping")
    directory = os.path.dirname(os.path.abspath(recipe_path))
    entries, missing = [], []
    for source, spec in recipe["sources"].items():
        if not isinstance(spec, dict) or "weight" not in spec or "prefixes" not in spec:
            raise DataError(f"{recipe_path}: source {source!r} needs `weight` and `prefixes`")
        for split in SPLITS:
            prefixes = _per_split(spec["prefixes"], split)
            weight = _per_split(spec["weight"], split)
            if not prefixes or weight is None:
                continue
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise DataError(f"{recipe_path}: source {source!r} split {split!r}: weight {weight!r} must be positive")
            prefixes = [p if os.path.isabs(p) else os.path.normpath(os.path.join(directory, p)) for p in prefixes]
            missing += [p for p in prefixes if not pair_exists(p)]
            entries.append(SourceSplit(source, split, prefixes, [], float(weight)))
    if missing:
        raise DataError(f"{recipe_path}: {len(set(missing))} prefix(es) without .bin/.idx: " + ", ".join(sorted(set(missing))))
    for entry in entries:
        entry.tokens = [count_tokens(prefix) for prefix in entry.prefixes]
        if sum(entry.tokens) == 0:
            raise DataError(f"{recipe_path}: source {entry.source!r} split {entry.split!r} has no tokens")
    return str(recipe["name"]), entries


def blend_from_entries(entries: list[SourceSplit]) -> dict[str, list]:
    """Megatron per-split lists: source share * prefix tokens / source tokens, normalized."""
    blend = {}
    for split in SPLITS:
        in_split = [e for e in entries if e.split == split]
        if not in_split:
            continue
        total_share = sum(e.weight for e in in_split)
        flat = []
        for entry in in_split:
            for prefix, tokens in zip(entry.prefixes, entry.tokens):
                weight = entry.weight / total_share * tokens / sum(entry.tokens)
                if weight > 0:
                    flat += [round(weight, 8), prefix]
        blend[split] = flat
    return blend


def write_blend(recipe_path: str, out_dir: str, seq_length: int) -> tuple[str, list[str]]:
    """Write `<out_dir>/datablend_<name>.json`; returns its path and a report table."""
    name, entries = resolve_recipe(load_recipe(recipe_path), recipe_path)
    blend = blend_from_entries(entries)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"datablend_{name}.json")
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as stream:
        json.dump(blend, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, path)
    parse_blend(blend, path)  # what we wrote must load
    report = [f"{'split':<6} {'source':<28} {'prefixes':>8} {'tokens':>15} {'share':>7} {'samples':>12}"]
    for split in SPLITS:
        in_split = [e for e in entries if e.split == split]
        total_share = sum(e.weight for e in in_split)
        for entry in in_split:
            samples = sum(tokens // seq_length for tokens in entry.tokens)
            report.append(
                f"{split:<6} {entry.source:<28} {len(entry.prefixes):>8} {sum(entry.tokens):>15,} "
                f"{entry.weight / total_share:>7.1%} {samples:>12,}"
            )
        if in_split:
            samples = sum(t // seq_length for e in in_split for t in e.tokens)
            report.append(f"{split:<6} {'(all)':<28} {'':>8} {sum(sum(e.tokens) for e in in_split):>15,} {'':>7} {samples:>12,}")
    report.append(f"samples = floor(tokens / {seq_length}) per prefix, one epoch")
    return path, report
