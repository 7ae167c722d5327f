"""The QAD student's quantizers: calibrated at the start of a run, restored from the checkpoint on resume.

    python -m pytest -q tests/integration/test_qad.py

Fresh run (no tracker file): the student loaded from STUDENT_CKPT is fake-quantized with
quant.recipe, calibrating on quant.calibration_batches micro-batches of the training dataset
(samples 0, 1, 2, ...: the same on every rank, so the amax does not depend on the number of
ranks; modelopt all-reduces it with MAX anyway). Under FSDP2 (any TP, EP) and under TP the
student is loaded sharded and quantized as laid out (train/engine.py loads_sharded; under TP the
rowwise Linears compute whole during calibration, train/parallel/tensor_parallel.py
rowwise_computed_whole, so every amax is one process's); under PP each stage reads its blocks and
calibrates them on the activations the stage before sends (forward_logits), modelopt's amax
reduction over the stage's ranks, and the record joins the stages' (whole_record); under
DDP/zero1 without PP whole, before parallelize.

Resume: the quantizers are re-created from the checkpoint's `quantizer_state.pt` before the
weights are loaded; the amax values are buffers of the model's state dict (DCP, next to the
weights, e.g. `model.layers.0.mlp.up_proj.input_quantizer._amax`), so nothing is calibrated
again and the resumed run computes exactly what the uninterrupted one would have.

    iter_0000200/quantizer_state.pt   {"recipe": "nvfp4",
                                       "modelopt_state": mto.modelopt_state(model)}  (rank 0)
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from train.config import JobConfig

log = logging.getLogger("train")
QUANTIZER_STATE_FILE = "quantizer_state.pt"  # in each iter_XXXXXXX/ of a quantized run
NO_QUANTIZATION = "none"  # quant.recipe=none: plain distillation, full-precision student


def calibration_batches(dataset, count: int, micro_batch_size: int) -> list[torch.Tensor]:
    """`count` batches of token ids (MBS, T): the inputs of dataset samples 0 .. count x MBS - 1."""
    batches = []
    for first in range(0, count * micro_batch_size, micro_batch_size):
        tokens = np.stack([dataset[i]["tokens"][:-1] for i in range(first, first + micro_batch_size)])
        batches.append(torch.from_numpy(tokens.astype(np.int64)))
    return batches


def load_quantizer_state(checkpoint_dir: str | Path) -> dict | None:
    """The checkpoint's quantizer record, or None when the run was not quantized."""
    path = Path(checkpoint_dir) / QUANTIZER_STATE_FILE
    return torch.load(path, weights_only=False) if path.is_file() else None


def prepare_student(model: torch.nn.Module, cfg: JobConfig, resume_dir: str | None, dataset=None, layout=None,
                    recipe: str | None = None):
    """Quantizes the student: the whole one before parallelize, or one already laid out (FSDP2,
    TP, EP: sharded loading, train/engine.py loads_sharded; a LoRA base with its adapters
    hidden). Returns (model, record): record is what every checkpoint stores as
    quantizer_state.pt (None without quantization); modelopt names
    the quantizers without wrapper prefixes (`_checkpoint_wrapped_module.` of activation
    checkpointing), so the record is the same either way and restores on either model.

    resume_dir: the checkpoint being resumed (quantizers restored, no calibration), or None.
    layout: the job's train.parallel.ParallelLayout (its TP size; None: one process, TP 1).
    recipe: cfg.quant.recipe unless given (a LoRA job's quantized base: lora.quantized_base).
    """
    from train.quant.recipes import quantize_model, quantizer_state, restore_quantizer_state

    recipe = str(cfg.quant.recipe if recipe is None else recipe)
    saved = load_quantizer_state(resume_dir) if resume_dir else None
    if resume_dir and (saved or {}).get("recipe", NO_QUANTIZATION) != recipe:
        saved_recipe = (saved or {}).get("recipe", NO_QUANTIZATION)
        raise ValueError(f"checkpoint {resume_dir} was trained with quant.recipe={saved_recipe}, this run has "
                         f"quant.recipe={recipe} (QUANT_RECIPE): use the same recipe to resume, or another run dir")
    if recipe == NO_QUANTIZATION:
        return model, None
    staged = layout is not None and layout.pp > 1  # `model` is this rank's pipeline stage (sharded load)
    if saved:
        modelopt_state = stage_record(saved["modelopt_state"], model) if staged else saved["modelopt_state"]
        model = restore_quantizer_state(model, modelopt_state)
        log.info("quantizer state (%s) restored from %s; no calibration", recipe, resume_dir)
    else:
        batches = calibration_batches(dataset, cfg.quant.calibration_batches, cfg.training.micro_batch_size)
        if staged:
            from train.parallel.pipeline import forward_logits, stage_group

            def through_the_stages(stage, tokens):  # each stage on the activations of the one before
                forward_logits(stage, layout, tokens)

            model = quantize_model(model, recipe, batches, forward=through_the_stages,
                                   sync_group=stage_group(layout))
        else:
            model = quantize_model(model, recipe, batches)
    tp = layout.tp if layout is not None else 1
    if tp > 1:  # the quantizers split with their Linears: fail here, before training
        from train.parallel.tensor_parallel import check_quantized_split

        check_quantized_split(model, tp)
    modelopt_state = quantizer_state(model)
    return model, {"recipe": recipe, "modelopt_state": whole_record(modelopt_state, layout) if staged
                   else modelopt_state}


def record_quantizers(modelopt_state: dict) -> list[dict]:
    """Each modelopt mode's {quantizer name: attributes} in a record (quantize, then calibrate)."""
    return [entry["metadata"]["quantizer_state"] for _, entry in modelopt_state["modelopt_state_dict"]]


def stage_record(modelopt_state: dict, model: torch.nn.Module) -> dict:
    """The whole student's record cut to the quantizers of `model`, an unquantized pipeline stage
    (modelopt's restore refuses names the model lacks): those whose module (the name before
    `.input_quantizer` etc.) the stage holds; wrapper prefixes dropped, as modelopt names them."""
    from train.parallel.expert_parallel import state_dict_name

    modules = {state_dict_name(name) for name, _ in model.named_modules()}
    cut = copy.deepcopy(modelopt_state)
    for quantizers in record_quantizers(cut):
        for name in [name for name in quantizers if name.rsplit(".", 1)[0] not in modules]:
            del quantizers[name]
    return cut


def whole_record(modelopt_state: dict, layout) -> dict:
    """PP_SIZE > 1: a stage's record names its own quantizers only; the whole student's (what
    PP_SIZE=1 saves and restores, and each stage cuts again: stage_record) joins the ranks' entries,
    gathered over the "pp" group (modelopt's restore goes by name, not by order)."""
    import torch.distributed as dist

    stages: list[dict | None] = [None] * layout.pp
    dist.all_gather_object(stages, modelopt_state, group=layout.mesh["pp"].get_group())
    whole = copy.deepcopy(stages[0])
    for mode, quantizers in enumerate(record_quantizers(whole)):
        for stage in stages[1:]:
            quantizers.update(record_quantizers(stage)[mode])
    return whole
