"""Checkpoints in Megatron's layout, written atomically with torch.distributed.checkpoint.

    checkpoints/<model>/
    ├── iter_0000200/                 one complete checkpoint
    │   ├── .metadata, __<r>_<t>.distcp  DCP shards of rank r, writer thread t: model and
    │   │                             optimizer (reshardable)
    │   ├── trainer.pt                iteration, consumed samples, scheduler, model name and
    │   │                             parameter shapes, world size (rank 0)
    │   ├── rng_rank<r>.pt            RNG states (python, numpy, torch, cuda) of every rank
    │   ├── quantizer_state.pt        QAD: how the student was quantized (train/quant/student.py)
    │   ├── config.yaml               the resolved config of the run that saved it
    │   ├── run.json                  job type, GBS, MBS, SEQ_LENGTH of that run (the plan checks a resume)
    │   └── manifest.json             size and head/tail crc32 of every file, written last
    │                                 (train/launch/rundir.py: verified at plan time)
    └── latest_checkpointed_iteration.txt   the iteration, written last

Save: every rank writes into iter_XXXXXXX.tmp, all ranks meet at a barrier, rank 0
checks the files, renames the directory and only then replaces the tracker file (via a
temporary file and rename). A kill at any moment leaves the tracker pointing at a
complete checkpoint, or at the previous one; the next start removes leftover *.tmp.

A failed save (disk full, I/O error, on any rank) removes its iter_XXXXXXX.tmp, logs the
cause in one line on rank 0 and training goes on from the previous checkpoint; after
`max_failed_saves` failures in a row every rank stops with one error line (exit 4).
Ranks agree on the outcome of each step of a save (one all_gather_object of the causes
on a gloo group), so no rank enters a collective the others have left.
Durability (a crash of the machine, not just of the process): every file is fsynced by
the rank that wrote it before the barrier (the DCP shards by their writer threads, right
after each file is written), rank 0 fsyncs the directory before the rename, the parent
after it, and the tracker's temporary file before its rename.

Save speed (benchmarks/checkpoint): DurableWriter is DCP's FileSystemWriter with two
changes that keep the format. (1) While a writer thread writes its file it asks the kernel
to start writing the finished part to disk (sync_file_range), so the disk works while the
CPU still copies, and the fsync at the end of the file waits for the tail only. (2) The
tensor records are written without zip CRC32 (torch.load never checks it; it cost ~0.6 s
of CPU per GB, the largest single cost of the save on this CPU).

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

import contextlib
import ctypes
import json
import logging
import os
import queue
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from torch.distributed.checkpoint.api import CheckpointException

from train.launch.rundir import (MANIFEST_FILE, RUN_FACTS_FILE, TRACKER_FILE, checkpoint_dir_name,
                                 checkpoint_iterations, checkpoint_manifest, read_tracker)
from train.launch.torchrun import write_error_record

log = logging.getLogger("train")


class CheckpointMismatch(RuntimeError):
    """The checkpoint was written by a different model (name or parameter shapes)."""


class CheckpointDamaged(RuntimeError):
    """A shard file is shorter than DCP's metadata says (an older checkpoint, without manifest)."""


class CheckpointSaveFailed(SystemExit):
    """Raised on every rank after max_failed_saves failed saves in a row (exit 4)."""

    EXIT_CODE = 4

    def __init__(self, message: str):
        super().__init__(self.EXIT_CODE)
        self.message = message


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


def os_error_of(error: BaseException | None) -> OSError | None:
    """The OSError behind an error (itself, or in its __context__ chain), if any."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def failure_cause(error: BaseException) -> str:
    """One line: the first underlying exception of a DCP CheckpointException, or the error itself."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))
        error = error[0] if isinstance(error, tuple) else error
    return f"{type(error).__name__}: {error}".splitlines()[0]


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


def model_shapes(tensors: dict) -> dict[str, tuple]:
    """{key: shape} of the model's tensors in `tensors`, over every rank: a pipeline stage holds a
    part of the model (train/parallel/pipeline.py), the checkpoint the whole."""
    shapes = {key: shape for key, shape in tensor_shapes(tensors).items() if key.startswith("model.")}
    if dist.is_initialized() and dist.get_world_size() > 1:
        every_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, shapes)
        shapes = {key: shape for rank_shapes in every_rank for key, shape in rank_shapes.items()}
    return shapes


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: makes the names created or renamed in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_durably(value, path: Path) -> None:
    torch.save(value, path)
    fsync_path(path)


