"""ParallelLayout: who this process is in the job's parallel layout, built once per job.

    python -m pytest tests/unit/test_parallel_layout.py

train/engine.py run_job builds it from the job context (train.launch.job.start_job) right after
the process group exists, and hands it to everything that needs a rank, a size or the mesh: the
parallelization, the trainer (data sharding, gradient accumulation), in-loop validation, the
QAD teacher (train/qad.py: laid out on the student's mesh) and the student's quantization.
Nothing recomputes the data-parallel rank from the global rank or reads TP_SIZE / EP_SIZE
from the config after this.

Rank r sits at (r // tp, r % tp) of the ("dp", "tp") mesh (train/parallel/mesh.py): its
data-parallel rank is r // tp. With EP_SIZE > 1 the data-parallel ranks split further into
(edp, ep). With PP_SIZE > 1 the mesh is (pp, dp, tp), pipeline stages outermost: rank r is
stage r // (dp x tp) and data-parallel rank (r // tp) % dp; the ranks of one pipeline read
the same micro-batches. Both: (pp, edp, ep, tp), a stage's data-parallel ranks split by EP.
"""

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh

from train.config import ParallelConfig


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    tp: int  # tensor-parallel size (TP_SIZE)
    ep: int  # expert-parallel size (EP_SIZE)
    device: str  # cpu | cuda:<local rank>
    mesh: DeviceMesh | None = None  # None for one process (or a job that parallelizes nothing)
    pp: int = 1  # pipeline-parallel size (PP_SIZE): stages

    def __post_init__(self):
        if (self.tp < 1 or self.ep < 1 or self.pp < 1 or self.world_size % (self.tp * self.pp)
                or self.dp_size % self.ep):
            raise ValueError(f"layout: world size {self.world_size} does not split into PP_SIZE={self.pp} x "
                             f"TP_SIZE={self.tp} x data-parallel ranks split by EP_SIZE={self.ep}")

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads its own micro-batches."""
        return self.world_size // (self.tp * self.pp)

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp_size

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.rank // (self.dp_size * self.tp)

    @property
    def edp_size(self) -> int:
        """Expert-data-parallel size: the replicas of each expert shard (dp / ep)."""
        return self.dp_size // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def build(cls, ctx, parallel_cfg: ParallelConfig, with_mesh: bool = True) -> "ParallelLayout":
        """From the job context (rank, world size, device) and cfg.parallel; builds the DeviceMesh
        (train/parallel/mesh.py build_mesh) unless with_mesh is False."""
        import torch

        from train.parallel.mesh import build_mesh

        tp, ep = int(parallel_cfg.tensor_parallel_size), int(parallel_cfg.expert_parallel_size)
        pp = int(parallel_cfg.pipeline_parallel_size)
        mesh = build_mesh(ctx.world_size, tp, torch.device(ctx.device).type, ep, pp) if with_mesh else None
        return cls(ctx.world_size, ctx.rank, tp, ep, ctx.device, mesh, pp)
