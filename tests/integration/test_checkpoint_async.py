"""python -m pytest tests/integration/test_checkpoint_async.py  (async save code path on 2 gloo ranks, forced on CPU)

On CPU the trainer saves synchronously; this forces CheckpointManager's async path (the one
used with CUDA) to check its own process group, the deferred publish and the reload.
Run directly by torchrun, the file is the worker.
"""

import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def worker(directory: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from train.checkpoint import CheckpointManager

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    manager = CheckpointManager(Path(directory), keep_last=2, async_save=True)
    manager._use_async = lambda: True
    weights = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for iteration in (1, 2, 3):
        manager.save(iteration, {"model": {"w": weights * iteration}}, {"iteration": iteration, "model_name": "m"})
        flag = torch.ones(1)
        dist.all_reduce(flag)  # training collectives while the write runs in the background
        assert flag.item() == 2
    manager.finalize()
    target = {"model": {"w": torch.zeros(3, 4)}}
    state = manager.load(3, target, model_name="m")
    assert state["iteration"] == 3 and torch.equal(target["model"]["w"], weights * 3), rank
    dist.barrier()
    dist.destroy_process_group()


def test_async_save_publishes_in_order_and_reloads(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             __file__, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3\n"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    assert sorted(p.name for p in (tmp_path / "iter_0000003").glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]


if __name__ == "__main__":
    worker(sys.argv[1])
