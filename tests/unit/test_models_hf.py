"""HF interop: logit parity with transformers, save_hf round trips, checkpoint errors.

Run: `python -m pytest tests/unit/test_models_hf.py -q`
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.unit.hf_fixtures import TINY_VOCAB, save_tiny_hf_model, save_tiny_tokenizer
from train.models import CheckpointError, ModelConfigError, build_model, load_hf, save_hf

KINDS = ["qwen3", "qwen3-tied", "llama2", "llama3", "gpt2"]
FAMILY = {"qwen3": "qwen3", "qwen3-tied": "qwen3", "llama2": "llama", "llama3": "llama", "gpt2": "gpt2"}


def _tokens(batch: int = 3, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (directory, transformers model) for every tiny kind, saved once per module."""
    out = {}
    for kind in KINDS:
        directory = tmp_path_factory.mktemp(kind)
        out[kind] = (directory, save_tiny_hf_model(directory, kind))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(checkpoints, kind):
    directory, reference = checkpoints[kind]
    model = load_hf(directory)
    assert model.args.family == FAMILY[kind] and model.args.name == f"hf:{directory.name}"
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_save_hf_loads_in_transformers(checkpoints, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    directory, reference = checkpoints[kind]
    save_hf(load_hf(directory), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(reference)
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_is_read(checkpoints):
    scaled = load_hf(checkpoints["llama3"][0]).args
    assert scaled.rope_scaling["rope_type"] == "llama3" and scaled.rope_theta == 500_000.0
    assert load_hf(checkpoints["llama2"][0]).args.rope_scaling is None


def test_tied_and_untied_qwen3(checkpoints):
    tied, untied = load_hf(checkpoints["qwen3-tied"][0]), load_hf(checkpoints["qwen3"][0])
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_sharded_round_trip_and_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model("debug-qwen3", device="cpu", seed=3)
    save_hf(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = load_hf(tmp_path)
    for (key, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), key
    ids = torch.randint(0, 512, (2, 16))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
    assert load_hf(tmp_path, dtype=torch.bfloat16).embed_tokens.weight.dtype == torch.bfloat16


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    save_hf(build_model("debug-gpt2", device="cpu", dtype=torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    assert {p.dtype for p in load_hf(tmp_path).parameters()} == {torch.bfloat16}


def test_tokenizer_fixture_round_trips(tmp_path):
    from transformers import AutoTokenizer

    save_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("the quick brown fox")["input_ids"]
    assert 0 < len(ids) and max(ids) < TINY_VOCAB
    assert tokenizer.decode(ids) == "the quick brown fox"


# -- bad input: one clear error naming the culprit ---------------------------------------
def _copy(checkpoints, kind, tmp_path):
    target = tmp_path / kind
    shutil.copytree(checkpoints[kind][0], target)
    return target


def test_missing_config(checkpoints, tmp_path):
    directory = _copy(checkpoints, "llama2", tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(directory)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf(tmp_path / "nowhere")


def test_missing_weights(checkpoints, tmp_path):
    directory = _copy(checkpoints, "llama2", tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_hf(directory)


def test_unsupported_model_type(checkpoints, tmp_path):
    directory = _copy(checkpoints, "llama2", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ModelConfigError, match="model_type 'mamba' is not supported"):
        load_hf(directory)


def test_invalid_shapes_in_config(checkpoints, tmp_path):
    directory = _copy(checkpoints, "llama2", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ModelConfigError, match="num_kv_heads=3 must divide num_heads=4"):
        load_hf(directory)


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_bad_keys_are_all_named(checkpoints, tmp_path, kind):
    directory = _copy(checkpoints, kind, tmp_path)
    state = load_file(directory / "model.safetensors")
    prefix = "transformer.h" if kind == "gpt2" else "model.layers"
    dropped = f"{prefix}.1.mlp.{'c_fc' if kind == 'gpt2' else 'up_proj'}.weight"
    reshaped = f"{prefix}.0.{'ln_1' if kind == 'gpt2' else 'input_layernorm'}.weight"
    del state[dropped]
    state[reshaped] = torch.ones(3)
    state["extra.weight"] = torch.zeros(2)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_hf(directory)
    message = str(error.value)
    assert f"missing keys: {dropped}" in message
    assert "unexpected keys: extra.weight" in message
    assert f"wrong shapes: {reshaped} (3,) (expected (64,))" in message
