"""python -m pytest tests/unit/test_serving.py  (tokenizer, token ids, generation_config, modes of an export)"""

import json
import os
import stat

import pytest

from tests.unit.hf_fixtures import save_tiny_hf_model, save_tiny_tokenizer
from train.serving import add_serving_files, has_tokenizer


@pytest.fixture
def base(tmp_path):
    """A tiny HF checkpoint with a tokenizer; its config.json names no eos/pad (as our save_hf writes)."""
    directory = tmp_path / "base"
    save_tiny_hf_model(directory, "qwen3", eos_token_id=None, bos_token_id=None, pad_token_id=None)
    save_tiny_tokenizer(directory)
    return directory


def exported(tmp_path, name="out"):
    """An export's weights-only directory: config.json with null ids, a 0600 weight file."""
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3", "eos_token_id": None}))
    (out / "model.safetensors").write_bytes(b"")
    (out / "model.safetensors").chmod(0o600)
    return out


def test_tokenizer_ids_and_generation_config_come_with_the_export(tmp_path, base):
    from transformers import AutoTokenizer, GenerationConfig

    out = exported(tmp_path)
    add_serving_files(out, base, base)
    assert has_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("the quick brown fox").input_ids == AutoTokenizer.from_pretrained(base)("the quick brown fox").input_ids
    config = json.loads((out / "config.json").read_text())
    eos, pad = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"])
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (eos, eos, pad)
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.pad_token_id) == (eos, pad)


def test_the_base_config_s_ids_win_and_its_generation_config_is_kept(tmp_path, base):
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8], "temperature": 0.6}))
    out = exported(tmp_path)
    add_serving_files(out, base, base)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 7
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [7, 8] and generation["temperature"] == 0.6
    assert generation["pad_token_id"] == 1  # <|pad|>, absent from the base's generation_config


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_modes_of_the_umask(tmp_path, base, umask):
    previous = os.umask(umask)
    try:
        out = exported(tmp_path)
        (out / "sub").mkdir(mode=0o700)
        add_serving_files(out, base, base)
    finally:
        os.umask(previous)
    for path in [out / "model.safetensors", out / "tokenizer.json", out / "generation_config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o777 & ~umask


def test_without_a_tokenizer_the_export_says_so(tmp_path, caplog):
    out = exported(tmp_path)
    add_serving_files(out, None, None)
    assert not has_tokenizer(out) and "--tokenizer DIR" in caplog.text
    assert json.loads((out / "generation_config.json").read_text()) == {"_from_model_config": True}


def test_peft_exports_get_the_tokenizer_but_no_model_config(tmp_path, base):
    out = tmp_path / "adapters"
    out.mkdir()
    add_serving_files(out, base, base, model_files=False)
    assert has_tokenizer(out) and not (out / "config.json").exists() and not (out / "generation_config.json").exists()