# ---------------------------------------------------------------- the DCP writer
WRITEBACK_CHUNK = 32 << 20  # start the disk write of every 32 MB a writer thread has written
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start write-out of the dirty pages in the range, do not wait


def _load_sync_file_range():
    """libc's sync_file_range (Linux); None elsewhere, then the final fsync does all the work."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError, TypeError):  # no such symbol (macOS), no CDLL(None) (Windows)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


class _WritebackStream:
    """A buffered file being written: after every WRITEBACK_CHUNK bytes, the range written
    since the last call goes to the disk in the background (the call returns at once; ctypes
    releases the GIL). It only starts I/O early; durability is still the fsync that
    DCP's writer thread does when the file is complete."""

    def __init__(self, file):
        self.file = file
        self.submitted = file.tell()  # bytes before this offset have been handed to the disk

    def write(self, data) -> int:
        written = self.file.write(data)
        position = self.file.tell()
        if _sync_file_range is not None and position - self.submitted >= WRITEBACK_CHUNK:
            self.file.flush()  # the buffered tail must reach the page cache first
            _sync_file_range(self.file.fileno(), self.submitted, position - self.submitted,
                             _SYNC_FILE_RANGE_WRITE)  # errors (e.g. unsupported file system) are ignored
            self.submitted = position
        return written

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()


class _WritebackFileSystem(FileSystem):
    """Streams with early write-back; a failed write (disk full, I/O error) is recorded in
    `errors` and ends its writer thread quietly. DCP's writer threads would otherwise print a
    traceback each and drop their files' records from the metadata, so the save would look
    complete (torch 2.x's _write_files_from_queue stops on queue.Empty); DurableWriter.write_data
    raises the recorded error once, on the thread that called it."""

    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            try:
                yield _WritebackStream(stream)
            except (OSError, RuntimeError) as error:  # torch.save's zip writer wraps the OSError
                self.errors.append(error)
                raise queue.Empty from error


class DurableWriter(dcp.FileSystemWriter):
    """DCP's FileSystemWriter (one file per writer thread per rank, each fsynced by its thread
    as soon as it is complete, then .metadata fsynced), with early write-back and without
    the zip CRC32 of the tensor records (module docstring). Same files, same format."""

    def __init__(self, path: Path, thread_count: int):
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, thread_count=thread_count)
        self.fs = _WritebackFileSystem()

    def write_data(self, plan, planner):
        # DCP writes each tensor as a torch.save record; the CRC32 setting is process-wide, so it
        # is off only while this rank's writer threads run (write_data returns when they are done;
        # with async_save that is in the background, and a torch.save elsewhere in the process
        # meanwhile also skips its CRC32, which nothing reads)
        crc32 = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        self.fs.errors.clear()
        try:
            future = super().write_data(plan, planner)
        finally:
            torch.serialization.set_crc32_options(crc32)
        written = len(future.wait())
        if self.fs.errors or written < len(plan.items):
            cause = next((e for e in map(os_error_of, self.fs.errors) if e is not None), None)
            raise OSError(getattr(cause, "errno", None), f"{cause.strerror if cause else 'a writer thread failed'} "
                          f"({written} of {len(plan.items)} tensor records written to {self.path})")
        return future


