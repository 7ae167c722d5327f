"""python -m pytest tests/unit/test_checkpoint.py  (CheckpointManager in one process, no process group)"""

import contextlib
import logging
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import train.checkpoint as checkpoint_module
from train.checkpoint import (CheckpointDamaged, CheckpointManager, CheckpointMismatch, CheckpointSaveFailed,
                              checkpoint_iterations)
from train.launch.rundir import MANIFEST_FILE, TRACKER_FILE, resume_state


def model_and_optimizer(width: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def tensors(model, optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save(manager: CheckpointManager, iteration: int, model, optimizer, name: str = "tiny") -> None:
    manager.save(iteration, tensors(model, optimizer), {"iteration": iteration, "model_name": name},
                 config_yaml=f"model:\n  name: {name}\n")


def test_round_trip_restores_tensors_rng_and_writes_the_layout(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save(manager, 10, model, optimizer)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    directory = tmp_path / "iter_0000010"
    names = {p.name for p in directory.iterdir()}
    assert {".metadata", "trainer.pt", "rng_rank0.pt", "config.yaml", "manifest.json"} < names
    assert all(name.startswith("__0_") and name.endswith(".distcp") for name in names - {
        ".metadata", "trainer.pt", "rng_rank0.pt", "config.yaml", "manifest.json"})
    assert (tmp_path / TRACKER_FILE).read_text() == "10\n"
    trainer_state = torch.load(directory / "trainer.pt", weights_only=False)
    assert trainer_state["world_size"] == 1 and trainer_state["model_shapes"]["0.weight"] == (8, 8)

    other, other_optimizer = model_and_optimizer(seed=1)
    state = tensors(other, other_optimizer)
    loaded = manager.load(10, state, model_name="tiny")
    set_state_dict(other, other_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    assert loaded["iteration"] == 10
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    exp_avg = optimizer.state[next(iter(model.parameters()))]["exp_avg"]
    assert torch.equal(exp_avg, other_optimizer.state[next(iter(other.parameters()))]["exp_avg"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """Writes past max_bytes fail with EFBIG, as a full disk fails them with ENOSPC (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_save_is_removed_logged_in_one_line_and_training_goes_on(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer(width=128)  # shard files of ~200 KB
    save(manager, 2, model, optimizer)
    with caplog.at_level(logging.WARNING, logger="train"), file_size_limit(32 << 10):
        assert manager.save(4, tensors(model, optimizer), {"iteration": 4, "model_name": "tiny"}) is None
    lines = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
    assert len(lines) == 1 and "File too large" in lines[0] and "keeping iter_0000002" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", TRACKER_FILE]  # no .tmp left
    assert manager.failed_saves == 1
    save(manager, 6, model, optimizer)  # the disk has room again
    assert (tmp_path / TRACKER_FILE).read_text() == "6\n" and manager.failed_saves == 0


def test_max_failed_saves_in_a_row_stop_the_job_with_one_error_line(tmp_path, capsys):
    manager = CheckpointManager(tmp_path, keep_last=3, max_failed_saves=2)
    model, optimizer = model_and_optimizer(width=128)
    save(manager, 2, model, optimizer)
    with file_size_limit(32 << 10):
        assert manager.save(4, tensors(model, optimizer), {"iteration": 4}) is None
        with pytest.raises(CheckpointSaveFailed) as stop:
            manager.save(6, tensors(model, optimizer), {"iteration": 6})
    assert stop.value.code == 4
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 checkpoint saves in a row failed" in errors[0] and "iter_0000002" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", TRACKER_FILE]


def test_a_damaged_newest_checkpoint_is_resumed_past_and_removed_at_the_next_save(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer(width=64)
    for iteration in (2, 4):
        save(manager, iteration, model, optimizer)
    shard = next((tmp_path / "iter_0000004").glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size // 2)
    state = resume_state(tmp_path, None)  # the plan's decision
    assert state.iteration == 2 and f"iter_0000004: {shard.name} has" in state.skipped[0]
    manager.load(state.iteration, tensors(model, optimizer), model_name="tiny")
    with caplog.at_level(logging.WARNING, logger="train"):
        save(manager, 3, model, optimizer)
    assert checkpoint_iterations(tmp_path) == [2, 3] and "removed" in caplog.text
    assert resume_state(tmp_path, None).skipped == ()


def test_an_older_checkpoint_with_a_truncated_shard_is_refused_naming_the_file(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer(width=64)
    save(manager, 2, model, optimizer)
    (tmp_path / "iter_0000002" / MANIFEST_FILE).unlink()  # as written before manifests existed
    shard = next((tmp_path / "iter_0000002").glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size - 100)
    assert resume_state(tmp_path, None).iteration == 2  # no manifest: accepted at plan time
    with pytest.raises(CheckpointDamaged, match=f"{shard.name} has .* bytes, its metadata needs"):
        manager.load(2, tensors(model, optimizer), model_name="tiny")


def test_publish_refuses_an_incomplete_directory(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer()
    save(manager, 2, model, optimizer)
    temporary = tmp_path / "iter_0000004.tmp"
    temporary.mkdir()
    torch.save({"world_size": 2}, temporary / "trainer.pt")
    with pytest.raises(RuntimeError, match="incomplete"):
        manager._publish(4, temporary, tmp_path / "iter_0000004")
    assert (tmp_path / TRACKER_FILE).read_text() == "2\n"


@pytest.mark.parametrize("keep_last,keep_every,kept", [
    (2, 0, [5, 6]),
    (2, 2, [2, 4, 5, 6]),
    (1, 3, [3, 6]),
    (0, 0, [1, 2, 3, 4, 5, 6]),  # 0: keep everything
])
def test_retention_keeps_the_last_k_and_every_nth(tmp_path, keep_last, keep_every, kept):
    manager = CheckpointManager(tmp_path, keep_last=keep_last, keep_every=keep_every)
    model, optimizer = model_and_optimizer(width=2)
    for iteration in range(1, 7):
        save(manager, iteration, model, optimizer)
    assert checkpoint_iterations(tmp_path) == kept


def test_a_checkpoint_of_another_model_is_refused_before_loading(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer(width=8)
    save(manager, 1, model, optimizer, name="tiny-qwen3")
    other, other_optimizer = model_and_optimizer(width=16)
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(CheckpointMismatch) as error:
        manager.load(1, tensors(other, other_optimizer), model_name="tiny-llama3")
    message = str(error.value)
    assert "'tiny-qwen3'" in message and "'tiny-llama3'" in message
    assert "model.0.weight: checkpoint [8, 8], model [16, 16]" in message
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing loaded


def test_missing_and_extra_parameters_are_named(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer()
    save(manager, 1, model, optimizer)
    bigger = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointMismatch, match=r"missing from the checkpoint: model\.2\.bias, model\.2\.weight"):
        manager.load(1, tensors(bigger, torch.optim.AdamW(bigger.parameters())), model_name="tiny")


def test_missing_rng_file_of_a_new_rank_keeps_the_seeded_rng(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer()
    save(manager, 1, model, optimizer)
    (tmp_path / "iter_0000001" / "rng_rank0.pt").unlink()  # as if saved by other ranks only
    torch.manual_seed(99)
    expected = torch.rand(1)
    torch.manual_seed(99)
    manager.load(1, tensors(model, optimizer))
    assert torch.equal(torch.rand(1), expected)
    assert "keeping the seeded RNG" in caplog.text


def test_wall_time_trigger(tmp_path):
    assert not CheckpointManager(tmp_path, keep_last=1).time_to_save()  # off by default
    manager = CheckpointManager(tmp_path, keep_last=1, save_interval_s=30)
    assert not manager.time_to_save()
    manager.last_save_time -= 31
    assert manager.time_to_save()
    model, optimizer = model_and_optimizer(width=2)
    save(manager, 1, model, optimizer)  # a save restarts the clock
    assert not manager.time_to_save()


def test_async_save_falls_back_to_sync_without_cuda(tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    caplog.set_level(logging.INFO, logger="train")
    manager = CheckpointManager(tmp_path, keep_last=3, async_save=True)
    model, optimizer = model_and_optimizer(width=2)
    save(manager, 1, model, optimizer)
    save(manager, 2, model, optimizer)
    assert (tmp_path / TRACKER_FILE).read_text() == "2\n"
    assert caplog.text.count("saving synchronously") == 1


def test_async_path_publishes_at_finalize(tmp_path, monkeypatch):
    """The async code path (forced on CPU): nothing is published until the write finished."""
    manager = CheckpointManager(tmp_path, keep_last=3, async_save=True)
    monkeypatch.setattr(manager, "_use_async", lambda: True)
    model, optimizer = model_and_optimizer(width=2)
    save(manager, 1, model, optimizer)
    assert not (tmp_path / TRACKER_FILE).exists()
    save(manager, 2, model, optimizer)  # publishes 1 first
    assert (tmp_path / TRACKER_FILE).read_text() == "1\n"
    manager.finalize()
    assert (tmp_path / TRACKER_FILE).read_text() == "2\n"
    assert checkpoint_iterations(tmp_path) == [1, 2]


# ---------------------------------------------------------------- durability and the writer
def test_every_file_is_fsynced_before_the_rename_and_the_tracker_after(tmp_path, monkeypatch):
    """Order of the durable steps, recorded from os.fsync (every thread) and os.replace:
    all files of the checkpoint and its directory, then the rename, the parent, the tracker."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", str(source), str(destination)))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    manager = CheckpointManager(tmp_path, keep_last=3, write_threads=2)
    model, optimizer = model_and_optimizer()
    save(manager, 3, model, optimizer)
    temporary, final = str(tmp_path / "iter_0000003.tmp"), str(tmp_path / "iter_0000003")
    tracker_tmp, tracker = str(tmp_path / f".{TRACKER_FILE}.tmp"), str(tmp_path / TRACKER_FILE)
    rename = events.index(("replace", temporary, final))
    synced_before = {event[1] for event in events[:rename] if event[0] == "fsync"}
    written = {p.name for p in Path(final).iterdir()}
    assert len([n for n in written if n.endswith(".distcp")]) == 2  # one file per writer thread
    for name in written:  # DCP writes .metadata as .metadata.tmp, fsyncs it, then renames it
        assert f"{temporary}/{name}" in synced_before or f"{temporary}/{name}.tmp" in synced_before, name
    assert temporary in synced_before  # the names in it
    after = events[rename + 1:]
    assert after == [("fsync", str(tmp_path)), ("fsync", tracker_tmp), ("replace", tracker_tmp, tracker),
                     ("fsync", str(tmp_path))]


def test_the_writer_starts_write_back_early_and_restores_the_crc32_setting(tmp_path, monkeypatch):
    if checkpoint_module._sync_file_range is None:
        pytest.skip("no sync_file_range on this platform")
    calls = []
    real = checkpoint_module._sync_file_range
    monkeypatch.setattr(checkpoint_module, "_sync_file_range", lambda *args: calls.append(args) or real(*args))
    monkeypatch.setattr(checkpoint_module, "WRITEBACK_CHUNK", 1024)
    manager = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer = model_and_optimizer(width=64)  # 64x64 fp32 = 16 KB per tensor
    save(manager, 1, model, optimizer)
    assert calls  # sync_file_range ran (results are ignored: some file systems do not support it)
    assert torch.serialization.get_crc32_options()  # off only while the writer threads ran
    other, other_optimizer = model_and_optimizer(width=64, seed=1)
    state = tensors(other, other_optimizer)
    manager.load(1, state)
    set_state_dict(other, other_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


KILLED_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
import train.checkpoint as checkpoint_module
from train.checkpoint import CheckpointManager
directory, moment = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
state = {{"model": {{"w": torch.randn(256, 256)}}, "optimizer": {{"m": torch.randn(256, 256)}}}}
manager = CheckpointManager(directory, keep_last=3)
manager.save(1, state, {{"iteration": 1}})
torch.save(state, os.path.join(directory, "expected.pt"))

def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

real_fsync, real_replace = os.fsync, os.replace
if moment == "writing":      # in the middle of a DCP shard (early write-back every 4 KB)
    checkpoint_module.WRITEBACK_CHUNK = 4096
    checkpoint_module._sync_file_range = kill
elif moment == "syncing":    # a writer thread's fsync of its finished shard
    os.fsync = lambda fd: kill() if os.readlink(f"/proc/self/fd/{{fd}}").endswith(".distcp") else real_fsync(fd)
elif moment == "renaming":   # everything written, before the directory is renamed
    os.replace = lambda a, b: kill() if str(a).endswith(".tmp") and "iter_" in str(a) else real_replace(a, b)
elif moment == "tracker":    # directory renamed, before the tracker is replaced
    os.replace = lambda a, b: kill() if "latest" in str(b) else real_replace(a, b)
state["model"]["w"].add_(1)
manager.save(2, state, {{"iteration": 2}})
print("not killed")
"""


@pytest.mark.parametrize("moment", ["writing", "syncing", "renaming", "tracker"])
def test_kill_9_during_a_save_leaves_the_tracker_on_the_previous_complete_checkpoint(tmp_path, moment):
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE.format(repo=str(Path(checkpoint_module.__file__).parents[1])))
    directory = tmp_path / "checkpoints"
    result = subprocess.run([sys.executable, str(script), str(directory), moment], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -9, result.stdout + result.stderr
    assert (directory / TRACKER_FILE).read_text() == "1\n"
    assert (directory / "iter_0000002").is_dir() == (moment == "tracker")  # complete, just not published
    manager = CheckpointManager(directory, keep_last=3)
    leftover = f".{TRACKER_FILE}.tmp" if moment == "tracker" else "iter_0000002.tmp"
    assert [p.name for p in manager.clean_leftovers()] == [leftover]
    expected = torch.load(directory / "expected.pt")
    state = {"model": {"w": torch.zeros(256, 256)}, "optimizer": {"m": torch.zeros(256, 256)}}
    assert manager.load(manager.latest_iteration(), state)["iteration"] == 1
    assert torch.equal(state["model"]["w"], expected["model"]["w"])
    assert torch.equal(state["optimizer"]["m"], expected["optimizer"]["m"])


def test_the_slow_save_test_hook_patches_publish_only_where_it_is_asked_for():
    """tests/fixtures/slow_save.py: the kill -9 mid-save tests' pause lives in tests, not in train/."""
    import importlib.util

    from tests.fixtures.slow_save import HOOKS, slow_save_env

    repo = Path(__file__).resolve().parents[2]
    code = "import train.checkpoint as c; print(c.CheckpointManager._publish.__name__)"
    env = {k: v for k, v in os.environ.items() if k != "TRAIN_TEST_SLOW_SAVE_S"}
    names = [subprocess.run([sys.executable, "-c", code], cwd=repo, env=e, capture_output=True, text=True,
                            timeout=120).stdout.strip() for e in (slow_save_env(env, "60@4"), env)]
    assert names == ["slow_publish", "_publish"]
    spec = importlib.util.spec_from_file_location("slow_save_hook", HOOKS / "sitecustomize.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)  # TRAIN_TEST_SLOW_SAVE_S is unset here: it installs nothing
    seconds_for = hook.seconds_for
    assert [seconds_for("60@4", 4), seconds_for("60@4", 2), seconds_for("1.5", 7), seconds_for("", 4)] == [60, 0, 1.5, 0]
