"""ParallelLayout: the job's ranks and sizes, computed once (train/parallel/layout.py)."""

from types import SimpleNamespace

import pytest

from train.parallel import ParallelLayout


def parallel_cfg(tp=1, ep=1):
    return SimpleNamespace(tensor_parallel_size=tp, expert_parallel_size=ep, pipeline_parallel_size=1)


def test_one_process_has_no_mesh():
    layout = ParallelLayout.build(SimpleNamespace(world_size=1, rank=0, device="cpu"), parallel_cfg())
    assert layout.mesh is None and layout.is_main
    assert (layout.dp_rank, layout.dp_size, layout.tp, layout.ep, layout.edp_size) == (0, 1, 1, 1, 1)


def test_one_process_refuses_tp():
    with pytest.raises(ValueError, match="TP_SIZE=2 needs 2 processes"):
        ParallelLayout.build(SimpleNamespace(world_size=1, rank=0, device="cpu"), parallel_cfg(tp=2))


@pytest.mark.parametrize("rank, dp_rank", [(0, 0), (1, 0), (2, 1), (5, 2), (7, 3)])
def test_data_parallel_rank_is_rank_over_tp(rank, dp_rank):
    """Rank r sits at (r // tp, r % tp) of the (dp, tp) mesh."""
    layout = ParallelLayout(world_size=8, rank=rank, tp=2, ep=2, device="cpu")
    assert layout.dp_rank == dp_rank and layout.dp_size == 4 and layout.edp_size == 2
    assert layout.is_main == (rank == 0)


@pytest.mark.parametrize("rank, pp_rank, dp_rank", [(0, 0, 0), (1, 0, 0), (2, 0, 1), (3, 0, 1), (4, 1, 0), (7, 1, 1)])
def test_pipeline_stages_are_outermost(rank, pp_rank, dp_rank):
    """PP 2 x DP 2 x TP 2: rank r sits at (r // 4, (r // 2) % 2, r % 2) of the (pp, dp, tp) mesh."""
    layout = ParallelLayout(world_size=8, rank=rank, tp=2, ep=1, device="cpu", pp=2)
    assert (layout.pp_rank, layout.dp_rank, layout.dp_size) == (pp_rank, dp_rank, 2)


def test_sizes_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match="does not split"):
        ParallelLayout(world_size=6, rank=0, tp=4, ep=1, device="cpu")
    with pytest.raises(ValueError, match="does not split"):
        ParallelLayout(world_size=6, rank=0, tp=1, ep=4, device="cpu")
    with pytest.raises(ValueError, match="does not split"):
        ParallelLayout(world_size=6, rank=0, tp=1, ep=1, device="cpu", pp=4)


def test_frozen():
    layout = ParallelLayout(world_size=2, rank=1, tp=1, ep=1, device="cpu")
    with pytest.raises(AttributeError):
        layout.rank = 0
