"""python -m pytest tests/integration/test_export.py  (python -m train.export: bf16 HF and NVFP4 HF, CPU)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.export import ExportError, export, main

REPO = Path(__file__).resolve().parents[2]


def fake_run(root: Path, job: str = "pretrain") -> Path:
    """A run dir whose checkpoint has only what export reads before building anything."""
    run = root / "tiny-qwen3-Data-synthetic-lr0.001"
    checkpoint = run / "checkpoints" / "tiny-qwen3" / "iter_0000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.yaml").write_text(f"job: {job}\nmodel:\n  name: tiny-qwen3\n  hf_checkpoint: null\n")
    (checkpoint.parent / "latest_checkpointed_iteration.txt").write_text("2\n")
    return run


def test_run_dir_without_checkpoints_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty-run").mkdir()
    assert main([str(tmp_path / "empty-run"), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "has no checkpoints" in error and "empty-run" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_unknown_format_names_the_known_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(fake_run(tmp_path)), "--format", "gguf", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'gguf'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="'gguf': unknown; known: hf, hf-nvfp4, peft"):
        export(fake_run(tmp_path / "again"), "gguf", tmp_path / "out")


def test_missing_iteration_lists_the_available_ones(tmp_path):
    with pytest.raises(ExportError, match=r"--iteration 7: .*iter_0000007 does not exist \(available: iter_0000002\)"):
        export(fake_run(tmp_path), "hf", tmp_path / "out", iteration=7)


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match="--out .*out exists"):
        export(fake_run(tmp_path), "hf", tmp_path / "out")


def test_nvfp4_export_of_an_unquantized_run_is_refused(tmp_path):
    with pytest.raises(ExportError, match="hf-nvfp4 needs a QAD run quantized with nvfp4 or nvfp4_mlp_only; "
                                          ".* is a pretrain run without quantizer state"):
        export(fake_run(tmp_path), "hf-nvfp4", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


# ---------------------------------------------------------------- real exports of a QAD run

# qad_run (two QAD iterations: nvfp4, random tiny-qwen3 student and teacher whose directories hold a
# tokenizer, as real checkpoints do): conftest.py, shared with test_downstream.py


@pytest.mark.slow
def test_hf_export_loads_in_transformers_with_our_logits(qad_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.export import load_student, read_source

    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "train.export", str(qad_run), "--format", "hf", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.dtype == torch.bfloat16
    assert_serving_files(out, qad_run.parent / "student")
    ours = load_student(read_source(qad_run, None, "hf"), "cpu", quantized=False)
    tokens = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.to(torch.bfloat16)(tokens).float()
        actual = hf_model(tokens).logits.float()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)  # bf16 on both sides
    # the trained weights, not the starting ones: QAD moved them at lr 1e-3
    start = AutoModelForCausalLM.from_pretrained(qad_run.parent / "student")
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight.bfloat16(),
                           hf_model.model.layers[0].mlp.up_proj.weight)


def assert_serving_files(out: Path, base: Path) -> None:
    """What vLLM and lm-eval read beside the weights: the base's tokenizer, the eos id in config.json
    and generation_config.json, every file readable by others (0644 under umask 022)."""
    import json
    import stat

    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("the cat").input_ids == AutoTokenizer.from_pretrained(base)("the cat").input_ids
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    assert GenerationConfig.from_pretrained(out).eos_token_id == eos
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def run_without_hf_checkpoint(qad_run: Path, root: Path) -> Path:
    """A copy of the run whose model.hf_checkpoint is gone: rebuilt from the registry name, no
    tokenizer known (as a pretraining run from a registry model)."""
    import shutil

    from omegaconf import OmegaConf

    run = root / qad_run.name
    shutil.copytree(qad_run, run)
    for config_path in run.glob("checkpoints/*/iter_*/config.yaml"):
        cfg = OmegaConf.load(config_path)
        cfg.model.hf_checkpoint = str(root / "gone")
        OmegaConf.save(cfg, config_path)
    return run


@pytest.mark.slow
def test_a_run_without_tokenizer_exports_with_a_note_or_with_tokenizer_dir(qad_run, tmp_path):
    from train.serving import has_tokenizer

    run = run_without_hf_checkpoint(qad_run, tmp_path)
    result = subprocess.run([sys.executable, "-m", "train.export", str(run), "--format", "hf", "--out",
                             str(tmp_path / "plain")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no tokenizer known" in result.stdout + result.stderr and not has_tokenizer(tmp_path / "plain")
    out = export(run, "hf", tmp_path / "with-tokenizer", tokenizer=qad_run.parent / "student")
    assert_serving_files(out, qad_run.parent / "student")


def test_tokenizer_option_without_tokenizer_files_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(fake_run(tmp_path)), "--format", "hf", "--out", str(tmp_path / "out"),
                 "--tokenizer", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --tokenizer ") and "no tokenizer there" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_peft_export_of_a_run_without_lora_is_one_error_line(tmp_path, capsys):
    assert main([str(fake_run(tmp_path)), "--format", "peft", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: --format peft needs a LoRA fine-tuning run; ")
    assert "is a pretrain run" in error and not (tmp_path / "out.tmp").exists()


def dequantize(tensors: dict, name: str, shape) -> torch.Tensor:
    """An exported NVFP4 weight back in fp32: packed E2M1 pairs x E4M3 block scale x weight_scale_2."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    return NVFP4QTensor(shape, torch.float32, tensors[f"model.{name}.weight"]).dequantize(
        dtype=torch.float32, scale=tensors[f"model.{name}.weight_scale"],
        double_scale=tensors[f"model.{name}.weight_scale_2"], block_sizes={-1: 16})


