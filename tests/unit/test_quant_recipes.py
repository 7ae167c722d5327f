"""Recipes by name through modelopt on CPU: `python -m pytest -q tests/unit/test_quant_recipes.py`."""

import logging
import os
import socket

import modelopt.torch.quantization  # noqa: F401  required: fails, never skips
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.models import build_model, init_weights
from train.quant import RECIPES, quantize_model, quantizer_state, restore_quantizer_state


def tiny_model(seed: int = 1):
    return init_weights(build_model("tiny-qwen3", device="cpu"), seed)


def batches(seed: int, count: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2048, (2, 16), generator=generator) for _ in range(count)]


def quantizers(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: module for name, module in model.named_modules() if isinstance(module, TensorQuantizer)}


def amaxes(model) -> dict[str, torch.Tensor]:
    return {name: q.amax.clone() for name, q in quantizers(model).items() if q.is_enabled and q.amax is not None}


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown quantization recipe 'nvfp8'.*nvfp4, nvfp4_mlp_only, fp8"):
        quantize_model(tiny_model(), "nvfp8")


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_quantizes_and_keeps_default_exclusions(recipe, caplog):
    model = tiny_model()
    tokens = batches(0)[0]
    reference = model(tokens)
    with caplog.at_level(logging.INFO, logger="train"):
        quantize_model(model, recipe, batches(0))
    enabled = {name for name, q in quantizers(model).items() if q.is_enabled}
    assert not any(name.startswith("lm_head") for name in enabled)  # modelopt's exclusion
    assert not any("output_quantizer" in name for name in enabled)
    mlp = {n for n in enabled if ".mlp." in n}
    attention = {n for n in enabled if ".self_attn." in n}
    assert len(mlp) == 4 * 3 * 2  # 4 layers x (gate, up, down) x (weight, input)
    assert len(attention) == (0 if recipe == "nvfp4_mlp_only" else 4 * 4 * 2)
    assert all(q.amax is not None for name, q in quantizers(model).items() if name in enabled)
    logits = model(tokens)  # fake quantization changes the output, but not by much
    assert not torch.equal(logits, reference)
    assert (logits - reference).abs().max() < 0.5 * reference.abs().max()
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("calibration batch") for m in messages) == 2
    assert any(f"{len(enabled)} quantizers enabled" in m for m in messages)


def test_quantized_model_trains_on_cpu():
    model = quantize_model(tiny_model(), "nvfp4", batches(0))
    tokens = batches(1)[0]
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert model.layers[0].mlp.gate_proj.weight.grad.abs().sum() > 0  # straight-through gradients


def test_quantizer_state_restores_without_calibration():
    """The checkpoint path: state + state dict on a fresh model gives the same logits, no calibration."""
    model = quantize_model(tiny_model(1), "nvfp4", batches(0))
    state, weights = quantizer_state(model), model.state_dict()
    fresh = restore_quantizer_state(tiny_model(2), state)
    assert fresh.state_dict().keys() == weights.keys()
    fresh.load_state_dict(weights)
    tokens = batches(3)[0]
    assert torch.equal(fresh(tokens), model(tokens))
    assert all(torch.equal(a, b) for a, b in zip(amaxes(fresh).values(), amaxes(model).values()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calibrate_on_rank(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = quantize_model(tiny_model(1), "nvfp4", batches(seed=100 + rank))  # different data per rank
        results[rank] = amaxes(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing modelopt: ~1 min on 2 busy cores
def test_two_ranks_with_different_batches_get_identical_amax():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_calibrate_on_rank, args=(2, _free_port(), results), nprocs=2)
        rank0, rank1 = results[0], results[1]
    single = {rank: amaxes(quantize_model(tiny_model(1), "nvfp4", batches(seed=100 + rank))) for rank in (0, 1)}
    inputs = [name for name in rank0 if "input_quantizer" in name]
    assert inputs and rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    # the synced input amax is the max over both ranks' data, and the data did differ
    assert all(torch.equal(rank0[n], torch.maximum(single[0][n], single[1][n])) for n in inputs)
    assert any(not torch.equal(single[0][n], single[1][n]) for n in inputs)
