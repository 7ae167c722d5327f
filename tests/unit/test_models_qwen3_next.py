"""Qwen3-Next: Gated DeltaNet forms, logit parity with transformers, HF in/out, registry, bad configs.

Run: `python -m pytest tests/unit/test_models_qwen3_next.py -q`
"""

import dataclasses
import json

import pytest
import torch

from train.models import ModelConfigError, build_model, count_parameters, get_model_args, load_hf, save_hf
from train.models.common.gated_deltanet import chunk_gated_delta_rule, recurrent_gated_delta_rule
from train.models.registry import flops_per_token

VOCAB = 256
L, F = "linear_attention", "full_attention"


def hf_config(**overrides):
    """2 layers (linear, full), GQA 4:2, DeltaNet 2 key heads serving 4 value heads, partial RoPE."""
    from transformers import Qwen3NextConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, intermediate_size=96, max_position_embeddings=256,
                rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25),
                layer_types=[L, F], linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=16, linear_value_head_dim=24, linear_conv_kernel_dim=4,
                num_experts=0, tie_word_embeddings=False)
    return Qwen3NextConfig(**{**base, **overrides})


def random_hf_model(config, seed: int = 0):
    """Qwen3NextForCausalLM with every weight random, norms included (HF inits them to 0 or 1)."""
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.uniform_(-1.0, 1.5)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def tokens(batch: int = 2, seq_len: int = 80) -> torch.Tensor:  # 80 > one 64-token chunk
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(1))


# -- Gated DeltaNet -------------------------------------------------------------------------
def deltanet_inputs(batch=2, seq_len=100, heads=3, dk=16, dv=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, seq_len, heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(batch, seq_len, heads, dv, generator=gen)
    g = -torch.rand(batch, seq_len, heads, generator=gen) * 2  # log-decay <= 0
    beta = torch.rand(batch, seq_len, heads, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("chunk_size", [64, 16])
def test_deltanet_chunked_matches_recurrent(chunk_size):
    inputs = deltanet_inputs()  # 100 tokens: a partial last chunk
    reference = recurrent_gated_delta_rule(*inputs)
    torch.testing.assert_close(chunk_gated_delta_rule(*inputs, chunk_size=chunk_size), reference,
                               atol=1e-5, rtol=1e-5)


def test_deltanet_matches_transformers_torch_reference():
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    q, k, v, g, beta = deltanet_inputs(seq_len=70)
    expected, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(chunk_gated_delta_rule(q, k, v, g, beta), expected, atol=1e-5, rtol=1e-5)


def test_deltanet_gradients_of_both_forms_agree():
    inputs = [x.requires_grad_() for x in deltanet_inputs(seq_len=40)]
    grads = []
    for rule in (chunk_gated_delta_rule, recurrent_gated_delta_rule):
        out = rule(*inputs, **({"chunk_size": 16} if rule is chunk_gated_delta_rule else {}))
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for chunked, recurrent in zip(*grads):
        torch.testing.assert_close(chunked, recurrent, atol=1e-4, rtol=1e-4)


def test_deltanet_is_causal():
    q, k, v, g, beta = deltanet_inputs(seq_len=70)
    out = chunk_gated_delta_rule(q, k, v, g, beta)
    v2 = v.clone()
    v2[:, 50:] += 1.0
    torch.testing.assert_close(chunk_gated_delta_rule(q, k, v2, g, beta)[:, :50], out[:, :50])


# -- parity with transformers ------------------------------------------------------------------
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_word_embeddings=True, num_hidden_layers=4, layer_types=None),  # interval rule: L L L F
    dict(MOE, mlp_only_layers=[0]),  # layer 0 dense MLP, layer 1 routed + shared experts
], ids=["linear-full", "interval-tied", "moe"])
def test_logits_match_transformers(tmp_path, overrides):
    reference = random_hf_model(hf_config(**overrides))
    reference.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert model.args.family == "qwen3_next"
    assert model.args.resolved_layer_types() == list(reference.config.layer_types)
    ids = tokens()
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=1e-4)
        model.set_deltanet_kernel("recurrent")
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=1e-4)