@pytest.mark.slow
def test_nvfp4_export_holds_the_trained_fake_quantized_weights(qad_run, tmp_path):
    """The exported FP4 weights of o_proj/down_proj dequantize to exactly what the student's weight
    quantizer computed in training. q/k/v and gate/up share one weight_scale_2 (the max of their
    amax: modelopt's export prepares them for fused kernels), so theirs are the FP4 rounding with
    that shared scale. input_scale is the calibrated input amax / (6 x 448)."""
    import json

    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file

    from train.export import load_student, read_source

    out = export(qad_run, "hf-nvfp4", tmp_path / "nvfp4")
    assert_serving_files(out, qad_run.parent / "student")
    quant_config = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant_config["quant_algo"] == "NVFP4" and quant_config["group_size"] == 16
    assert "lm_head" in quant_config["exclude_modules"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16  # unquantized layers in bf16
    student = load_student(read_source(qad_run, None, "hf-nvfp4"), "cpu", quantized=True)
    for layer_index in (0, 3):
        block = f"layers.{layer_index}"
        for name in (f"{block}.self_attn.o_proj", f"{block}.mlp.down_proj"):
            layer = student.get_submodule(name)
            packed = tensors[f"model.{name}.weight"]
            assert packed.dtype == torch.uint8 and packed.shape == (layer.out_features, layer.in_features // 2)
            with torch.no_grad():
                fake_quantized = layer.weight_quantizer(layer.weight)
            torch.testing.assert_close(dequantize(tensors, name, layer.weight.shape), fake_quantized, rtol=0, atol=0)
            torch.testing.assert_close(tensors[f"model.{name}.input_scale"],
                                       layer.input_quantizer.amax.float() / (6.0 * 448.0))
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            layers = {name: student.get_submodule(f"{block}.{name}") for name in group}
            shared = max(layer.weight_quantizer.amax.float() for layer in layers.values()) / (6.0 * 448.0)
            for name, layer in layers.items():
                full = f"{block}.{name}"
                torch.testing.assert_close(tensors[f"model.{full}.weight_scale_2"], shared)
                q, scale, scale_2 = NVFP4QTensor.quantize(layer.weight.detach().clone(), 16,
                                                          weights_scaling_factor_2=shared)
                expected = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
                torch.testing.assert_close(dequantize(tensors, full, layer.weight.shape), expected, rtol=0, atol=0)
