"""build_model, init_weights, attention backends, forward API: `python -m pytest tests/unit/test_models_build.py -q`."""

import dataclasses
import logging

import pytest
import torch

from train.models import build_model, get_model_args, init_weights

TINY = ["tiny-qwen3", "tiny-llama2", "tiny-llama3", "tiny-gpt2"]


def _tokens(vocab: int, batch: int = 2, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_forward_api(name):
    model = build_model(name, device="cpu")
    ids = _tokens(model.args.vocab_size)
    logits = model(ids)
    assert logits.shape == (2, 24, model.args.vocab_size)
    hidden = model.hidden_states(ids)
    assert hidden.shape == (2, 24, model.args.hidden_size)
    torch.testing.assert_close(model.output_logits(hidden), logits)
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == model.args.num_layers
    assert model.args == get_model_args(name)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_meta_then_init_matches_direct_build(name):
    direct = build_model(name, device="cpu", seed=7)
    meta = build_model(name, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    init_weights(meta, seed=7)
    for (key, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), key
    ids = _tokens(direct.args.vocab_size)
    torch.testing.assert_close(meta(ids), direct(ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_seed_changes_weights(name):
    a, b = build_model(name, device="cpu", seed=1), build_model(name, device="cpu", seed=2)
    same = build_model(name, device="cpu", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), same.parameters()))
    matrices = [(x, y) for x, y in zip(a.parameters(), b.parameters()) if x.dim() == 2]
    assert all(not torch.equal(x, y) for x, y in matrices)


def test_init_scheme():
    model = build_model("tiny-gpt2", device="cpu")
    layer = model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros(128))
    # GPT-2 scales residual projections by 1/sqrt(2 * layers) (0.02 / sqrt(8) ~= 0.0071).
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.1)
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    qwen = build_model("tiny-qwen3", device="cpu")
    assert torch.equal(qwen.layers[0].self_attn.q_norm.weight, torch.ones(32))


def test_tied_embeddings_survive_materialization():
    model = build_model("tiny-qwen3", device="cpu")
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = build_model("tiny-llama3", device="cpu")
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_bf16_parameters():
    model = build_model("tiny-qwen3", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = build_model("tiny-qwen3", device="cpu")
    ids = _tokens(2048)
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    # Same seed: bf16 weights are the rounded fp32 ones, so the logits agree loosely.
    torch.testing.assert_close(logits.float(), reference(ids), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", TINY)
def test_sdpa_and_reference_agree(name):
    sdpa = build_model(name, device="cpu", attention_backend="sdpa")
    reference = build_model(name, device="cpu", attention_backend="reference")
    ids = _tokens(sdpa.args.vocab_size, batch=3, seq_len=40)
    torch.testing.assert_close(sdpa(ids), reference(ids), atol=1e-5, rtol=1e-4)


def test_flash_falls_back_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="train.models"):
        model = build_model("tiny-llama3", device="cpu", attention_backend="flash")
    lines = [r.getMessage() for r in caplog.records if r.name == "train.models"]
    assert len(lines) == 1 and lines[0].startswith("attention backend: sdpa (requested flash")
    assert model.layers[0].self_attn.backend == "sdpa"
    with pytest.raises(ValueError, match="'xformers'"):
        build_model("tiny-llama3", attention_backend="xformers")


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gpt2"])
def test_position_ids_default_and_shifted(name):
    model = build_model(name, device="cpu")
    ids = _tokens(model.args.vocab_size, seq_len=16)
    positions = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(model(ids, position_ids=positions), model(ids))
    assert not torch.allclose(model(ids, position_ids=positions + 5), model(ids))


def test_causality():
    model = build_model("tiny-llama2", device="cpu")
    ids = _tokens(2048, seq_len=20)
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 2048
    torch.testing.assert_close(model(ids)[:, :15], model(changed)[:, :15])


def test_replace_args_and_too_long_sequence():
    args = dataclasses.replace(get_model_args("debug-qwen3"), max_seq_len=8)
    model = build_model(args, device="cpu")
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
