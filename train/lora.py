"""LoRA on our CausalLM, applied from outside: adapters in, adapters merged out, quantized base.

    python -m pytest tests/unit/test_lora.py

- apply_lora(model, lora_cfg): peft's inject_adapter_in_model puts a LoRA layer around each
  target Linear (`q_proj` becomes a peft Linear holding `base_layer`, `lora_A.default`,
  `lora_B.default`); every other parameter freezes. lora_B starts at zero, so the model's
  output is unchanged until the first step.
- initial_adapters(model, rng_state): the values apply_lora gives the adapters, for adapters added
  on the meta device (the base loaded sharded under FSDP2, train/engine.py).
- adapters_hidden(model): a context in which each LoRA layer's parent holds the bare base layer,
  so a base loaded sharded with its adapters (train/engine.py sharded_model_path) is quantized
  exactly as a whole one before apply_lora: the same quantizers, names and quantizer record.
- merge_lora(model): folds W + (alpha / rank) * B @ A into each base weight and puts the plain
  Linear back: our CausalLM again, with the state-dict keys it had before apply_lora
  (save_hf and train.export take it as is).
- save_peft_adapters(model, lora_cfg, base, directory): the adapters alone as peft saves them
  (adapter_config.json + adapter_model.safetensors under transformers' module names), for
  `python -m train.export RUN_DIR --format peft`.
- apply_quantized_base(model, recipe, calibration_batches): fake-quantizes the frozen base with
  train.quant.quantize_model before the adapters go in (the job does it through
  train.quant.student.prepare_student, in train/engine.py add_adapters, so that a resumed or
  validating job restores the checkpoint's quantizers instead of calibrating again); the
  adapters added afterwards are plain Linear layers, and disable_lora_quantizers() switches off
  any quantizer that a later conversion might have put on them, so the LoRA path stays in full
  precision.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys

import torch
from torch import nn

from train.config import LoraConfig

log = logging.getLogger("train")
LORA_MARKER = "lora_"  # peft's parameter names: ...q_proj.lora_A.default.weight


def target_module_names(target_modules: str) -> list[str]:
    """"q_proj, v_proj" -> ["q_proj", "v_proj"] (the conf's LORA_TARGET_MODULES)."""
    return [name.strip() for name in str(target_modules).split(",") if name.strip()]


def check_lora_config(lora_cfg: LoraConfig) -> None:
    """ValueError naming the key, before any model is built."""
    if int(lora_cfg.rank) < 1:
        raise ValueError(f"lora.rank (LORA_RANK) = {lora_cfg.rank} must be at least 1")
    if float(lora_cfg.alpha) <= 0:
        raise ValueError(f"lora.alpha (LORA_ALPHA) = {lora_cfg.alpha} must be positive")
    if not 0.0 <= float(lora_cfg.dropout) < 1.0:
        raise ValueError(f"lora.dropout (LORA_DROPOUT) = {lora_cfg.dropout} must be in [0, 1)")
    if not target_module_names(lora_cfg.target_modules):
        raise ValueError("lora.target_modules (LORA_TARGET_MODULES) is empty")


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """peft LoRA adapters on the named linear layers; the base weights freeze."""
    from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

    check_lora_config(lora_cfg)
    targets = target_module_names(lora_cfg.target_modules)
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = [name for name in targets if name not in present]
    if unknown:
        raise ValueError(f"lora.target_modules (LORA_TARGET_MODULES): {', '.join(unknown)} not among the "
                         f"model's linear layers ({', '.join(sorted(present))})")
    config = PeftLoraConfig(r=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
                        target_modules=targets)
    model = inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = LORA_MARKER in name
        if parameter.requires_grad:  # peft gives the adapters the base's dtype; they train in fp32 on any base
            parameter.data = parameter.data.float()
    disable_lora_quantizers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d alpha %g dropout %g on %s: %d trainable parameters", lora_cfg.rank, lora_cfg.alpha,
             lora_cfg.dropout, ",".join(targets), trainable)
    return model


def initial_adapters(model: nn.Module, rng_state: torch.Tensor) -> dict[str, torch.Tensor]:
    """{adapter parameter name: the fp32 value apply_lora gives it when the CPU generator is at
    rng_state} for a model whose adapters apply_lora put on the meta device (a meta base).

    peft draws them on the CPU whatever the base's device, per LoRA layer in module order:
    nn.Linear(in, r) and nn.Linear(r, out) with their default init, then lora_A again (kaiming
    uniform, a = sqrt 5) and lora_B zeros (reset_lora_parameters). tests/unit/test_lora.py checks
    these against apply_lora on a real model, so a peft that draws otherwise fails there."""
    values = {}
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        for name, layer in lora_layers(model):
            for adapter in layer.active_adapters:
                (rank, inputs), (outputs, _) = layer.lora_A[adapter].weight.shape, layer.lora_B[adapter].weight.shape
                nn.Linear(inputs, rank, bias=False), nn.Linear(rank, outputs, bias=False)  # draws discarded
                values[f"{name}.lora_A.{adapter}.weight"] = nn.init.kaiming_uniform_(torch.empty(rank, inputs),
                                                                                     a=math.sqrt(5))
                values[f"{name}.lora_B.{adapter}.weight"] = torch.zeros(outputs, rank)
    return values


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, peft LoRA layer) pairs, outermost first."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


