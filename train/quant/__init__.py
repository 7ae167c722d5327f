"""Quantization: recipes by name (modelopt mtq.quantize + calibration), quantizer state for
checkpoints, pure-PyTorch NVFP4 fake quantization and its modelopt backend.

Imports are lazy so that ``import train.quant`` does not import modelopt.
"""

__all__ = [
    "BACKEND_NAME",
    "nvfp4_backend_config",
    "nvfp4_fake_quant",
    "nvfp4_fake_quant_forward",
    "register_cpu_nvfp4_backend",
    "RECIPES",
    "quantize_model",
    "quantizer_state",
    "restore_quantizer_state",
    "register_grouped_experts",
]

_WHERE = {
    "nvfp4_fake_quant": ".nvfp4",
    "nvfp4_fake_quant_forward": ".nvfp4",
    "BACKEND_NAME": ".backend",
    "nvfp4_backend_config": ".backend",
    "register_cpu_nvfp4_backend": ".backend",
    "RECIPES": ".recipes",
    "quantize_model": ".recipes",
    "quantizer_state": ".recipes",
    "restore_quantizer_state": ".recipes",
    "register_grouped_experts": ".experts",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
