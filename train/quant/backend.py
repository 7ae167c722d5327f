"""Plug the pure-PyTorch NVFP4 fake quantization (train.quant.nvfp4) into nvidia-modelopt.

How modelopt 0.47 dispatches: ``TensorQuantizer._fake_quantize`` first checks the quantizer's
``backend`` attribute (a config field, ``None`` by default); if set it calls the backend registered
under that name with ``register_quant_backend`` as ``entrypoint(inputs, quantizer)`` and returns its
result. The choice is by name per quantizer, never by device, so ``register_quant_backend`` alone
does not change what the stock ``mtq.NVFP4_DEFAULT_CFG`` does. Otherwise NVFP4 goes through
``DynamicBlockQuantizationFunction`` (identity or clipped-STE backward) into the torch op
``tensorrt::dynamic_block_quantize_op``, whose CPU and CUDA kernels are the same Python function
that asserts ``amax.is_cuda`` and launches Triton or a CUDA extension.

``register_cpu_nvfp4_backend()`` therefore does two things:

1. registers the backend ``"train_nvfp4"`` (CPU tensors: our implementation; CUDA tensors:
   modelopt's own kernel, unless ``pytorch_on_cuda=True``); select it with
   ``nvfp4_backend_config()``, which adds ``"backend": "train_nvfp4"`` to the NVFP4 entries of a
   config;
2. (``patch_cpu_op=True``, default) overrides the **CPU** kernel of
   ``tensorrt::dynamic_block_quantize_op`` with our implementation for the NVFP4 format
   (E2M1 values, E4M3 scales), so the unmodified ``mtq.NVFP4_DEFAULT_CFG`` works on a CPU model.
   Other formats fall through to modelopt's original function; CUDA tensors are untouched.

Both are idempotent. The CPU numerics are those of modelopt's fake-quant kernel
(``reference="kernel"`` in train.quant.nvfp4).
"""

from __future__ import annotations

import copy
import threading
import warnings

import torch

from .nvfp4 import nvfp4_fake_quant, nvfp4_fake_quant_forward

__all__ = [
    "BACKEND_NAME",
    "is_nvfp4_quantizer",
    "nvfp4_backend_config",
    "register_cpu_nvfp4_backend",
]

BACKEND_NAME = "train_nvfp4"
_OP_NAME = "dynamic_block_quantize_op"
# (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) as the torch op receives them.
_NVFP4_OP_ARGS = (4, 2, 8, 4)

_lock = threading.Lock()
_state: dict = {"backend": False, "pytorch_on_cuda": False, "lib": None}


def is_nvfp4_quantizer(quantizer) -> bool:
    """True for a dynamic NVFP4 TensorQuantizer (E2M1 values, E4M3 per-block scales)."""
    bs = getattr(quantizer, "block_sizes", None)
    return (
        tuple(getattr(quantizer, "num_bits", ()) or ()) == (2, 1)
        and isinstance(bs, dict)
        and bs.get("type") == "dynamic"
        and tuple(bs.get("scale_bits") or ()) == (4, 3)
    )


def _block_size(quantizer, inputs) -> int:
    bs = quantizer.block_sizes
    size = bs.get(-1) or bs.get(inputs.dim() - 1)
    if size is None:
        raise ValueError("block size for dynamic quantization not found.")
    return size


def _backend_entrypoint(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """modelopt backend: ``(inputs, TensorQuantizer) -> fake-quantized inputs``."""
    if not is_nvfp4_quantizer(quantizer):
        raise NotImplementedError(
            f"backend {BACKEND_NAME!r} only implements dynamic NVFP4 (num_bits=(2, 1), "
            f"scale_bits=(4, 3)); got num_bits={quantizer.num_bits}, "
            f"block_sizes={quantizer.block_sizes}"
        )
    amax = quantizer._get_amax(inputs)
    block_size = _block_size(quantizer, inputs)
    pass_through = getattr(quantizer, "_pass_through_bwd", True)
    if inputs.is_cuda and not _state["pytorch_on_cuda"]:
        from modelopt.torch.quantization.tensor_quant import dynamic_block_quant

        return dynamic_block_quant(
            inputs,
            block_size,
            amax,
            quantizer._get_bias(inputs),
            quantizer.num_bits,
            quantizer.block_sizes["scale_bits"],
            getattr(quantizer, "_trt_high_precision_dtype", None),
            getattr(quantizer, "_onnx_quantizer_type", None),
            pass_through,
        )
    return nvfp4_fake_quant(inputs, amax, pass_through_bwd=pass_through, block_size=block_size)


def _install_cpu_op() -> None:
    from modelopt.torch.quantization import tensor_quant

    original = tensor_quant._dynamic_block_quantize_impl

    def cpu_dynamic_block_quantize(
        inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
    ):
        if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == _NVFP4_OP_ARGS:
            return nvfp4_fake_quant_forward(inputs, amax, block_size=block_size)
        return original(
            inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
        )

    if not hasattr(torch.ops.tensorrt, _OP_NAME):
        raise RuntimeError(
            f"modelopt did not register torch.ops.tensorrt.{_OP_NAME}; cannot patch its CPU kernel"
        )
    lib = torch.library.Library("tensorrt", "IMPL")  # noqa: TOR901 - kept alive in _state
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        lib.impl(_OP_NAME, cpu_dynamic_block_quantize, "CPU", allow_override=True)
    _state["lib"] = lib


def register_cpu_nvfp4_backend(*, patch_cpu_op: bool = True, pytorch_on_cuda: bool = False) -> str:
    """Register the CPU NVFP4 fake-quant with modelopt (idempotent); returns the backend name.

    ``patch_cpu_op``: also make the stock ``mtq.NVFP4_DEFAULT_CFG`` work on CPU tensors (by
    overriding the CPU kernel of ``torch.ops.tensorrt.dynamic_block_quantize_op``).
    ``pytorch_on_cuda``: the named backend uses the pure-PyTorch code for CUDA tensors too
    (default: modelopt's Triton/CUDA kernel).
    """
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    with _lock:
        _state["pytorch_on_cuda"] = pytorch_on_cuda
        if not (_state["backend"] and is_registered_quant_backend(BACKEND_NAME)):
            register_quant_backend(BACKEND_NAME, _backend_entrypoint)
            _state["backend"] = True
        if patch_cpu_op and _state["lib"] is None:
            _install_cpu_op()
    return BACKEND_NAME


def nvfp4_backend_config(cfg: dict | None = None) -> dict:
    """Deep copy of ``cfg`` (default ``mtq.NVFP4_DEFAULT_CFG``) whose NVFP4 quantizer entries use ``"train_nvfp4"``."""
    if cfg is None:
        import modelopt.torch.quantization as mtq

        cfg = mtq.NVFP4_DEFAULT_CFG
    cfg = copy.deepcopy(cfg)

    def patch(attrs):
        if isinstance(attrs, list):
            for a in attrs:
                patch(a)
        elif isinstance(attrs, dict) and tuple(attrs.get("num_bits") or ()) == (2, 1):
            bs = attrs.get("block_sizes") or {}
            if bs.get("type") == "dynamic" and tuple(bs.get("scale_bits") or ()) == (4, 3):
                attrs["backend"] = BACKEND_NAME

    quant_cfg = cfg.get("quant_cfg", {})
    entries = quant_cfg.values() if isinstance(quant_cfg, dict) else quant_cfg
    for entry in entries:
        if isinstance(entry, dict) and "cfg" in entry and "quantizer_name" in entry:
            patch(entry["cfg"])
        else:
            patch(entry)
    return cfg