def test_save_hf_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    ours = build_model("debug-qwen3-next", device="cpu", seed=3)
    save_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3NextForCausalLM"] and config["layer_types"] == [L, F]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    again = load_hf(tmp_path)
    assert dataclasses.replace(again.args, name=ours.args.name) == ours.args
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_hf_checkpoint_with_missing_deltanet_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from train.models import CheckpointError

    save_hf(build_model("debug-qwen3-next", device="cpu"), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.0.linear_attn.A_log"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.0\.linear_attn\.A_log"):
        load_hf(tmp_path)


# -- registry --------------------------------------------------------------------------------
def test_auxiliary_loss_matches_transformers(tmp_path):
    reference = random_hf_model(hf_config(**MOE, router_aux_loss_coef=0.01))
    reference.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    ids = tokens()
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True).aux_loss * 0.01
        model(ids)
        torch.testing.assert_close(model.auxiliary_loss(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-qwen3-next", "debug-qwen3-next", "qwen3-next-2b", "qwen3-next-3b",
                                  "qwen3-next-5b"])
def test_counts_equal_built_model(name):
    model = build_model(name)  # meta: shapes only
    counts = count_parameters(model.args)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["active"] < counts["total"]


@pytest.mark.parametrize("name", ["qwen3-next-2b", "qwen3-next-3b", "qwen3-next-5b"])
def test_named_sizes(name):
    args = get_model_args(name)
    counts = count_parameters(args)
    billions = int(name.split("-")[-1][:-1])
    assert abs(counts["total"] / 1e9 - billions) < 0.05 * billions, counts
    assert counts["active"] < counts["total"] / 2.5
    dense = dataclasses.replace(args, num_experts=0, num_experts_per_token=0, moe_intermediate_size=0,
                                shared_expert_intermediate_size=0)
    # MFU counts the active experts only: about the dense twin whose MLP is the active width (1536)
    assert flops_per_token(args, 4096) == pytest.approx(flops_per_token(dense, 4096), rel=0.01)


def test_seed_layer_pattern_of_3b():
    types = get_model_args("qwen3-next-3b").resolved_layer_types()
    assert [i for i, t in enumerate(types) if t == F] == [0, 3, 6, 11, 14, 19, 22]
    assert get_model_args("qwen3-next-2b").resolved_layer_types().count(F) == 5  # 20 layers, interval 4


def test_moe_counts_match_transformers():
    from transformers import Qwen3NextForCausalLM

    config = hf_config(**MOE)
    with torch.device("meta"):
        reference = Qwen3NextForCausalLM(config)
    from train.models.hf_adapters import args_from_hf_config

    args = args_from_hf_config(config.to_dict(), "hf:moe")
    counts = count_parameters(args)
    assert counts["total"] == sum(p.numel() for p in reference.parameters())
    expert = 3 * 64 * 32
    assert counts["total"] - counts["active"] == 2 * (4 - 2) * expert  # 2 layers, 2 idle experts each


def test_info_cli_prints_total_and_active(capsys):
    from train.models.__main__ import main

    assert main(["info", "qwen3-next-3b"]) == 0
    out = capsys.readouterr().out
    assert "parameters.total       2,956,966,304" in out and "parameters.active      994,032,032" in out


# -- bad configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (dict(layer_types=(L, F, L)), "layer_types has 3 entries, num_layers is 2"),
    (dict(layer_types=(L, "sliding")), r"layer_types entries \['sliding'\]"),
    (dict(linear_num_value_heads=3), "linear_num_key_heads=2 must divide linear_num_value_heads=3"),
    (dict(linear_key_head_dim=0), "linear_key_head_dim must be positive"),
    (dict(partial_rotary_factor=0.1875), "even rotary_dim"),  # 16 * 0.1875 = 3
    (dict(num_experts=8, num_experts_per_token=9, moe_intermediate_size=16), "num_experts_per_token"),
    (dict(full_attention_interval=0, layer_types=None), "full_attention_interval must be positive"),
    (dict(shared_expert_intermediate_size=0), "always have a shared expert"),
])
def test_bad_configs_name_the_field(change, message):
    args = get_model_args("debug-qwen3-next")
    with pytest.raises(ModelConfigError, match=message):
        dataclasses.replace(args, **change).validate()


