"""Checkpoints in Megatron's layout, written atomically with torch.distributed.checkpoint.

    checkpoints/<model>/
    ├── iter_0000200/                 one complete checkpoint
    │   ├── .metadata, __0_0.distcp   DCP shards: model and optimizer (reshardable)
    │   ├── trainer.pt                iteration, consumed samples, scheduler (rank 0)
    │   └── rng_rank<r>.pt            RNG states of every rank
    └── latest_checkpointed_iteration.txt   the iteration, written last

Save: every rank writes into iter_XXXXXXX.tmp, all ranks meet at a barrier, rank 0
checks the files, renames the directory and only then replaces the tracker file (via a
temporary file and rename). A kill at any moment leaves the tracker pointing at a
complete checkpoint, or at the previous one.
"""

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from train.launch.rundir import TRACKER_FILE, checkpoint_dir_name, read_tracker

log = logging.getLogger("train")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path(self, iteration: int) -> Path:
        return self.directory / checkpoint_dir_name(iteration)

    def latest_iteration(self) -> int | None:
        return read_tracker(self.directory)

    def save(self, iteration: int, tensors: dict, trainer_state: dict) -> Path:
        """tensors: model/optimizer state (DCP, sharded); trainer_state: small picklable dict."""
        final, temporary = self.path(iteration), self.directory / f"{checkpoint_dir_name(iteration)}.tmp"
        if rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)  # leftover of a killed save
            temporary.mkdir(parents=True)
        barrier()
        dcp.save(tensors, checkpoint_id=str(temporary))
        torch.save(rng_state(), temporary / f"rng_rank{rank()}.pt")
        if rank() == 0:
            torch.save(trainer_state, temporary / "trainer.pt")
        barrier()
        if rank() == 0:
            self._publish(iteration, temporary, final)
        barrier()
        return final

    def _publish(self, iteration: int, temporary: Path, final: Path) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        expected = [".metadata", "trainer.pt"] + [f"rng_rank{r}.pt" for r in range(world)]
        missing = [name for name in expected if not (temporary / name).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {temporary} is incomplete: missing {missing}")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        tracker_tmp = self.directory / f".{TRACKER_FILE}.tmp"
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, self.directory / TRACKER_FILE)
        log.info("saved checkpoint %s", final)
        self._purge(keep=iteration)

    def _purge(self, keep: int) -> None:
        iterations = sorted(int(p.name[len("iter_"):]) for p in self.directory.glob("iter_*")
                            if p.is_dir() and p.name[len("iter_"):].isdigit())
        for old in iterations[:-self.keep_last] if self.keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(self.path(old), ignore_errors=True)

    def load(self, iteration: int, tensors: dict) -> dict:
        """Fills `tensors` in place from DCP; returns the trainer state. Restores this rank's RNG."""
        directory = self.path(iteration)
        dcp.load(tensors, checkpoint_id=str(directory))
        rng_file = directory / f"rng_rank{rank()}.pt"
        if rng_file.is_file():  # absent when the world size grew: keep the seeded RNG
            set_rng_state(torch.load(rng_file, weights_only=False))
        return torch.load(directory / "trainer.pt", weights_only=False)
