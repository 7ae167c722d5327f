"""parallelize(model, parallel_cfg, mesh, device): torchtitan's order, applied to a built model.

    python -m pytest tests/integration/test_parallel.py

0. pipeline parallelism (PP_SIZE > 1): this rank's stage of the model, pipeline.py split_model
1. tensor parallelism (TP_SIZE > 1): DTensor plans, tensor_parallel.py (MoE layers replicated),
   then expert parallelism (EP_SIZE > 1): experts split over "ep", all-to-all, expert_parallel.py
2. activation checkpointing per block (parallel.activation_checkpointing): recompute in backward
3. torch.compile per block (parallel.compile): after AC so the recomputation is compiled too
4. data parallelism over "dp" (parallel.data_parallel): ddp | fsdp | fsdp_zero2 | zero1;
   FSDP goes last so that it shards the TP-split, checkpointed, compiled blocks; expert
   weights (EP > 1) stay out of DDP/FSDP: expert_parallel.reduce_expert_gradients
A model built on the meta device gets its weights from `materialize(model)` (sharded loading,
train/parallel/sharded_load.py): after FSDP2 has sharded it, before DDP wraps it (DDP broadcasts
rank 0's tensors, which must exist).
"""

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh

from train.config import ParallelConfig
from train.parallel.checks import check_engine_support, check_parallel_settings, fsdp_mixed_precision_on
from train.parallel.data_parallel import apply_ddp, apply_fsdp
from train.parallel.expert_parallel import apply_expert_parallel, expert_parameters
from train.parallel.mesh import data_parallel_mesh
from train.parallel.pipeline import split_model
from train.parallel.tensor_parallel import apply_tensor_parallel

log = logging.getLogger("train")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Each block keeps only its input; activations inside are recomputed during backward.

    checkpoint_wrapper inserts `_checkpoint_wrapped_module.` into names, and strips it again from
    state dicts (and DCP's FQNs), so checkpoints keep the HF names.
    """
    for name, block in list(model.layers.named_children()):  # by name: a pipeline stage's indices have gaps
        # No dropout in these models: nothing random to replay, so no RNG state to stash.
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def apply_compile(model: nn.Module) -> None:
    """Compiles each block in place (module names unchanged); the blocks, alike but for their
    parameters (graph inputs), reuse one compiled graph instead of compiling the whole model."""
    for block in model.layers:
        block.compile()


def parallelize(model: nn.Module, parallel_cfg: ParallelConfig, mesh: DeviceMesh | None, device: str,
                materialize: Callable[[nn.Module], object] | None = None, precision: str = "fp32",
                initialize: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Returns the model to train: `model` itself (TP, FSDP), or a DDP wrapper around it.
    materialize: fills a meta-device model's weights once each rank knows its part (None: the
    model already holds them). initialize: fills a meta-device model's weights right after the
    pipeline split, before any other layout (a stage initializes its own blocks only:
    train/models/build.py init_weights). precision: training.precision (bf16 on CUDA turns
    FSDP2's MixedPrecisionPolicy on when parallel.fsdp_mixed_precision is auto)."""
    world_size = mesh.size() if mesh is not None else 1
    check_parallel_settings(parallel_cfg, getattr(model, "args", None), world_size)
    check_engine_support(parallel_cfg)
    tp = mesh["tp"].size() if mesh is not None else 1
    dp_mesh = data_parallel_mesh(mesh) if mesh is not None else None
    dp = dp_mesh.size() if mesh is not None else 1
    ep = parallel_cfg.expert_parallel_size
    pp = mesh["pp"].size() if mesh is not None and "pp" in mesh.mesh_dim_names else 1
    if pp > 1:
        model = split_model(model, parallel_cfg, mesh["pp"].get_local_rank())
    if initialize is not None:
        initialize(model)
    if tp > 1:
        if any("lora_" in name for name, _ in model.named_parameters()):
            raise NotImplementedError("TP_SIZE > 1 with LoRA adapters: the TP plans cover plain Linear "
                                      "layers only; use TP_SIZE=1 (FSDP or DDP) for fine-tuning")
        apply_tensor_parallel(model, mesh["tp"])
    if ep > 1:
        edp = mesh["edp"] if mesh["edp"].size() > 1 else None
        apply_expert_parallel(model, mesh["ep"], edp, dp)
    strategy = parallel_cfg.data_parallel
    fsdp = dp > 1 and strategy in ("fsdp", "fsdp_zero2")
    if materialize is not None and not fsdp:  # to_empty makes new parameters: before `experts`
        materialize(model)
    experts = set(expert_parameters(model))  # kept out of DDP/FSDP (EP > 1)
    if parallel_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if parallel_cfg.compile:
        apply_compile(model)
    if fsdp:
        model = apply_fsdp(model, dp_mesh, reshard_after_forward=strategy == "fsdp", ignored=experts,
                           mixed_precision=fsdp_mixed_precision_on(parallel_cfg.fsdp_mixed_precision, precision,
                                                                   torch.device(device).type == "cuda"))
        if materialize is not None:
            materialize(model)
    elif dp > 1 and pp == 1:  # ddp, zero1 (the optimizer shards its state: data_parallel.py)
        model = apply_ddp(model, dp_mesh, device, ignored=experts)
    # PP x ddp: no DDP wrapper; the pipeline averages the stage's gradients itself (pipeline.py)
    log.info("parallelism: pp %d x dp %d (%s) x tp %d x ep %d; activation checkpointing %s, compile %s", pp, dp,
             strategy, tp, ep,
             "on" if parallel_cfg.activation_checkpointing else "off", "on" if parallel_cfg.compile else "off")
    return model


def parallelize_frozen(model: nn.Module, parallel_cfg: ParallelConfig, mesh: DeviceMesh | None,
                       materialize: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """A frozen model (the QAD teacher) laid out like the student: the same TP split and expert
    split (EP), and FSDP2 sharding when the student uses FSDP (the teacher's weights then cost
    1/dp per rank). Under ddp/zero1 it stays replicated: DDP has nothing to do for a model
    without gradients. materialize: as for parallelize, called once the layout is complete."""
    tp = mesh["tp"].size() if mesh is not None else 1
    dp_mesh = data_parallel_mesh(mesh) if mesh is not None else None
    dp = dp_mesh.size() if mesh is not None else 1
    ep = parallel_cfg.expert_parallel_size
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if ep > 1:
        apply_expert_parallel(model, mesh["ep"], mesh["edp"] if mesh["edp"].size() > 1 else None, dp)
    if dp > 1 and parallel_cfg.data_parallel in ("fsdp", "fsdp_zero2"):
        # no backward: free each block's gathered weights right after its forward
        model = apply_fsdp(model, dp_mesh, reshard_after_forward=True, ignored=set(expert_parameters(model)))
    if materialize is not None:
        materialize(model)
    return model
