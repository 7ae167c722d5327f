"""Parallelism applied to a built model from outside (models never import torch.distributed)."""

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("train")


def apply_data_parallel(model: torch.nn.Module, parallel_cfg, device: str) -> torch.nn.Module:
    if parallel_cfg.tensor_parallel_size > 1 or parallel_cfg.pipeline_parallel_size > 1:
        raise NotImplementedError("TP_SIZE/PP_SIZE > 1 arrive with the trainer issue; use 1 for now")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if parallel_cfg.data_parallel != "ddp":
        raise ValueError(f"parallel.data_parallel={parallel_cfg.data_parallel!r}: only ddp for now")
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