@contextlib.contextmanager
def adapters_hidden(model: nn.Module):
    """Inside: `q_proj` is its base Linear again (peft's layer set aside, its adapters untouched);
    after: the peft layer is back, around the same base object (modelopt converts a Linear in
    place, so a base quantized inside stays quantized). No-op without peft imported (no adapters)."""
    layers = lora_layers(model) if "peft" in sys.modules else []
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    try:
        yield model
    finally:
        for name, layer in layers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds the adapters into the base weights and removes them; returns the same model object.

    Each peft layer computes base(x) + scale * B(A(dropout(x))); merging sets
    W <- W + scale * B @ A (peft's own merge) and replaces the peft layer by its base Linear,
    so the state-dict keys are those of the model before apply_lora. Dropout is an identity
    in eval, so the merged model equals the adapted one in eval mode."""
    model = getattr(model, "module", model)  # a DDP wrapper: merge the model inside
    layers = lora_layers(model)
    if not layers:
        raise ValueError("merge_lora: the model has no LoRA layers")
    for name, layer in layers:
        with torch.no_grad():
            layer.merge(safe_merge=True)  # raises on a non-finite merged weight
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    for parameter in model.parameters():
        parameter.requires_grad = True
    log.info("merged %d LoRA layers into the base weights", len(layers))
    return model


def disable_lora_quantizers(model: nn.Module) -> int:
    """Switches off every modelopt quantizer inside a LoRA adapter (lora_A / lora_B); returns
    how many. The adapters train in full precision on top of the fake-quantized base."""
    disabled = 0
    for name, module in model.named_modules():
        if LORA_MARKER in name and type(module).__name__.endswith("TensorQuantizer") and hasattr(module, "disable"):
            module.disable()
            disabled += 1
    return disabled


def quantized_base_recipe(lora_cfg: LoraConfig) -> str:
    """lora.quantized_base as a quant recipe name: "none" when unset."""
    return str(lora_cfg.quantized_base) if lora_cfg.quantized_base else "none"


def check_quantized_base(lora_cfg: LoraConfig) -> None:
    """ValueError naming the key for a recipe train.quant does not know (before any model is built)."""
    from train.quant.recipes import RECIPES

    recipe = quantized_base_recipe(lora_cfg)
    if recipe != "none" and recipe not in RECIPES:
        raise ValueError(f"lora.quantized_base (QUANT_RECIPE) = {recipe!r}: unknown quantization recipe; "
                         f"known: {', '.join(RECIPES)}, none")


def apply_quantized_base(model: nn.Module, recipe: str, calibration_batches: list[torch.Tensor]) -> nn.Module:
    """Fake-quantizes the (still adapter-free) base with the quant recipe, calibrating amax on
    `calibration_batches` (token ids (B, T) each); the caller adds the adapters afterwards.
    (The fine-tuning job goes through train.quant.student.prepare_student, which also restores
    the quantizers of a checkpoint; this is the same quantization for a model in hand.)"""
    from train.quant import quantize_model

    model = quantize_model(model, recipe, calibration_batches)
    log.info("LoRA base quantized with recipe %s (%d calibration batches)", recipe, len(calibration_batches))
    return model


def peft_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under peft's saved names: base_model.model.<HF module>.lora_{A,B}.weight.

    Our module `layers.0.self_attn.q_proj` is transformers' `model.layers.0.self_attn.q_proj`
    (the family's HF renaming of its weight); families whose HF layout fuses or transposes a
    target (GPT-2's c_attn) have no one-to-one adapter and raise ValueError."""
    from train.models.hf_adapters import to_hf_state_dict

    model = getattr(model, "module", model)
    state = {}
    for name, layer in lora_layers(model):
        weight = layer.get_base_layer().weight
        try:
            renamed = to_hf_state_dict({f"{name}.weight": weight}, model.args)
        except (KeyError, ValueError):
            renamed = {}
        hf_key, hf_weight = next(iter(renamed.items()), (None, None))
        if len(renamed) != 1 or hf_weight.shape != weight.shape or not hf_key.endswith(".weight"):
            raise ValueError(f"peft export: {name} of the {model.args.family} family has no single HF module "
                             "of the same shape; export the merged model with --format hf")
        module = hf_key.removesuffix(".weight")
        for part in ("lora_A", "lora_B"):
            adapter = getattr(layer, part)[layer.active_adapters[0]].weight
            state[f"base_model.model.{module}.{part}.weight"] = adapter.detach().to("cpu").contiguous()
    return state


def save_peft_adapters(model: nn.Module, lora_cfg: LoraConfig, base_model: str, directory) -> None:
    """adapter_config.json + adapter_model.safetensors, the files PeftModel.from_pretrained reads."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    check_lora_config(lora_cfg)
    state = peft_adapter_state(model)
    config = LoraConfig(r=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
                        target_modules=target_module_names(lora_cfg.target_modules), task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model, bias="none")
    config.save_pretrained(str(directory))
    save_file(state, str(directory) + "/adapter_model.safetensors", metadata={"format": "pt"})
    log.info("saved %d LoRA adapter tensors for base %s", len(state), base_model)
