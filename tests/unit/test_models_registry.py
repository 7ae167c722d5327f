"""Registry, parameter and FLOP accounting, CLI: `python -m pytest tests/unit/test_models_registry.py -q`."""

import dataclasses
import json
import subprocess
import sys

import pytest

from train.models import registry
from train.models.__main__ import main
from train.models.errors import ModelConfigError, UnknownModelError


def test_registry_import_does_not_import_torch():
    code = ("import sys, train.models, train.models.registry, train.models.__main__;"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name, billions", [
    # Figures stated by the users' pretraining scripts (and the reference configs they ran).
    ("llama3-1.5b", 1.545), ("llama3-2.2b", 2.224), ("qwen3-1.8b", 1.829), ("llama2-1.36b", 1.294),
    # Public Qwen3 model cards: total / non-embedding.
    ("qwen3-0.6b", 0.596), ("qwen3-1.7b", 1.721), ("qwen3-8b", 8.191),
])
def test_seed_parameter_counts(name, billions):
    counts = registry.count_parameters(registry.get_model_args(name))
    assert counts["total"] / 1e9 == pytest.approx(billions, abs=0.0015)
    assert counts["active"] == counts["total"]  # dense


@pytest.mark.parametrize("name, billions", [("qwen3-0.6b", 0.44), ("qwen3-1.7b", 1.4), ("qwen3-8b", 6.95)])
def test_non_embedding_matches_qwen3_model_cards(name, billions):
    counts = registry.count_parameters(registry.get_model_args(name))
    assert counts["non_embedding"] / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("name", registry.list_models())
def test_counts_match_built_model(name):
    from train.models import build_model

    model = build_model(name, device="meta")
    counts = registry.count_parameters(model.args)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]


def test_flops_formula_is_palm():
    args = registry.get_model_args("llama3-1.5b")
    counts = registry.count_parameters(args)
    expected = 6 * (counts["non_embedding"] + args.vocab_size * args.hidden_size) + 12 * 18 * 16 * 128 * 2048
    assert registry.flops_per_token(args, 2048) == expected
    assert registry.flops_per_token(args, 4096) > registry.flops_per_token(args, 2048)


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownModelError) as error:
        registry.get_model_args("qwen3-9000b")
    assert "qwen3-9000b" in str(error.value) and "tiny-qwen3" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_tiny_sizes_follow_the_brief():
    for name in ("tiny-qwen3", "tiny-llama2", "tiny-llama3", "tiny-gpt2"):
        args = registry.get_model_args(name)
        assert (args.num_layers, args.hidden_size, args.num_heads, args.head_dim, args.vocab_size,
                args.max_seq_len, args.num_experts) == (4, 128, 4, 32, 2048, 512, 0)
    assert registry.get_model_args("tiny-qwen3").num_kv_heads == 2
    assert registry.get_model_args("debug-llama3").hidden_size == 64


@pytest.mark.parametrize("change, culprit", [
    (dict(num_kv_heads=3), "num_kv_heads=3"),
    (dict(num_heads=5, num_kv_heads=5), "num_heads=5"),
    (dict(head_dim=64), "head_dim=64"),
    (dict(family="mamba"), "'mamba'"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_experts=8), "num_experts"),
])
def test_validate_names_the_culprit(change, culprit):
    args = dataclasses.replace(registry.get_model_args("tiny-llama3"), **change)
    with pytest.raises(ModelConfigError, match=culprit.replace("(", r"\(")):
        args.validate()


def test_qwen3_head_dim_is_free():
    args = dataclasses.replace(registry.get_model_args("tiny-qwen3"), head_dim=64)
    assert args.validate() is args


def test_cli_list_info_and_error(capsys):
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in registry.list_models())
    assert main(["info", "qwen3-1.8b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == registry.count_parameters(registry.get_model_args("qwen3-1.8b"))["total"]
    assert main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'no-such-model'") and "Traceback" not in err


def test_every_family_has_a_spec_its_module_exports():
    """family.py is the one place per-family facts live; each family module re-exports its spec."""
    import importlib

    from train.models.family import FAMILIES, family_spec, spec_for_model_type

    assert set(FAMILIES) == {args.family for args in registry.REGISTRY.values()}
    for family in FAMILIES:
        spec = family_spec(family)
        module = importlib.import_module(f"train.models.{family}")
        assert module.SPEC is spec
        assert spec.load("model_class").__module__ == module.__name__
        assert spec_for_model_type(spec.model_type, "test") is spec
        for field in ("args_from_hf", "hf_config_kwargs", "to_hf", "from_hf"):
            assert callable(spec.load(field))
    with pytest.raises(KeyError, match="not one of gpt2"):
        family_spec("mamba")
    with pytest.raises(ModelConfigError, match="model_type 'mamba' is not supported"):
        spec_for_model_type("mamba", "test")


# Values written down from each model's public config.json on the HF hub (the repo in each comment),
# in the registry's field names: a data check, not a copy of the registry.
HF_QWEN3 = dict(rope_theta=1_000_000.0, norm_eps=1e-6, vocab_size=151936, head_dim=128, max_seq_len=40960)
HF_CONFIGS = {
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": dict(HF_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                       num_kv_heads=8, tie_embeddings=True),
    # Qwen/Qwen3-1.7B
    "qwen3-1.7b": dict(HF_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                       num_kv_heads=8, tie_embeddings=True),
    # Qwen/Qwen3-8B
    "qwen3-8b": dict(HF_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                     num_kv_heads=8, tie_embeddings=False),
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": dict(HF_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                          num_kv_heads=4, tie_embeddings=False, num_experts=128, num_experts_per_token=8,
                          moe_intermediate_size=768, norm_topk_prob=True, router_aux_loss_coef=0.001,
                          decoder_sparse_step=1, mlp_only_layers=()),
}
# Our own sizes keep their family's constants: the same public configs name them.
HF_FAMILY_CONSTANTS = {
    # Qwen/Qwen3-1.7B (the size is the users' scripts'; so is vocab 151643, the tokenizer's base vocabulary)
    "qwen3-1.8b": dict(rope_theta=1_000_000.0, norm_eps=1e-6, head_dim=128),
    # meta-llama/Llama-3.1-8B (no rope_scaling: trained from scratch at 2048, it matters past 8192)
    "llama3-1.5b": dict(rope_theta=500_000.0, norm_eps=1e-5, vocab_size=128256, head_dim=128, rope_scaling=None),
    "llama3-2.2b": dict(rope_theta=500_000.0, norm_eps=1e-5, vocab_size=128256, head_dim=128, rope_scaling=None),
    # meta-llama/Llama-2-7b-hf
    "llama2-1.36b": dict(rope_theta=10_000.0, norm_eps=1e-5, vocab_size=32000, head_dim=128),
    # openai-community/gpt2 (layer_norm_epsilon; tied lm_head; vocab 50257 padded to 50304)
    "gpt2-1.36b": dict(norm_eps=1e-5, tie_embeddings=True, vocab_size=50304),
    # Qwen/Qwen3-Next-80B-A3B-Instruct
    "qwen3-next-3b": dict(rope_theta=10_000_000.0, norm_eps=1e-6, vocab_size=151936, partial_rotary_factor=0.25,
                          linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel=4),
}


@pytest.mark.parametrize("name, expected", list({**HF_CONFIGS, **HF_FAMILY_CONSTANTS}.items()))
def test_presets_match_the_public_hf_configs(name, expected):
    args = registry.get_model_args(name)
    found = {key: getattr(args, key) for key in expected}
    assert found == expected
