"""The job's DeviceMesh: ranks laid out as (dp, tp), TP innermost (same node, fastest links).

    python -m pytest tests/integration/test_parallel.py -k mesh
"""

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def build_mesh(world_size: int, tp: int, device_type: str = "cpu") -> DeviceMesh | None:
    """A 2-D mesh of shape (world_size // tp, tp) named ("dp", "tp"); None for one process.

    Rank r sits at (r // tp, r % tp): the trainer's data-parallel rank (rank // TP) matches.
    device_type: "cpu" (gloo) or "cuda" (nccl); the process group already exists.
    """
    if world_size == 1 or not dist.is_initialized():
        if tp > 1:
            raise ValueError(f"TP_SIZE={tp} needs {tp} processes, the job has {world_size}")
        return None
    if world_size % tp:
        raise ValueError(f"TP_SIZE={tp} does not divide the world size {world_size}")
    return init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
