"""Checkpoints in Megatron's layout, written atomically with torch.distributed.checkpoint.

    checkpoints/<model>/
    ├── iter_0000200/                 one complete checkpoint
    │   ├── .metadata, __<r>_<t>.distcp  DCP shards of rank r, writer thread t: model and
    │   │                             optimizer (reshardable)
    │   ├── trainer.pt                iteration, consumed samples, scheduler, model name and
    │   │                             parameter shapes, world size (rank 0)
    │   ├── rng_rank<r>.pt            RNG states (python, numpy, torch, cuda) of every rank
    │   ├── quantizer_state.pt        QAD: how the student was quantized (train/quant/student.py)
    │   └── config.yaml               the resolved config of the run that saved it
    └── latest_checkpointed_iteration.txt   the iteration, written last

Save: every rank writes into iter_XXXXXXX.tmp, all ranks meet at a barrier, rank 0
checks the files, renames the directory and only then replaces the tracker file (via a
temporary file and rename). A kill at any moment leaves the tracker pointing at a
complete checkpoint, or at the previous one; the next start removes leftover *.tmp.

Scheduler: the learning rate is a pure function of the iteration (train/optim.py), so
the "scheduler state" is the iteration plus the schedule's settings, recorded in
trainer.pt for reference; nothing else needs restoring.

Different world size on load: DCP reshards model and optimizer. RNG files exist only for
the ranks that saved; a rank without one (the world grew) keeps its freshly seeded RNG
(training.seed + rank) and a warning says so. The shipped models have no dropout, so
this changes nothing in the loss.

Async save (checkpoint.async_save): with CUDA, dcp.async_save stages the tensors to host
memory and writes them in a background thread; rank 0 publishes (rename + tracker) once
the write has finished, at the next save or at the end of training. Without CUDA the
save is synchronous (logged once).

Retention: the last `keep_last` checkpoints, plus every iteration divisible by
`keep_every` (when > 0), plus the iterations in `protected` (early stopping's best), are
kept; the rest are removed after each publish.
"""

import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from train.launch.rundir import TRACKER_FILE, checkpoint_dir_name, read_tracker

log = logging.getLogger("train")
SLOW_SAVE_ENV = "TRAIN_TEST_SLOW_SAVE_S"  # tests: "<seconds>[@<iteration>]" sleep before publishing


class CheckpointMismatch(RuntimeError):
    """The checkpoint was written by a different model (name or parameter shapes)."""


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


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


def checkpoint_iterations(directory: Path) -> list[int]:
    """Iterations of the published checkpoints (iter_NNNNNNN directories), ascending."""
    return sorted(int(p.name[len("iter_"):]) for p in Path(directory).glob("iter_*")
                  if p.is_dir() and p.name[len("iter_"):].isdigit())


def tensor_shapes(state: dict, prefix: str = "") -> dict[str, tuple]:
    """Flattened {dotted key: shape} of the tensors in a nested state dict (DCP's key names)."""
    shapes = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            shapes.update(tensor_shapes(value, f"{name}."))
        elif isinstance(value, torch.Tensor):
            shapes[name] = tuple(value.shape)
    return shapes


