"""Qwen3-MoE: parity with transformers (logits, aux loss, gradients), HF checkpoints both ways,
routing pieces, registry counts, bad configs, modelopt quantization of the grouped experts.

Run: `python -m pytest tests/unit/test_models_moe.py -q`
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from train.models import CheckpointError, ModelConfigError, build_model, load_hf, save_hf
from train.models.common.moe import MoE, grouped_linear
from train.models.registry import count_parameters, flops_per_token, get_model_args
from train.losses import language_model_loss

VOCAB = 256
COEF = 0.02


def hf_config(**overrides):
    """3 layers: 0 and 2 sparse, 1 dense (mlp_only_layers); 8 experts, top-2; head_dim != D/H."""
    from transformers import Qwen3MoeConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, intermediate_size=96, moe_intermediate_size=48,
                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                max_position_embeddings=128, rope_theta=1e6, router_aux_loss_coef=COEF)
    return Qwen3MoeConfig(**{**base, **overrides})


def hf_model(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(**overrides))
    with torch.no_grad():  # randomize norms too, so a swapped norm weight cannot go unnoticed
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def tokens(batch: int = 2, seq_len: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers model): save_pretrained writes the per-expert layout."""
    directory = tmp_path_factory.mktemp("qwen3-moe")
    model = hf_model()
    model.save_pretrained(directory)
    return directory, model


# -- parity ---------------------------------------------------------------------------------
def test_logits_and_aux_loss_match_transformers(checkpoint):
    directory, reference = checkpoint
    model = load_hf(directory)
    assert model.args.family == "qwen3_moe" and model.args.mlp_only_layers == (1,)
    assert isinstance(model.layers[0].mlp, MoE) and not isinstance(model.layers[1].mlp, MoE)
    ids = tokens()
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True)
        logits = model(ids)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)
    # auxiliary_loss = router_aux_loss_coef * HF's load_balancing_loss_func(router logits)
    torch.testing.assert_close(model.auxiliary_loss(), COEF * expected.aux_loss, atol=1e-6, rtol=1e-5)


def test_training_loss_and_gradients_match_transformers(checkpoint):
    directory, reference = checkpoint
    model = load_hf(directory)
    ids = tokens()
    # Ours: the trainer's default loss on shifted inputs; HF: its CE on the same inputs plus
    # router_aux_loss_coef * aux_loss (what Qwen3MoeForCausalLM adds to a labelled loss).
    loss = language_model_loss(model, ids[:, :-1], ids[:, 1:], torch.ones(ids.shape[0], ids.shape[1] - 1))
    expected = reference(ids[:, :-1], output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(expected.logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, ce + COEF * expected.aux_loss, atol=1e-5, rtol=1e-5)
    reference.zero_grad()
    (ce + COEF * expected.aux_loss).backward()
    loss.backward()
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in ("layers.0.mlp.gate.weight", "layers.0.mlp.experts.gate_up_proj",
                 "layers.2.mlp.experts.down_proj", "layers.1.mlp.up_proj.weight"):
        torch.testing.assert_close(ours[name].grad, theirs[f"model.{name}"].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [dict(norm_topk_prob=False, mlp_only_layers=[], decoder_sparse_step=2)])
def test_parity_without_renormalization_and_sparse_step(overrides, tmp_path):
    reference = hf_model(seed=1, **overrides)
    reference.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert not model.args.norm_topk_prob and model.args.decoder_sparse_step == 2
    assert [isinstance(layer.mlp, MoE) for layer in model.layers] == [False, True, False]
    ids = tokens()
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True)
        torch.testing.assert_close(model(ids), expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.auxiliary_loss(), COEF * expected.aux_loss, atol=1e-6, rtol=1e-5)


