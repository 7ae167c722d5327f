"""The files beside an export's weights that serving stacks and lm-eval read: tokenizer, ids, modes.

    python -m pytest tests/unit/test_serving.py

An HF directory holding only config.json + safetensors loads in transformers but not in a
serving stack: vLLM and lm-eval build the tokenizer from the same directory, and generation
stops at generation_config.json's eos_token_id. train.export calls add_serving_files() on its
temporary directory before renaming it into place:

    tokenizer files       copied byte for byte from the tokenizer directory (TOKENIZER_FILES present there)
    config.json           bos/eos/pad_token_id filled in where null (base config first, then the tokenizer)
    generation_config.json  the base's (sampling defaults kept), else a new one; ids filled in the same way
    modes                 every file 0666 & ~umask (0644 under umask 022), every folder 0777 & ~umask

The tokenizer directory is the run's model.hf_checkpoint, or --tokenizer DIR (a pretraining
run from a registry model has no HF checkpoint; its data was tokenized with some tokenizer that
the run does not record).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("train")
# The files transformers' tokenizers read (fast, sentencepiece, tiktoken) and the chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "qwen.tiktoken",
                   "chat_template.jinja", "chat_template.json")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION_CONFIG = "generation_config.json"


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files present in `directory` (empty when it holds no tokenizer)."""
    return [Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]


def has_tokenizer(directory: str | Path) -> bool:
    """A directory AutoTokenizer can load from: tokenizer_config.json plus a vocabulary file."""
    names = {path.name for path in tokenizer_files(directory)}
    return "tokenizer_config.json" in names and bool(names - {"tokenizer_config.json", "special_tokens_map.json"})


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def special_token_ids(tokenizer_dir: Path | None, base_dir: Path | None) -> dict[str, int | list[int]]:
    """bos/eos/pad ids: the base config.json's where set (the model's authors chose them), else
    the tokenizer's (its bos_token / eos_token / pad_token). Keys whose id is unknown are left out."""
    ids = {}
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        ids = {key: getattr(tokenizer, key) for key in TOKEN_ID_KEYS}
    base = read_json(base_dir / "config.json") if base_dir is not None else {}
    ids.update({key: base[key] for key in TOKEN_ID_KEYS if base.get(key) is not None})
    return {key: value for key, value in ids.items() if value is not None}


def fill_token_ids(config: dict, ids: dict) -> dict:
    """`config` with each id of `ids` set where the config has none (null or absent)."""
    return {**config, **{key: value for key, value in ids.items() if config.get(key) is None}}


def write_generation_config(out: Path, base_dir: Path | None, ids: dict) -> None:
    base = read_json(base_dir / GENERATION_CONFIG) if base_dir is not None else {}
    config = fill_token_ids(base or {"_from_model_config": True}, ids)
    (out / GENERATION_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def apply_default_modes(directory: Path) -> None:
    """Modes as `open` and `mkdir` give them under the current umask (writers such as safetensors'
    or tempfile's make 0600 files and 0700 folders, unreadable to the serving user)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def add_serving_files(out: Path, tokenizer_dir: Path | None, base_dir: Path | None, *, model_files: bool = True) -> None:
    """Tokenizer files, token ids in config.json, generation_config.json (model_files), default modes.

    tokenizer_dir: where the tokenizer is copied from (None: no tokenizer, a note is logged).
    base_dir: the starting HF checkpoint, whose config.json / generation_config.json give the ids."""
    for path in tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []:
        shutil.copyfile(path, out / path.name)
    if tokenizer_dir is None:
        log.warning("note: no tokenizer known for this run (no model.hf_checkpoint): the export has none; "
                    "lm-eval and vLLM need one: export again with --tokenizer DIR")
    if model_files:
        ids = special_token_ids(tokenizer_dir, base_dir)
        config_path = out / "config.json"
        config_path.write_text(json.dumps(fill_token_ids(read_json(config_path), ids), indent=2, sort_keys=True)
                               + "\n")
        write_generation_config(out, base_dir, ids)
    apply_default_modes(out)
