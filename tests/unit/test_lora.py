"""LoRA adapters, merge, greedy decoding, labeled-set scoring, early stopping: pytest tests/unit/test_lora.py"""

import json
from pathlib import Path

import pytest
import torch

from train.config import LoraConfig, TrainingConfig
from train.validation import EarlyStopping, build_early_stopping
from train.generate import greedy_generate
from train.lora import apply_lora, check_lora_config, initial_adapters, lora_layers, merge_lora
from train.models import build_model, init_weights
from train.finetune_validate import LabeledSetError, extract_label, load_labeled_set, summarize

REPO = Path(__file__).resolve().parents[2]


def lora_cfg(**overrides):
    values = dict(rank=4, alpha=8.0, dropout=0.0, target_modules="q_proj,v_proj,down_proj")
    return LoraConfig(**{**values, **overrides})


def tiny_model(seed: int = 0):
    return init_weights(build_model("debug-qwen3", device="cpu"), seed).eval()


def randomize_adapters(model, seed: int = 1):
    """lora_B starts at zero (no effect); give every adapter weights so that merging matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def test_apply_lora_freezes_the_base_and_starts_as_the_base():
    model = tiny_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    before = model(tokens)
    model = apply_lora(model, lora_cfg())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # 2 layers x (q, v, down) x (A, B)
    assert len(trainable) == 2 * 3 * 2 and len(lora_layers(model)) == 6
    torch.testing.assert_close(model(tokens), before)  # lora_B = 0


def test_initial_adapters_of_a_meta_model_are_apply_lora_s_values():
    """Adapters added on the meta device (the base loaded sharded) start from what apply_lora draws
    on a real model from the same generator state: lora_A kaiming uniform, lora_B zeros, fp32."""
    torch.manual_seed(7)
    state = torch.get_rng_state()
    whole = apply_lora(tiny_model(), lora_cfg())
    on_meta = apply_lora(build_model("debug-qwen3", device="meta"), lora_cfg())
    values = initial_adapters(on_meta, state)
    adapters = {name: p for name, p in whole.named_parameters() if "lora_" in name}
    assert values.keys() == adapters.keys() and len(values) == 12
    for name, value in values.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, adapters[name].detach(), rtol=0, atol=0, msg=name)
    assert any(value.abs().sum() > 0 for name, value in values.items() if "lora_A" in name)


def test_apply_lora_rejects_unknown_targets_and_bad_values():
    with pytest.raises(ValueError, match="LORA_TARGET_MODULES.*qkv_proj"):
        apply_lora(tiny_model(), lora_cfg(target_modules="q_proj,qkv_proj"))
    with pytest.raises(ValueError, match="LORA_RANK"):
        check_lora_config(lora_cfg(rank=0))
    with pytest.raises(ValueError, match="LORA_DROPOUT"):
        check_lora_config(lora_cfg(dropout=1.5))


def test_merge_lora_folds_adapters_into_plain_weights():
    model = tiny_model()
    keys = list(model.state_dict())
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    base_logits = model(tokens)
    model = apply_lora(model, lora_cfg(dropout=0.1))
    randomize_adapters(model)
    model.eval()  # dropout off: the adapted model is deterministic
    adapted = model(tokens)
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters matter
    merged = merge_lora(model)
    assert list(merged.state_dict()) == keys  # the state-dict keys of the model before LoRA
    assert not lora_layers(merged) and all(p.requires_grad for p in merged.parameters())
    assert type(merged.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(merged(tokens), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(merged)


def test_merged_model_saves_as_hf_and_transformers_agrees(tmp_path):
    from transformers import AutoModelForCausalLM

    from train.models import save_hf

    model = apply_lora(tiny_model(), lora_cfg())
    randomize_adapters(model)
    tokens = torch.randint(0, model.args.vocab_size, (1, 10))
    adapted = model(tokens)
    save_hf(merge_lora(model), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf(tokens).logits, adapted, atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("family_model", ["debug-qwen3", "debug-llama3"])
def test_peft_adapters_load_in_peft_with_our_logits(tmp_path, family_model):
    """save_peft_adapters -> PeftModel.from_pretrained(transformers' base, dir): the adapted logits
    of ours, tight in fp32; in bf16 within bf16 rounding, far below the adapters' effect."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.lora import save_peft_adapters
    from train.models import save_hf

    base = init_weights(build_model(family_model, device="cpu"), 0).eval()
    save_hf(base, tmp_path / "base")
    tokens = torch.randint(0, base.args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(tokens)
    model = apply_lora(base, lora_cfg(dropout=0.1)).eval()
    randomize_adapters(model)
    save_peft_adapters(model, lora_cfg(dropout=0.1), str(tmp_path / "base"), tmp_path / "adapters")
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["peft_type"] == "LORA"
    with torch.no_grad():
        adapted = model(tokens)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
            hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
            peft_model = PeftModel.from_pretrained(hf_base, tmp_path / "adapters").eval()
            logits = peft_model(tokens).logits.float()
            moved = (adapted - base_logits).abs().max().item()
            error = (logits - adapted).abs().max().item()
            assert error < tolerance * moved, (dtype, error, moved)


def test_peft_adapter_names_are_peft_s():
    from train.lora import peft_adapter_state

    model = apply_lora(tiny_model(), lora_cfg(target_modules="q_proj"))
    names = sorted(peft_adapter_state(model))
    assert names[:2] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert len(names) == 2 * model.args.num_layers

def reference_greedy(model, prompt, steps, stop_ids):
    tokens, out = list(prompt), []
    for _ in range(steps):
        token = int(model(torch.tensor([tokens]))[0, -1].argmax())
        if token in stop_ids:
            break
        tokens.append(token)
        out.append(token)
    return out


def test_greedy_generate_batched_equals_one_at_a_time():
    model = tiny_model(3)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (length,), generator=generator).tolist() for length in (5, 3, 5, 7, 5)]
    expected = [reference_greedy(model, p, 6, set()) for p in prompts]
    assert greedy_generate(model, prompts, 6, set(), batch_size=2) == expected
    assert all(len(answer) == 6 for answer in expected)
    # a stop id cuts the answer before it, and only that row
    stop = expected[1][2]
    stopped = greedy_generate(model, prompts, 6, {stop}, batch_size=8)
    assert stopped[1] == expected[1][:expected[1].index(stop)]
    assert stopped == [reference_greedy(model, p, 6, {stop}) for p in prompts]
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompts, 0, set())