# -- HF checkpoints in and out ----------------------------------------------------------------
def test_grouped_layout_on_disk_loads(checkpoint, tmp_path):
    """transformers 5's in-memory layout (3-D gate_up_proj / down_proj) written as is."""
    directory, reference = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, tmp_path / "model.safetensors")
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path)(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_save_hf_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model("debug-qwen3-moe", device="cpu", seed=3)
    save_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts_per_tok"] == 2
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # per-expert, as the Hub stores it
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reloaded(ids, output_router_logits=True)
        torch.testing.assert_close(expected.logits, model(ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.auxiliary_loss(), model.args.router_aux_loss_coef * expected.aux_loss,
                               atol=1e-6, rtol=1e-5)
    again = load_hf(tmp_path)
    assert dataclasses.replace(again.args, name=model.args.name) == model.args
    for (name, ours), theirs in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_bad_expert_keys_are_named(checkpoint, tmp_path):
    directory, _ = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    state = load_file(directory / "model.safetensors")
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    state["model.layers.0.mlp.gate.weight"] = torch.zeros(4, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_hf(tmp_path)
    message = str(error.value)
    assert "missing keys: model.layers.2.mlp.experts.5.up_proj.weight" in message
    assert "wrong shapes: model.layers.0.mlp.gate.weight (4, 64) (expected (8, 64))" in message


# -- routing pieces ----------------------------------------------------------------------------
def test_dispatch_combine_equal_a_per_token_loop():
    torch.manual_seed(0)
    moe = MoE(16, num_experts=4, top_k=2, expert_hidden_dim=8)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 10, 16)
    out = moe(x)
    flat = x.view(-1, 16)
    weights, indices = moe.route(flat)
    expected = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for slot in range(2):
            e = indices[n, slot]
            gate, up = (moe.experts.gate_up_proj[e] @ flat[n]).chunk(2)
            expected[n] += weights[n, slot] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(out.view(-1, 16), expected, atol=1e-5, rtol=1e-5)
    assert moe.balance_stats[0].sum().item() == pytest.approx(2.0)  # fractions of slots sum to k


def test_grouped_linear_handles_empty_experts():
    x, weight = torch.randn(5, 4), torch.randn(3, 6, 4)
    counts = torch.tensor([2, 0, 3])
    out = grouped_linear(x, weight, counts)
    torch.testing.assert_close(out, torch.cat([x[:2] @ weight[0].T, x[2:] @ weight[2].T]))


def test_dense_models_have_zero_auxiliary_loss():
    model = build_model("debug-qwen3", device="cpu")
    model(torch.zeros(1, 4, dtype=torch.long))
    assert model.auxiliary_loss().item() == 0.0


# -- registry --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "debug-qwen3-moe"])
def test_counts_match_the_built_model(name):
    args = get_model_args(name)
    model = build_model(name)  # meta: shapes only
    total = sum(p.numel() for p in model.parameters())
    counts = count_parameters(args)
    assert counts["total"] == total
    expert = 3 * args.hidden_size * args.moe_intermediate_size
    sparse = sum(args.is_moe_layer(i) for i in range(args.num_layers))
    assert counts["active"] == total - sparse * (args.num_experts - args.num_experts_per_token) * expert


def test_qwen3_30b_a3b_matches_the_public_config():
    """Counts equal transformers' Qwen3MoeForCausalLM built (on meta) from the public config."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    args = get_model_args("qwen3-30b-a3b")
    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                            moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                            norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=40960)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    counts = count_parameters(args)
    assert counts["total"] == sum(p.numel() for p in reference.parameters()) == 30_532_122_624
    assert counts["active"] == 3_353_032_704  # "3.3B activated" in the model card
    assert flops_per_token(args, 2048) < flops_per_token(dataclasses.replace(args, num_experts_per_token=128), 2048)


@pytest.mark.parametrize("change, message", [
    (dict(num_experts=0), "needs num_experts > 0"),
    (dict(num_experts_per_token=9), "num_experts_per_token=9 must be in 1..num_experts=8"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size must be positive"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step must be positive"),
    (dict(mlp_only_layers=(0, 7)), r"mlp_only_layers \[7\] are outside 0..3"),
    (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef must be >= 0"),
    (dict(family="qwen3"), "family 'qwen3' is dense; num_experts must be 0"),
])
def test_bad_configs_are_named(change, message):
    with pytest.raises(ModelConfigError, match=message):
        dataclasses.replace(get_model_args("tiny-qwen3-moe"), **change).validate()


# -- quantization ----------------------------------------------------------------------------
def test_nvfp4_quantizes_experts_and_leaves_the_router():
    import modelopt.torch.quantization as mtq

    from train.quant import register_cpu_nvfp4_backend, register_grouped_experts

    register_cpu_nvfp4_backend()
    register_grouped_experts()
    model = build_model("debug-qwen3-moe", device="cpu", seed=0)
    ids = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    experts = model.layers[1].mlp.experts
    weight = experts.gate_up_proj.detach().clone()
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(ids))
    for name in ("gate_up_proj_input_quantizer", "gate_up_proj_weight_quantizer",
                 "down_proj_input_quantizer", "down_proj_weight_quantizer"):
        assert getattr(experts, name).is_enabled, name
    router = model.layers[1].mlp.gate
    assert not router.weight_quantizer.is_enabled and not router.input_quantizer.is_enabled
    fake = experts.gate_up_proj_weight_quantizer(experts.gate_up_proj).detach()
    assert not torch.equal(fake, weight)
    # NVFP4: at most 8 distinct magnitudes (E2M1) times one scale per 16-element block
    block = (fake[0, 0, :16].abs() / fake[0, 0, :16].abs().max()).unique()
    assert len(block) <= 8
    with torch.no_grad():
        after = model(ids)
    assert not torch.allclose(after, before) and torch.isfinite(after).all()
    loss = language_model_loss(model, ids, ids, torch.ones_like(ids, dtype=torch.float32))
    loss.backward()  # straight-through: the expert weights still get gradients
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
