"""Parallelism applied to a built model from outside (models never import torch.distributed).

    python -m pytest tests/unit/test_parallel_checks.py tests/integration/test_parallel.py

    layout.py           ParallelLayout: rank, pp/dp/tp/ep sizes, device and mesh, built once per job
    mesh.py             build_mesh: the ("dp", "tp") DeviceMesh (("edp", "ep", "tp") with EP, ("pp", ...) prepended with PP), once per job
    tensor_parallel.py  DTensor plans per family (colwise q/k/v/gate/up, rowwise o/down)
    expert_parallel.py  EP: experts split over "ep", all-to-all token dispatch, expert gradients
    data_parallel.py    ddp | fsdp | fsdp_zero2 | zero1 (and the ZeRO-1 optimizer), gradient_sync
    pipeline.py         PP: the model's stages (blocks split, names kept), 1F1B or interleaved 1F1B, clipping
    apply.py            parallelize: TP, then activation checkpointing, then compile, then DP
    sharded_load.py     load_hf_sharded: a meta model, laid out, reads each rank's part of an HF checkpoint
    checks.py           torch-free validation (the launch plan may call it)

Names resolve lazily so that `train.parallel.checks` stays importable without torch.
"""

_EXPORTS = {
    "ParallelLayout": "layout",
    "Pipeline": "pipeline",
    "build_mesh": "mesh",
    "parallelize": "apply",
    "parallelize_frozen": "apply",
    "load_hf_sharded": "sharded_load",
    "apply_tensor_parallel": "tensor_parallel",
    "wants_zero_redundancy_optimizer": "data_parallel",
    "build_zero_redundancy_optimizer": "data_parallel",
    "zero_redundancy_optimizer_state_dict": "data_parallel",
    "gradient_sync": "data_parallel",
    "apply_expert_parallel": "expert_parallel",
    "clip_gradients": "expert_parallel",
    "expert_checkpoint_view": "expert_parallel",
    "local_view": "expert_parallel",
    "check_parallel_settings": "checks",
    "check_engine_support": "checks",
    "ParallelSettingsError": "checks",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train.parallel' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"train.parallel.{_EXPORTS[name]}"), name)


__all__ = list(_EXPORTS)
