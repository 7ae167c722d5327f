"""python -m pytest tests/integration/test_checkpoint_jobs.py  (checkpoints of real jobs: kill -9, refusal, triggers)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_resume import COMMON, REPO, RUN, checkpoints, job_env, losses, pretrain

from tests.fixtures.slow_save import slow_save_env


def descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in their own sessions)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                queue.extend(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            pass
    return found


def wait_for(predicate, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"job ended early: {process.communicate()[0][-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_resumes_from_it(tmp_path):
    env = slow_save_env(job_env("20260101_000001"), "60@4")  # save of iteration 4 stalls before publishing
    args = [f"checkpoint.root={tmp_path}", *COMMON, "training.train_iters=6", "checkpoint.save_interval=2"]
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node=2", "-m", "train.pretrain", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    directory = checkpoints(tmp_path)
    try:  # DCP has written iteration 4 (.metadata is its last file); the publish has not happened
        wait_for(lambda: (directory / "iter_0000004.tmp" / ".metadata").is_file(), 120, process)
        time.sleep(0.2)
    finally:
        for pid in descendants(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.communicate(timeout=30)
    assert (directory / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in directory.glob("iter_*")) == ["iter_0000002", "iter_0000004.tmp"]
    killed = losses(tmp_path, "20260101_000001")
    assert sorted(killed) == [1, 2, 3, 4]

    result = pretrain(tmp_path, "20260101_000002", "training.train_iters=6", "checkpoint.save_interval=2", procs=2)
    output = result.stdout + result.stderr
    assert "resume at iteration 2" in output and "removed incomplete checkpoint" in output
    assert sorted(p.name for p in directory.iterdir()) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                                           "latest_checkpointed_iteration.txt"]
    resumed = losses(tmp_path, "20260101_000002")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert {i: resumed[i] for i in (3, 4)} == {i: killed[i] for i in (3, 4)}  # lost work redone identically


def test_a_checkpoint_of_another_model_is_refused_with_the_mismatching_keys(tmp_path):
    pretrain(tmp_path, "20260101_000001", "model.name=tiny-llama3", "training.train_iters=1")
    llama = tmp_path / "tiny-llama3-pretrain-Data-synthetic-lr0.0003" / "checkpoints" / "tiny-llama3"
    shutil.copytree(llama, checkpoints(tmp_path))  # as if the run directory were reused for another model
    result = pretrain(tmp_path, "20260101_000002", "training.train_iters=2", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "does not match this model" in result.stderr
    assert "model name: checkpoint 'tiny-llama3', this run 'tiny-qwen3'" in result.stderr
    assert "model.layers.0.self_attn.q_norm.weight" in result.stderr  # qwen3 has q/k norms, llama not
    assert "Traceback" not in result.stderr


def test_keep_every_and_the_config_copy(tmp_path):
    pretrain(tmp_path, "20260101_000001", "training.train_iters=6", "checkpoint.save_interval=1",
             "checkpoint.keep_last=1", "checkpoint.keep_every=4")
    directory = checkpoints(tmp_path)
    assert sorted(p.name for p in directory.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    config = (directory / "iter_0000006" / "config.yaml").read_text()
    assert "keep_every: 4" in config and "name: tiny-qwen3" in config
    trainer_state = torch.load(directory / "iter_0000006" / "trainer.pt", weights_only=False)
    assert trainer_state["iteration"] == 6 and trainer_state["consumed_samples"] == 24
    assert trainer_state["scheduler"]["schedule"] == "cosine"


def test_wall_time_saves_agree_across_ranks(tmp_path):
    """save_interval_s: rank 0 decides, the decision is broadcast (a disagreement would hang DCP)."""
    pretrain(tmp_path, "20260101_000001", "training.train_iters=8", "checkpoint.save_interval=1000",
             "checkpoint.save_interval_s=0.001", "checkpoint.keep_last=0", procs=2)
    saved = sorted(p.name for p in checkpoints(tmp_path).glob("iter_*"))
    assert saved == [f"iter_{i:07d}" for i in range(1, 9)]


def test_time_budget_saves_and_stops(tmp_path):
    stop_file = tmp_path / "stop.json"
    env = {**job_env("20260101_000001"), "TRAIN_STOP_FILE": str(stop_file)}
    pretrain(tmp_path, "", "training.train_iters=100000", "checkpoint.save_interval=100000",
             "training.time_budget_s=2", env=env)
    stop = json.loads(stop_file.read_text())
    assert stop["reason"] == "time_budget" and 1 <= stop["iteration"] < 100000
    assert (checkpoints(tmp_path) / "latest_checkpointed_iteration.txt").read_text().strip() == str(stop["iteration"])
    assert max(losses(tmp_path, "20260101_000001")) == stop["iteration"]


def test_sigterm_saves_the_current_iteration_and_the_next_job_continues_from_it(tmp_path):
    stop_file = tmp_path / "stop.json"
    env = {**job_env("20260101_000001"), "TRAIN_STOP_FILE": str(stop_file)}
    process = subprocess.Popen([sys.executable, "-m", "train.pretrain", f"checkpoint.root={tmp_path}", *COMMON,
                                "training.train_iters=100000", "checkpoint.save_interval=100000"], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "iter 2 |" in line:
            process.send_signal(signal.SIGTERM)
            break
    output.extend(process.stdout)
    assert process.wait(timeout=60) == 0, "".join(output)[-3000:]
    stop = json.loads(stop_file.read_text())
    assert stop["reason"] == "signal" and stop["signal"] == "SIGTERM" and stop["iteration"] >= 2
    saved = int((checkpoints(tmp_path) / "latest_checkpointed_iteration.txt").read_text())
    assert saved == stop["iteration"] == max(losses(tmp_path, "20260101_000001"))
    pretrain(tmp_path, "20260101_000002", f"training.train_iters={saved + 1}", "checkpoint.save_interval=100000")
    assert sorted(losses(tmp_path, "20260101_000002")) == [saved + 1]
