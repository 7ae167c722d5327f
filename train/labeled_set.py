"""Fine-tuning's validate mode, its inputs: the labeled set and a tokenizer with a chat template.

Checked cheaply, without torch and before any model is built: at plan time
(train/launch/inputs.py) and again by the validate job (train/finetune_validate.py, which
documents the set's format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig


class LabeledSetError(ValueError):
    """A problem with the labeled set; the message names the file, the line and the key."""


def load_labeled_set(path: str | Path, max_samples: int | None = None) -> list[dict]:
    """[{"prompt", "label", "category"}] from a JSONL file, checked record by record."""
    path = Path(path)
    if not path.is_file():
        raise LabeledSetError(f"validate.val_set (VAL_SET): file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise LabeledSetError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise LabeledSetError(f"{path}:{number}: expected an object with prompt and label")
            for key in ("prompt", "label"):
                if not isinstance(record.get(key), str) or not record[key].strip():
                    raise LabeledSetError(f"{path}:{number}: key {key!r} missing or not a non-empty string")
            category = record.get("category", record["label"])
            if not isinstance(category, str):
                raise LabeledSetError(f"{path}:{number}: key 'category' is {type(category).__name__}, not a string")
            records.append({"prompt": record["prompt"], "label": record["label"], "category": category})
            if max_samples is not None and len(records) >= max_samples:
                break
    if not records:
        raise LabeledSetError(f"validate.val_set (VAL_SET): {path} has no records")
    return records


def load_tokenizer(cfg: JobConfig):
    """The tokenizer (validate.tokenizer, else model.hf_checkpoint), with a chat template."""
    from transformers import AutoTokenizer

    directory = cfg.validate.tokenizer or cfg.model.hf_checkpoint
    if not directory or not Path(directory).is_dir():
        raise LabeledSetError(f"validate.tokenizer: no tokenizer directory (got {directory!r}; "
                              "default: model.hf_checkpoint / BASE_CKPT)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise LabeledSetError(f"validate.tokenizer: {directory} holds no loadable tokenizer ({error})") from None
    if not tokenizer.chat_template:
        raise LabeledSetError(f"validate.tokenizer: the tokenizer in {directory} has no chat template")
    return tokenizer


def check_validate_inputs(cfg: JobConfig) -> tuple[list[dict], object]:
    """The labeled set and the tokenizer, or LabeledSetError: cheap, before any model is built."""
    if not cfg.validate.val_set:
        raise LabeledSetError("mode=validate needs validate.val_set (VAL_SET): a JSONL of prompt/label/category")
    records = load_labeled_set(cfg.validate.val_set, cfg.validate.max_samples)
    return records, load_tokenizer(cfg)
