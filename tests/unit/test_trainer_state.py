"""The trainer's state through a checkpoint, in one process: `python -m pytest -q tests/unit/test_trainer_state.py`.

A real Trainer (debug-qwen3, DDP config on one CPU process, no process group) saves its state
through the CheckpointManager; a fresh Trainer, planned again so that it finds the checkpoint,
resumes it and must read exactly the micro-batches the first one would have read next.
"""

import signal

import numpy as np
import pytest
import torch

from train.launch.cluster import ClusterEnv
from train.launch.job import JobContext
from train.launch.plan import build_plan, compose_config
from train.models import build_model, init_weights
from train.parallel import ParallelLayout
from train.trainer import STOP_SIGNALS, Trainer

SEQ, MBS, GBS = 8, 2, 6  # 3 micro-batches per iteration on one process


def numbered_samples(count: int) -> list[dict]:
    """Sample i is the tokens i*100 .. i*100 + SEQ: every batch says which samples it holds."""
    return [{"tokens": np.arange(i * 100, i * 100 + SEQ + 1), "loss_mask": np.ones(SEQ, dtype=np.float32)}
            for i in range(count)]


def make_trainer(root) -> Trainer:
    cfg = compose_config("pretrain", [f"checkpoint.root={root}", "training.train_iters=5",
                                      f"training.micro_batch_size={MBS}", f"training.global_batch_size={GBS}",
                                      "model.name=tiny-qwen3"])
    plan = build_plan("pretrain", cfg, {}, "<test>", ClusterEnv("single", 1, 0, "127.0.0.1", 0, 1, None))
    plan.paths.create()
    ctx = JobContext(plan, rank=0, local_rank=0, world_size=1, device="cpu", timeline={})
    model = init_weights(build_model("debug-qwen3", device="cpu"), 1)
    return Trainer(cfg, ctx, ParallelLayout.build(ctx, cfg.parallel), model, numbered_samples(5 * GBS))


def first_samples(trainer: Trainer, count: int) -> list[int]:
    """The sample numbers of the next `count` micro-batches' rows."""
    batches = trainer.microbatches(depth=2)
    return [int(row[0]) // 100 for _ in range(count) for row in next(batches)[0]]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}  # the Trainer catches these
    yield tmp_path / "runs"
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_state_survives_a_checkpoint_and_the_stream_continues(root):
    first = make_trainer(root)
    stream = first_samples(first, 15)  # five iterations of three micro-batches of two
    assert stream == list(range(5 * GBS))
    first.state.iteration, first.state.consumed_samples, first.state.skipped_iterations = 2, 2 * GBS, 1
    saved = first.state_dict()
    assert (saved["iteration"], saved["consumed_samples"], saved["skipped_iterations"]) == (2, 2 * GBS, 1)
    first.save()

    resumed = make_trainer(root)
    assert resumed.plan.resume.decision == "resume" and resumed.plan.resume.iteration == 2
    resumed.resume()
    assert (resumed.state.iteration, resumed.state.consumed_samples, resumed.state.skipped_iterations) == (2, 12, 1)
    assert first_samples(resumed, 3) == stream[2 * GBS: 3 * GBS]  # the third iteration's batch, exactly


def test_load_state_dict_round_trip(root):
    trainer = make_trainer(root)
    trainer.state.iteration, trainer.state.consumed_samples = 3, 3 * GBS
    torch.save(trainer.state_dict(), root / "trainer_state.pt")  # as trainer.pt holds it
    other = make_trainer(root)
    other.load_state_dict(torch.load(root / "trainer_state.pt", weights_only=False))
    assert other.state == trainer.state
    assert first_samples(other, 1) == [3 * GBS, 3 * GBS + 1]



def test_a_run_resumed_at_its_last_iteration_has_nothing_left_to_do(root):
    """A chained or repeated job after the run finished: it resumes, trains nothing, says done
    (the sampler would refuse to start at consumed == total, so no batch may be read)."""
    finished = make_trainer(root)
    finished.state.iteration, finished.state.consumed_samples = 5, 5 * GBS  # train_iters=5, all consumed
    finished.save()
    again = make_trainer(root)
    assert again.train() == "done"
    assert again.state.iteration == 5