# -- quantization -------------------------------------------------------------------------------
@pytest.mark.slow  # importing modelopt alone takes ~15 s on 2 busy cores
def test_modelopt_defaults_leave_conv_ba_router_gates_and_lm_head_unquantized():
    """Our names are HF's, so modelopt's default exclusions (linear_attn.conv1d, in_proj_b*,
    mlp.gate., mlp.shared_expert_gate., lm_head) apply as they do to Qwen3NextForCausalLM.
    FP8 fake quant has a CPU path; NVFP4 uses the same exclusion list."""
    import modelopt.torch.quantization as mtq

    from train.quant import register_grouped_experts

    register_grouped_experts()  # before quantize: else modelopt's own fused-experts wrapper takes the class
    model = build_model("debug-qwen3-next", device="cpu")  # layer 0: DeltaNet + MLP, 1: attention + MoE
    ids = torch.randint(0, 512, (1, 16))
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop=lambda m: m(ids))
    state = {name: module.is_enabled for name, module in model.named_modules() if name.endswith("quantizer")}
    enabled_linears = {name.removesuffix(".weight_quantizer") for name, on in state.items()
                       if name.endswith(".weight_quantizer") and on}
    assert enabled_linears == {"layers.0.linear_attn.in_proj_qkvz", "layers.0.linear_attn.out_proj",
                               *(f"layers.1.self_attn.{p}_proj" for p in "qkvo"),
                               *(f"layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")),
                               *(f"layers.1.mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down"))}
    for excluded in ("layers.0.linear_attn.in_proj_ba", "layers.0.linear_attn.conv1d", "layers.1.mlp.gate.",
                     "layers.1.mlp.shared_expert_gate", "lm_head"):
        assert not any(on for name, on in state.items() if name.startswith(excluded)), excluded
    for name in ("gate_up_proj_input_quantizer", "gate_up_proj_weight_quantizer",
                 "down_proj_input_quantizer", "down_proj_weight_quantizer"):  # routed experts are quantized
        assert state[f"layers.1.mlp.experts.{name}"], name
    assert torch.isfinite(model(ids)).all()


@pytest.mark.parametrize("heads, message", [
    (dict(), None),  # tiny: 4 heads, 2 KV heads, 2 key / 4 value DeltaNet heads
    (dict(linear_num_key_heads=1, linear_num_value_heads=2), "TP_SIZE=2 does not divide linear_num_key_heads=1"),
    (dict(linear_num_key_heads=1, linear_num_value_heads=3), "TP_SIZE=2 does not divide linear_num_key_heads=1"),
    (dict(num_heads=6, num_kv_heads=3), "TP_SIZE=2 does not divide num_kv_heads=3"),
])
def test_tensor_parallel_needs_whole_heads_per_rank(heads, message):
    """The plan's check: every TP rank holds whole attention heads, KV heads and DeltaNet key
    heads (each with its adjacent value heads)."""
    from types import SimpleNamespace

    from train.parallel.checks import ParallelSettingsError, check_parallel_settings

    parallel = SimpleNamespace(data_parallel="fsdp", pipeline_parallel_size=1, expert_parallel_size=1,
                               tensor_parallel_size=2, fsdp_mixed_precision="auto", pipeline_schedule="1f1b",
                               virtual_stages=1)
    args = dataclasses.replace(get_model_args("tiny-qwen3-next"), **heads)
    if message is None:
        check_parallel_settings(parallel, args, world_size=2)
        return
    with pytest.raises(ParallelSettingsError, match=message):
        check_parallel_settings(parallel, args, world_size=2)
