"""Quantization recipes by name, applied with modelopt's ``mtq.quantize`` and a calibration loop.

    recipe          modelopt config              what is fake-quantized
    nvfp4           NVFP4_DEFAULT_CFG            weights and inputs of every linear layer
    nvfp4_mlp_only  NVFP4_MLP_ONLY_CFG           weights and inputs of the MLP linears only
    fp8             FP8_DEFAULT_CFG              weights and inputs, per-tensor E4M3

Each config keeps modelopt's default exclusions (lm_head, routers and MoE gates, embeddings,
...): quantizers matching them are created disabled. Calibration is modelopt's ``max``
algorithm: weight amax from the weights, input amax from forward passes over the calibration
batches; with torch.distributed initialized modelopt all-reduces every amax with MAX over the
world, so all ranks end up with the same quantizers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # torch stays out of the import: the launch plan checks recipe names torch-free
    import torch

log = logging.getLogger("train")

# our name -> attribute of modelopt.torch.quantization (configs/quant/<name>.yaml select them)
RECIPES = {
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "nvfp4_mlp_only": "NVFP4_MLP_ONLY_CFG",
    "fp8": "FP8_DEFAULT_CFG",
}


def recipe_config(recipe: str) -> dict:
    """The modelopt quantization config for one of our recipe names."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r} (quant.recipe / QUANT_RECIPE); "
                         f"known: {', '.join(RECIPES)}")
    import modelopt.torch.quantization as mtq

    return getattr(mtq, RECIPES[recipe])


def model_device(model: torch.nn.Module) -> torch.device:
    import torch

    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def register_modules(model: torch.nn.Module) -> None:
    """What modelopt needs to know before it converts `model`: our CPU NVFP4 kernel (modelopt's
    is CUDA-only; same numerics) and the QuantModule of our grouped MoE experts."""
    from train.quant.experts import register_grouped_experts

    if model_device(model).type == "cpu":
        from train.quant.backend import register_cpu_nvfp4_backend

        register_cpu_nvfp4_backend()
    register_grouped_experts()


def quantizer_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(enabled, disabled) TensorQuantizers in the model."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    enabled = sum(1 for q in quantizers if q.is_enabled)
    return enabled, len(quantizers) - enabled


def rank_zero_prints():
    """modelopt prints ("Inserted N quantizers") on every rank: only rank 0's reach stdout."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return contextlib.redirect_stdout(io.StringIO())
    return contextlib.nullcontext()


def reshard(model: torch.nn.Module) -> None:
    """FSDP2 keeps the root's weights gathered after a forward that no backward follows (the
    calibration's): shard them again, or the optimizer would get the gathered tensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def quantize_model(model: torch.nn.Module, recipe: str,
                   calibration_batches: Iterable[torch.Tensor] | None = None, forward=None,
                   sync_group=None) -> torch.nn.Module:
    """Fake-quantizes `model` in place with the named recipe; returns it.

    calibration_batches: token ids (B, T) on any device (moved to the model's). None or empty:
    weight amax only; input quantizers then keep no amax and quantize dynamically per tensor.
    Call on the single-device model before DDP, or on one laid out by FSDP2, TP, EP or PP (every
    amax then equals the whole model's: tests/integration/test_sharded_load.py,
    test_pipeline_qad.py). forward(model, tokens): one calibration forward (None: model(tokens);
    a pipeline stage's: pipeline.py forward_logits). sync_group: the ranks whose amax modelopt
    MAX-reduces after calibration (None: all; a pipeline stage's ranks under PP, whose quantizers
    are not the other stages').
    """
    config = recipe_config(recipe)  # unknown names fail here, before modelopt is touched
    import modelopt.torch.quantization as mtq
    import torch

    device = model_device(model)
    register_modules(model)
    batches = list(calibration_batches or [])

    def forward_loop(module: torch.nn.Module) -> None:
        from train.parallel.tensor_parallel import rowwise_computed_whole

        if sync_group is not None:  # modelopt set each QuantModule's groups (the world) as it converted them
            from modelopt.torch.quantization.nn import QuantModule
            from modelopt.torch.utils.distributed import ParallelState

            for quantized in module.modules():
                if isinstance(quantized, QuantModule):
                    quantized.parallel_state = ParallelState(data_parallel_group=sync_group)
        with torch.no_grad(), rowwise_computed_whole(module):  # under TP: one device's activations
            for index, tokens in enumerate(batches):
                started = time.time()
                if forward is None:
                    module(tokens.to(device))
                else:
                    forward(module, tokens.to(device))
                log.info("calibration batch %d/%d %s: %.2f s", index + 1, len(batches),
                         tuple(tokens.shape), time.time() - started)

    started = time.time()
    with rank_zero_prints():
        model = mtq.quantize(model, config, forward_loop if batches else None)
    reshard(model)
    enabled, disabled = quantizer_counts(model)
    log.info("quantized with recipe %s (%s) in %.1f s over %d calibration batches: "
             "%d quantizers enabled, %d disabled", recipe, RECIPES[recipe], time.time() - started,
             len(batches), enabled, disabled)
    return model


def quantizer_state(model: torch.nn.Module) -> dict:
    """modelopt's record of how the model was converted (recipe config, quantizer attributes;
    no amax values: those are buffers in the model's state dict)."""
    import modelopt.torch.opt as mto

    return mto.modelopt_state(model)


def restore_quantizer_state(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """Re-creates the quantizers of `state` on an unquantized model (amax buffers with placeholder
    values, filled when the model's state dict is loaded). No calibration runs."""
    import modelopt.torch.opt as mto

    register_modules(model)
    with rank_zero_prints():
        return mto.restore_from_modelopt_state(model, state)