def test_extract_label_and_summary():
    labels = ["positive", "negative", "neutral", "very negative"]
    assert extract_label("<think>maybe negative</think>Positive.", labels) == "positive"
    assert extract_label("It is very negative, not neutral", labels) == "very negative"
    assert extract_label("neutral or positive", labels) == "neutral"
    assert extract_label("  \n'sarcastic'.\nmore", labels) == "sarcastic"
    rows = [{"category": "a", "correct": True}, {"category": "a", "correct": False},
            {"category": "b", "correct": True}]
    summary = summarize(rows)
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["correct"] == 2 and summary["total"] == 3
    assert summary["per_category"] == {"a": {"total": 2, "correct": 1, "accuracy": 0.5},
                                       "b": {"total": 1, "correct": 1, "accuracy": 1.0}}


def test_labeled_set_format_and_errors(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"prompt": "p1", "label": "yes", "category": "c"}) + "\n\n"
                    + json.dumps({"prompt": "p2", "label": "no"}) + "\n")
    assert load_labeled_set(path) == [{"prompt": "p1", "label": "yes", "category": "c"},
                                      {"prompt": "p2", "label": "no", "category": "no"}]
    assert len(load_labeled_set(path, max_samples=1)) == 1
    with pytest.raises(LabeledSetError, match="does not exist"):
        load_labeled_set(tmp_path / "missing.jsonl")
    path.write_text(json.dumps({"prompt": "p1", "label": "yes"}) + "\n" + json.dumps({"prompt": "p2"}) + "\n")
    with pytest.raises(LabeledSetError, match=r"set.jsonl:2: key 'label'"):
        load_labeled_set(path)
    path.write_text("{not json\n")
    with pytest.raises(LabeledSetError, match=r"set.jsonl:1: not JSON"):
        load_labeled_set(path)
    path.write_text("\n")
    with pytest.raises(LabeledSetError, match="no records"):
        load_labeled_set(path)