def check_shard_sizes(directory: Path) -> None:
    """Every shard file at least as long as the records DCP's metadata places in it (cheap: sizes
    only; the manifest, when there is one, was verified at plan time)."""
    needed: dict[str, int] = {}
    for info in (dcp.FileSystemReader(str(directory)).read_metadata().storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = Path(directory) / name
        actual = path.stat().st_size if path.is_file() else None
        if actual is None or actual < size:
            raise CheckpointDamaged(f"checkpoint {directory} is damaged: {name} has "
                                    f"{'no file' if actual is None else f'{actual} bytes'}, its metadata needs "
                                    f"{size} bytes; remove {Path(directory).name} to resume from the previous one")


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, keep_every: int = 0, save_interval_s: float = 0.0,
                 async_save: bool = False, write_threads: int = 4, max_failed_saves: int = 3):
        self.directory = Path(directory)
        self.max_failed_saves = max_failed_saves  # failed saves in a row before the job stops
        self.failed_saves = 0
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
            # a set: pathlib's "*" matches dot files too, so the tracker's temporary file is in both
            for leftover in sorted(set(self.directory.glob("*.tmp")) | set(self.directory.glob(".*.tmp"))):
                if self._pending and leftover == self._pending[2]:
                    continue
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                removed.append(leftover)
                log.warning("removed incomplete checkpoint %s (a save was interrupted)", leftover)
        barrier()
        return removed

    # ------------------------------------------------------------ save
    def save(self, iteration: int, tensors: dict, trainer_state: dict, config_yaml: str | None = None,
             files: dict | None = None, run_facts: dict | None = None) -> Path | None:
        """tensors: model/optimizer state (DCP, sharded); trainer_state: small picklable dict;
        files: {file name: picklable object} that rank 0 writes with torch.save (checked at publish);
        run_facts: what a resume must keep (RUN_FACTS_FILE, JSON: read at plan time without torch).
        Returns the checkpoint's path, or None when the save failed (module docstring)."""
        self.finalize()  # an earlier async save publishes first
        final, temporary = self.path(iteration), self.directory / f"{checkpoint_dir_name(iteration)}.tmp"
        self.last_save_time = time.time()
        steps = [lambda: self._prepare(temporary),
                 lambda: self._write_small_files(temporary, tensors, trainer_state, config_yaml, files, run_facts)]
        if self._use_async():
            steps.append(lambda: self._start_async(tensors, iteration, temporary, final))
        else:
            steps += [lambda: dcp.save(tensors, storage_writer=self._writer(temporary)),
                      lambda: self._publish(iteration, temporary, final) if rank() == 0 else None]
        for step in steps:
            if not self._agreed_ok(step, iteration, temporary):
                return None
        barrier()
        if self._pending is None:
            self.failed_saves = 0
        return final

    def _prepare(self, temporary: Path) -> None:
        if rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)  # leftover of a killed save
            temporary.mkdir(parents=True)

    def _write_small_files(self, temporary: Path, tensors: dict, trainer_state: dict, config_yaml: str | None,
                           files: dict | None, run_facts: dict | None = None) -> None:
        torch_save_durably(rng_state(), temporary / f"rng_rank{rank()}.pt")
        if rank() != 0:
            return
        trainer_state = {**trainer_state, "world_size": world_size(),
                         "model_shapes": tensor_shapes(tensors.get("model", {})),
                         "extra_files": sorted(files or {})}
        for name, value in (files or {}).items():
            torch_save_durably(value, temporary / name)
        torch_save_durably(trainer_state, temporary / "trainer.pt")
        if config_yaml is not None:
            (temporary / "config.yaml").write_text(config_yaml)
            fsync_path(temporary / "config.yaml")
        if run_facts is not None:
            (temporary / RUN_FACTS_FILE).write_text(json.dumps(run_facts, indent=1))
            fsync_path(temporary / RUN_FACTS_FILE)

    def _start_async(self, tensors: dict, iteration: int, temporary: Path, final: Path) -> None:
        future = dcp.async_save(tensors, storage_writer=self._writer(temporary),
                                process_group=self._background_group())
        self._pending = (future, iteration, temporary, final)

    def _agreed_ok(self, step, iteration: int, temporary: Path) -> bool:
        """Runs one step of a save on every rank; all ranks learn whether any failed. On a
        failure: the temporary directory goes, rank 0 logs the cause, and after
        max_failed_saves failures in a row CheckpointSaveFailed stops every rank."""
        cause = None
        try:
            step()
        except (OSError, CheckpointException, RuntimeError) as error:  # disk full, EIO, an incomplete publish
            cause = failure_cause(error)
        causes = [cause]
        if dist.is_initialized():
            causes = [None] * world_size()
            dist.all_gather_object(causes, cause, group=self._status_group())
        failed = [(r, c) for r, c in enumerate(causes) if c is not None]
        if not failed:
            return True
        self.failed_saves += 1
        if rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            where = f" (rank {failed[0][0]})" if world_size() > 1 else ""
            log.warning("checkpoint at iteration %d not saved%s: %s; removed %s, keeping %s (failed save %d of "
                        "checkpoint.max_failed_saves=%d in a row)", iteration, where, failed[0][1], temporary.name,
                        self._latest_name(), self.failed_saves, self.max_failed_saves)
        if self.failed_saves >= self.max_failed_saves:
            message = (f"{self.failed_saves} checkpoint saves in a row failed, the last at iteration {iteration}: "
                       f"{failed[0][1]}; stopping (latest checkpoint: {self._latest_name()}, "
                       "checkpoint.max_failed_saves)")
            if rank() == 0:
                log.error(message)
                if not write_error_record(f"error: {message}", CheckpointSaveFailed.EXIT_CODE):  # printed last
                    print(f"error: {message}", file=sys.stderr, flush=True)
            raise CheckpointSaveFailed(message)
        return False

    def _latest_name(self) -> str:
        latest = read_tracker(self.directory)
        return checkpoint_dir_name(latest) if latest is not None else "no checkpoint"

    def _writer(self, temporary: Path) -> dcp.FileSystemWriter:
        return DurableWriter(temporary, thread_count=self.write_threads)

    def _background_group(self):
        """A gloo group of its own for the async save's collectives, so that they never interleave
        with the training collectives on the default group (created once, by every rank)."""
        if not dist.is_initialized():
            return None
        if getattr(self, "_group", None) is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _status_group(self):
        """A gloo group of its own for agreeing on a save's outcome (never busy with an async save)."""
        if getattr(self, "_status", None) is None:
            self._status = dist.new_group(backend="gloo")
        return self._status

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
        if not self._agreed_ok(lambda: self._wait(future), iteration, temporary):
            return
        if self._agreed_ok(lambda: self._publish(iteration, temporary, final) if rank() == 0 else None,
                           iteration, temporary):
            self.failed_saves = 0
        barrier()

    @staticmethod
    def _wait(future) -> None:
        result = future.result()
        upload = getattr(result, "upload_completion", None)  # AsyncSaveResponse on newer torch
        if upload is not None:
            upload.result()

    def _publish(self, iteration: int, temporary: Path, final: Path) -> None:
        saved = torch.load(temporary / "trainer.pt", weights_only=False)
        ranks = range(saved.get("world_size", world_size()))
        expected = [".metadata", "trainer.pt"] + [f"rng_rank{r}.pt" for r in ranks]
        expected += saved.get("extra_files", [])
        missing = [name for name in expected if not (temporary / name).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {temporary} is incomplete: missing {missing}")
        manifest = temporary / MANIFEST_FILE  # last: it lists every file (train/launch/rundir.py)
        manifest.write_text(json.dumps(checkpoint_manifest(temporary), indent=1))
        fsync_path(manifest)
        # every file is fsynced by its writer; make their names durable, then the rename, then the tracker
        fsync_path(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_path(self.directory)
        tracker_tmp = self.directory / f".{TRACKER_FILE}.tmp"
        tracker_tmp.write_text(f"{iteration}\n")
        fsync_path(tracker_tmp)
        os.replace(tracker_tmp, self.directory / TRACKER_FILE)
        fsync_path(self.directory)
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
        iterations = checkpoint_iterations(self.directory)
        for newer in [i for i in iterations if i > keep]:  # the damaged checkpoints this run resumed past
            log.warning("removed %s: newer than the checkpoint just saved (skipped as damaged at resume)",
                        self.path(newer))
            shutil.rmtree(self.path(newer), ignore_errors=True)
        for old in self.purgeable([i for i in iterations if i <= keep], keep):
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
        current = model_shapes(tensors)
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
        check_shard_sizes(directory)
        dcp.load(tensors, checkpoint_id=str(directory))
        rng_file = directory / f"rng_rank{rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # the world size grew: documented fallback, keep the seeded RNG
            log.warning("%s has no RNG state for rank %d (saved by fewer ranks): keeping the seeded RNG",
                        directory, rank())
        return torch.load(directory / "trainer.pt", weights_only=False)