def _slow_save_seconds(iteration: int) -> float:
    text = os.environ.get(SLOW_SAVE_ENV, "")
    if not text:
        return 0.0
    seconds, _, only = text.partition("@")
    return float(seconds) if not only or int(only) == iteration else 0.0


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, keep_every: int = 0, save_interval_s: float = 0.0,
                 async_save: bool = False, write_threads: int = 4):
        self.directory = Path(directory)
        self.write_threads = write_threads  # DCP writer threads per rank (files __<rank>_<thread>.distcp)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.protected: set[int] = set()  # never purged (early stopping's best checkpoint)
        self.save_interval_s = save_interval_s
        self.async_save = async_save
        self.last_save_time = time.time()
        self._pending = None  # (future, iteration, temporary, final) of an async save
        self._warned_sync = False

    def path(self, iteration: int) -> Path:
        return self.directory / checkpoint_dir_name(iteration)

    def latest_iteration(self) -> int | None:
        return read_tracker(self.directory)

    # ------------------------------------------------------------ triggers
    def time_to_save(self) -> bool:
        """Wall-time trigger: rank 0 decides, every rank gets the same answer (one broadcast)."""
        if not self.save_interval_s:
            return False
        due = torch.tensor([int(time.time() - self.last_save_time >= self.save_interval_s)])
        if dist.is_initialized():
            dist.broadcast(due, src=0)
        return bool(due.item())

    def clean_leftovers(self) -> list[Path]:
        """Rank 0 removes *.tmp left by a killed save; every rank waits for it."""
        removed = []
        if rank() == 0 and self.directory.is_dir():
            for leftover in sorted(self.directory.glob("*.tmp")) + sorted(self.directory.glob(".*.tmp")):
                if self._pending and leftover == self._pending[2]:
                    continue
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                removed.append(leftover)
                log.warning("removed incomplete checkpoint %s (a save was interrupted)", leftover)
        barrier()
        return removed

    # ------------------------------------------------------------ save
    def save(self, iteration: int, tensors: dict, trainer_state: dict, config_yaml: str | None = None,
             files: dict | None = None) -> Path:
        """tensors: model/optimizer state (DCP, sharded); trainer_state: small picklable dict;
        files: {file name: picklable object} that rank 0 writes with torch.save (checked at publish)."""
        self.finalize()  # an earlier async save publishes first
        final, temporary = self.path(iteration), self.directory / f"{checkpoint_dir_name(iteration)}.tmp"
        if rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)  # leftover of a killed save
            temporary.mkdir(parents=True)
        barrier()
        torch.save(rng_state(), temporary / f"rng_rank{rank()}.pt")
        if rank() == 0:
            trainer_state = {**trainer_state, "world_size": world_size(),
                             "model_shapes": tensor_shapes(tensors.get("model", {})),
                             "extra_files": sorted(files or {})}
            for name, value in (files or {}).items():
                torch.save(value, temporary / name)
            torch.save(trainer_state, temporary / "trainer.pt")
            if config_yaml is not None:
                (temporary / "config.yaml").write_text(config_yaml)
        self.last_save_time = time.time()
        if self._use_async():
            future = dcp.async_save(tensors, storage_writer=self._writer(temporary),
                                    process_group=self._background_group())
            self._pending = (future, iteration, temporary, final)
            return final
        dcp.save(tensors, storage_writer=self._writer(temporary))
        self._slow_for_tests(iteration)
        barrier()
        if rank() == 0:
            self._publish(iteration, temporary, final)
        barrier()
        return final

    def _writer(self, temporary: Path) -> dcp.FileSystemWriter:
        # sync_files (fsync of every file) stays on: a published checkpoint must survive a crash
        return dcp.FileSystemWriter(str(temporary), sync_files=True, thread_count=self.write_threads)

    def _background_group(self):
        """A gloo group of its own for the async save's collectives, so that they never interleave
        with the training collectives on the default group (created once, by every rank)."""
        if not dist.is_initialized():
            return None
        if getattr(self, "_group", None) is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _use_async(self) -> bool:
        if not self.async_save:
            return False
        if torch.cuda.is_available():
            return True
        if not self._warned_sync:
            log.info("checkpoint.async_save: no CUDA, saving synchronously")
            self._warned_sync = True
        return False

    def finalize(self) -> None:
        """Waits for a pending async save and publishes it (call before exiting)."""
        if self._pending is None:
            return
        future, iteration, temporary, final = self._pending
        self._pending = None
        result = future.result()
        upload = getattr(result, "upload_completion", None)  # AsyncSaveResponse on newer torch
        if upload is not None:
            upload.result()
        self._slow_for_tests(iteration)
        barrier()
        if rank() == 0:
            self._publish(iteration, temporary, final)
        barrier()

    def _slow_for_tests(self, iteration: int) -> None:
        seconds = _slow_save_seconds(iteration)
        if seconds:
            log.info("%s: sleeping %.1f s before publishing iteration %d", SLOW_SAVE_ENV, seconds, iteration)
            time.sleep(seconds)

    def _publish(self, iteration: int, temporary: Path, final: Path) -> None:
        saved = torch.load(temporary / "trainer.pt", weights_only=False)
        ranks = range(saved.get("world_size", world_size()))
        expected = [".metadata", "trainer.pt"] + [f"rng_rank{r}.pt" for r in ranks]
        expected += saved.get("extra_files", [])
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

    def purgeable(self, iterations: list[int], keep: int) -> list[int]:
        """Which of `iterations` retention removes: not among the last keep_last, not a
        multiple of keep_every, not `keep` (just published)."""
        if self.keep_last <= 0:
            return []
        return [old for old in iterations[:-self.keep_last]
                if old != keep and old not in self.protected
                and not (self.keep_every > 0 and old % self.keep_every == 0)]

    def _purge(self, keep: int) -> None:
        for old in self.purgeable(checkpoint_iterations(self.directory), keep):
            shutil.rmtree(self.path(old), ignore_errors=True)

    # ------------------------------------------------------------ load
    def check_compatible(self, iteration: int, tensors: dict, model_name: str | None) -> None:
        """Refuses a checkpoint of another model before anything is loaded: compares the model
        name (trainer.pt) and the parameter shapes (DCP metadata) with the current model."""
        directory = self.path(iteration)
        saved = torch.load(directory / "trainer.pt", weights_only=False)
        problems = []
        saved_name = saved.get("model_name")
        if model_name is not None and saved_name is not None and str(saved_name) != str(model_name):
            problems.append(f"model name: checkpoint {saved_name!r}, this run {model_name!r}")
        metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        stored = {key: tuple(meta.size) for key, meta in metadata.items()
                  if key.startswith("model.") and hasattr(meta, "size")}
        current = {key: shape for key, shape in tensor_shapes(tensors).items() if key.startswith("model.")}
        differing = [f"{key}: checkpoint {list(stored[key])}, model {list(current[key])}"
                     for key in sorted(stored.keys() & current.keys()) if stored[key] != current[key]]
        only_model = sorted(current.keys() - stored.keys())
        only_checkpoint = sorted(stored.keys() - current.keys())

        def listing(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        if differing:
            problems.append(f"{len(differing)} parameter shapes differ: {listing(differing)}")
        if only_model:
            problems.append(f"{len(only_model)} parameters missing from the checkpoint: {listing(only_model)}")
        if only_checkpoint:
            problems.append(f"{len(only_checkpoint)} parameters not in the model: {listing(only_checkpoint)}")
        if problems:
            raise CheckpointMismatch(f"checkpoint {directory} does not match this model; "
                                     + "; ".join(problems) + ". Use another checkpoint.root or run name.")

    def load(self, iteration: int, tensors: dict, model_name: str | None = None) -> dict:
        """Fills `tensors` in place from DCP; returns the trainer state. Restores this rank's RNG."""
        directory = self.path(iteration)
        self.check_compatible(iteration, tensors, model_name)
        dcp.load(tensors, checkpoint_id=str(directory))
        rng_file = directory / f"rng_rank{rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # the world size grew: documented fallback, keep the seeded RNG
            log.warning("%s has no RNG state for rank %d (saved by fewer ranks): keeping the seeded RNG",
                        directory, rank())
        return torch.load(directory / "trainer.pt", weights_only=False)