def test_early_stopping_counts_evaluations_without_improvement():
    tracker = EarlyStopping(patience=2, min_delta=0.1)
    assert tracker.update(2.0, 10) == "improved"
    assert tracker.update(1.95, 20) == "wait"  # better, but by less than min_delta
    assert tracker.update(1.5, 30) == "improved" and tracker.best_iteration == 30
    assert tracker.update(1.6, 40) == "wait"
    assert tracker.update(1.45, 50) == "stop" and tracker.stopped
    assert build_early_stopping(TrainingConfig(early_stop_patience=0, eval_interval=0)) is None
    with pytest.raises(ValueError, match="EVAL_INTERVAL"):
        build_early_stopping(TrainingConfig(early_stop_patience=3, eval_interval=0))


def test_protected_checkpoint_survives_rotation(tmp_path):
    from train.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.purgeable([10, 20, 30, 40], keep=40) == [10, 20]
    manager.protected = {10}
    assert manager.purgeable([10, 20, 30, 40], keep=40) == [20]


# The users' LoRA guide's table: (rank range, dropout, LR, batch range) per size
SEED_002 = {"qwen3-0.6b-lora": ((8, 16), 0.05, 3e-4, (4, 8)),
            "qwen3-1.7b-lora": ((16, 32), 0.1, 2e-4, (4, 16)),
            "qwen3-8b-lora": ((32, 64), 0.1, 1e-4, (4, 8))}


@pytest.mark.parametrize("conf", sorted(SEED_002))
def test_lora_confs_follow_seed_002(conf):
    from train.launch.conf import config_overrides, load_conf

    env = {"PATH": "/usr/bin:/bin", "MODELS_ROOT": "/models"}
    values = load_conf(conf, "finetune", env)[2]
    (low, high), dropout, lr, (mbs_low, mbs_high) = SEED_002[conf]
    assert low <= values["LORA_RANK"] <= high and values["LORA_ALPHA"] == 2 * values["LORA_RANK"]
    assert values["LORA_DROPOUT"] == dropout and values["LR"] == lr and mbs_low <= values["MBS"] <= mbs_high
    overrides = config_overrides("finetune", {**values, "QUANT_RECIPE": "nvfp4"})
    assert overrides["mode"] == "train" and overrides["training.early_stop_patience"] > 0
    assert overrides["lora.target_modules"] == "q_proj,k_proj,v_proj,o_proj"
    assert overrides["lora.quantized_base"] == "nvfp4"


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8"])
def test_lora_on_a_quantized_base_keeps_the_adapters_unquantized(recipe):
    from modelopt.torch.quantization.nn import TensorQuantizer

    from train.lora import apply_quantized_base

    model = tiny_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 16))
    full_precision = model(tokens)
    model = apply_quantized_base(model, recipe, [tokens[:1], tokens[1:]])
    quantized = model(tokens)
    assert (quantized - full_precision).abs().max() > 1e-4  # the base really is fake-quantized
    model = apply_lora(model, lora_cfg())
    torch.testing.assert_close(model(tokens), quantized)  # lora_B = 0
    q_proj = model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight_quantizer.is_enabled and q_proj.base_layer.input_quantizer.is_enabled
    in_adapters = [name for name, m in model.named_modules() if "lora_" in name and isinstance(m, TensorQuantizer)]
    assert not [name for name in in_adapters if model.get_submodule(name).is_enabled]
    assert type(q_proj.lora_A["default"]) is torch.nn.Linear  # a plain Linear: no quantizer at all
    # gradients reach the adapters only; the adapter path adds full-precision x @ A^T @ B^T
    randomize_adapters(model)
    model.eval()
    model(tokens).square().mean().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    x = torch.randn(3, q_proj.in_features)
    delta = q_proj.lora_B["default"](q_proj.lora_A["default"](x)) * q_proj.scaling["default"]
    torch.testing.assert_close(q_proj(x), q_proj.base_layer(x) + delta)
