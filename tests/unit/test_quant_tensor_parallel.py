"""What a quantized student must satisfy before tensor parallelism splits it (one process, no mesh):
`python -m pytest -q tests/unit/test_quant_tensor_parallel.py`. The split itself: tests/integration/test_tp_quant.py."""

import dataclasses

import modelopt.torch.quantization  # noqa: F401  required: fails, never skips
import pytest
import torch

from train.models import build_model, get_model_args, init_weights
from train.parallel.tensor_parallel import check_quantized_split
from train.quant import quantize_model


def debug_model(**shape):
    """debug-qwen3 (hidden 64, 4 heads of 16, MLP 192) with `shape` overrides."""
    args = dataclasses.replace(get_model_args("debug-qwen3"), **shape)
    return init_weights(build_model(args, device="cpu"), 1)


def calibration():
    return [torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))]


def test_nvfp4_blocks_must_not_straddle_the_rowwise_split():
    # MLP 200 over TP 2: down_proj's input shard is 100 wide, 6.25 blocks of 16
    model = quantize_model(debug_model(intermediate_size=200), "nvfp4", calibration())
    with pytest.raises(ValueError, match=r"TP_SIZE=2 splits the input dim of model\.layers\.0\.mlp\.down_proj\."
                                         r"input_quantizer \(200\) into shards of 100, not a multiple of the "
                                         r"quantization block size 16"):
        check_quantized_split(model, 2)
    check_quantized_split(quantize_model(debug_model(intermediate_size=224), "nvfp4", calibration()), 2)  # 112


def test_fp8_has_no_blocks_to_align():
    check_quantized_split(quantize_model(debug_model(intermediate_size=200), "fp8", calibration()), 2)


def test_tensor_parallel_needs_a_calibrated_input_amax():
    model = quantize_model(debug_model(), "nvfp4", None)  # weights only: inputs keep a dynamic amax
    with pytest.raises(ValueError, match=r"quantizer model\.layers\.0\.self_attn\.o_proj\.input_quantizer has no "
                                         r"calibrated amax.*quant\.calibration_batches >= 1"):
        check_quantized_split(model, 2)


def test_rowwise_output_quantizer_is_refused():
    model = quantize_model(debug_model(), "nvfp4", calibration())
    check_quantized_split(model, 2)
    model.layers[1].mlp.down_proj.output_quantizer.enable()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.output_quantizer is enabled.*partial sums"):
        check_quantized_split(model, 2)


def test_unquantized_model_passes():
    check_quantized_split(debug_model(intermediate_size=200), 2)
