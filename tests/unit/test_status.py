"""python -m pytest tests/unit/test_status.py  (python -m train.status on fabricated run directories; fast)"""

import json
import os
import stat
import time

import pytest

from train import status


def make_run(root, name, *, records, stamp="20250101_000000", job_id=None, log_tail="", stop=None,
             tracker=None, config_iters=None):
    run = root / name
    logs = run / "logs"
    logs.mkdir(parents=True)
    (logs / f"m_pretrain_{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = "# Environment of pretrain job\nPATH=/bin\n" + (f"SLURM_JOB_ID={job_id}\n" if job_id else "")
    (logs / f"m_{stamp}.env.log").write_text(env)
    (logs / f"m_pretrain_{stamp}.log").write_text("[00:00:00 rank0] pretrain job\n" + log_tail)
    (logs / f"m_pretrain_{stamp}.config.yaml").write_text(
        f"training:\n  train_iters: {config_iters if config_iters else 'null'}\n")
    if stop:
        (logs / f"stop_{stamp}.json").write_text(json.dumps({"reason": stop, "requeue": False}))
    if tracker is not None:
        checkpoints = run / "checkpoints" / "m"
        (checkpoints / f"iter_{tracker:07d}").mkdir(parents=True)
        (checkpoints / "latest_checkpointed_iteration.txt").write_text(f"{tracker}\n")
    return run


def steps(iterations, start_time, seconds_per_iteration=2.0, train_iters=100):
    return [{"iteration": i, "time": start_time + i * seconds_per_iteration, "loss": 10.0 / i, "lr": 1e-4,
             "iter_time_s": 1.0, "tokens_per_s": 5000.0, "train_iters": train_iters} for i in iterations]


@pytest.fixture
def no_squeue(monkeypatch):
    monkeypatch.setattr(status.shutil, "which", lambda name: None)


def test_fabricated_runs(tmp_path, no_squeue, capsys):
    now = time.time()
    make_run(tmp_path, "a-running", records=steps(range(1, 11), now - 20), tracker=10)  # last record 0 s ago
    make_run(tmp_path, "b-done", records=steps(range(1, 5), now - 5000, train_iters=4), stop="done", tracker=4)
    make_run(tmp_path, "c-dead", records=steps(range(1, 3), now - 5000, train_iters=None), config_iters=50)
    make_run(tmp_path, "d-nan", records=steps(range(1, 3), now - 5000),
             log_tail="[00:00:01 rank0] stopping: 5 consecutive iterations with non-finite loss/grad norm\n")
    (tmp_path / "logs_slurm").mkdir()
    assert status.main([str(tmp_path), "--json"]) == 0
    rows = {row["run"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"a-running", "b-done", "c-dead", "d-nan"}
    running = rows["a-running"]
    assert running["state"] == "running" and running["iteration"] == 10 and running["loss"] == 1.0
    assert running["eta_s"] == pytest.approx(90 * 2.0)  # wall time between records: 2 s per iteration
    assert running["checkpoint"] == "iter_0000010" and running["tokens_per_s"] == 5000.0
    assert rows["b-done"]["state"] == "done" and rows["b-done"]["eta_s"] is None
    assert rows["c-dead"]["state"] == "dead" and rows["c-dead"]["train_iters"] == 50  # from the config
    assert rows["d-nan"]["state"] == "non_finite"
    assert status.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["RUN", "JOB", "STATE", "ITER", "LOSS", "TOK/S", "ETA", "CKPT"]
    assert table[1].split() == ["a-running", "-", "running", "10/100", "1.0000", "5000", "0:03:00", "iter_0000010"]


def test_state_from_squeue_when_slurm_knows_the_job(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "squeue"
    fake.write_text('#!/bin/sh\n[ "$3" = 4242 ] && echo RUNNING\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "root"
    make_run(root, "slurm-run", records=steps(range(1, 4), time.time() - 10000), job_id="4242")
    make_run(root, "gone", records=steps(range(1, 4), time.time() - 10000), job_id="17", stop="signal")
    assert status.main([str(root), "--json"]) == 0
    rows = {row["run"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["slurm-run"]["job_id"] == "4242" and rows["slurm-run"]["state"] == "RUNNING"
    assert rows["slurm-run"]["eta_s"] == pytest.approx(97 * 2.0)
    assert rows["gone"]["state"] == "signal"  # squeue no longer knows job 17: the stop file


def test_default_root_from_the_environment(tmp_path, monkeypatch, no_squeue, capsys):
    make_run(tmp_path, "r", records=steps([1], time.time() - 5000))
    monkeypatch.setenv("QAD_CHECKPOINT_ROOT", str(tmp_path))
    assert status.main([]) == 0
    assert "r " in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "no_runs"])
def test_errors_exit_2(tmp_path, capsys, case):
    root = tmp_path / "root"
    if case == "no_runs":
        (root / "logs_slurm").mkdir(parents=True)
    assert status.main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("no runs" in err if case == "no_runs" else "no such directory" in err)
