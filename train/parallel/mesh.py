"""The job's DeviceMesh: ranks laid out as (dp, tp), TP innermost (same node, fastest links);
with EP_SIZE > 1 the data-parallel ranks split further into (edp, ep); with PP_SIZE > 1 the
pipeline stages go outermost: (pp, dp, tp) or (pp, edp, ep, tp).

    python -m pytest tests/integration/test_parallel.py -k mesh
"""

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def build_mesh(world_size: int, tp: int, device_type: str = "cpu", ep: int = 1, pp: int = 1) -> DeviceMesh | None:
    """A 2-D mesh of shape (world_size // tp, tp) named ("dp", "tp"); None for one process.

    Rank r sits at (r // tp, r % tp): the trainer's data-parallel rank (rank // TP) matches.
    With ep > 1: a 3-D mesh (dp // ep, ep, tp) named ("edp", "ep", "tp"), and "dp" the
    flattened (edp, ep), so data-parallel rank d is at (d // ep, d % ep): EP groups are ep
    consecutive data-parallel ranks (train/parallel/expert_parallel.py).
    With pp > 1: a 3-D mesh (pp, dp, tp) named ("pp", "dp", "tp"); stage s holds the ranks
    s x dp x tp to (s + 1) x dp x tp - 1; with ep > 1 too, (pp, dp // ep, ep, tp) named
    ("pp", "edp", "ep", "tp"): each stage's data-parallel ranks split as without PP.
    device_type: "cpu" (gloo) or "cuda" (nccl); the process group already exists.
    """
    if world_size == 1 or not dist.is_initialized():
        if pp > 1:
            raise ValueError(f"PP_SIZE={pp} needs {pp} processes at least, the job has {world_size}")
        if tp > 1 or ep > 1:
            sizes = f"TP_SIZE={tp}" if ep == 1 else f"TP_SIZE={tp} x EP_SIZE={ep}"
            raise ValueError(f"{sizes} needs {tp * ep} processes, the job has {world_size}")
        return None
    if world_size % tp:
        raise ValueError(f"TP_SIZE={tp} does not divide the world size {world_size}")
    if pp > 1 and world_size % (tp * pp):
        raise ValueError(f"TP_SIZE={tp} x PP_SIZE={pp} does not divide the world size {world_size}")
    dp = world_size // (tp * pp)
    stages, stage_names = ((pp,), ("pp",)) if pp > 1 else ((), ())  # outermost
    if ep == 1:
        return init_device_mesh(device_type, (*stages, dp, tp), mesh_dim_names=(*stage_names, "dp", "tp"))
    if dp % ep:
        raise ValueError(f"EP_SIZE={ep} does not divide the data-parallel size {dp}")
    mesh = init_device_mesh(device_type, (*stages, dp // ep, ep, tp), mesh_dim_names=(*stage_names, "edp", "ep", "tp"))
    data_parallel_mesh(mesh)  # creates the flattened "dp" group now, on every rank alike
    return mesh


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D "dp" mesh: a dimension of (dp, tp), or (edp, ep) flattened (made once, then cached)."""
    if "ep" in mesh.mesh_dim_names:
        return mesh["edp", "ep"]._flatten("dp")
    return mesh["dp"]
