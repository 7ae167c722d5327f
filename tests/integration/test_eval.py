"""python -m pytest tests/integration/test_eval.py  (2-process torchrun on gloo: evaluation, eval-only, NaN stop, status, plot)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-pretrain-Data-synthetic-lr0.0003"


def torchrun(root: Path, *overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_",
                                                                     "TRAIN_STOP_FILE", "PEAK_FLOPS"))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "train.pretrain",
               f"checkpoint.root={root}", "logging.tensorboard=false", *overrides]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> list[list[dict]]:
    """The JSONL records of each job start, oldest first."""
    return [[json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((run_dir / "logs").glob("*.jsonl"))]


def snapshot(checkpoints: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train = torchrun(root, "training.train_iters=6", "training.eval_interval=3", "training.eval_iters=2",
                     "checkpoint.save_interval=3", "training.log_params_norm=true")
    checkpoints = root / RUN / "checkpoints" / "tiny-qwen3"
    before = snapshot(checkpoints) if checkpoints.is_dir() else {}
    import time

    time.sleep(1.1)  # the eval-only job start gets its own log files (one-second timestamps)
    only = torchrun(root, "training.train_iters=6", "training.eval_only=true")
    return root, train, only, before


@pytest.mark.slow
def test_val_loss_at_every_eval_interval(evaluated):
    root, train, _, _ = evaluated
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    first = records(root / RUN)[0]
    evaluations = [r for r in first if "val_loss" in r]
    assert [r["iteration"] for r in evaluations] == [3, 6]
    for r in evaluations:
        assert 0 < r["val_loss"] < 20 and r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
    steps = [r for r in first if "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("lr", "grad_norm", "params_norm", "iter_time_s", "tokens_per_s", "tokens_per_s_per_device",
                "flops_per_token", "memory_peak_gb", "skipped"):
        assert isinstance(steps[-1][key], (int, float)), key
    assert steps[-1]["mfu"] is None and steps[-1]["memory_allocated_gb"] is None  # CPU
    assert "val_loss" in train.stdout and "mfu n/a" in train.stdout


@pytest.mark.slow
def test_eval_only_logs_val_metrics_and_saves_nothing(evaluated):
    root, train, only, before = evaluated
    assert only.returncode == 0, only.stdout[-3000:] + only.stderr[-3000:]
    latest = records(root / RUN)[-1]
    assert len(latest) == 1 and latest[0]["iteration"] == 6 and latest[0]["eval_only"] is True
    last_eval = [r for r in records(root / RUN)[0] if "val_loss" in r][-1]
    assert latest[0]["val_loss"] == pytest.approx(last_eval["val_loss"], rel=1e-5)  # same weights, same data
    assert snapshot(root / RUN / "checkpoints" / "tiny-qwen3") == before
    assert "resume: resume at iteration 6" in only.stdout


@pytest.mark.slow
def test_status_and_plot_of_a_real_run(evaluated):
    root = evaluated[0]
    status = subprocess.run([sys.executable, "-m", "train.status", str(root), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["run"] == RUN and row["iteration"] == 6 and row["train_iters"] == 6
    assert row["state"] == "eval_only" and row["checkpoint"] == "iter_0000006" and row["tokens_per_s"] > 0
    plot = subprocess.run([sys.executable, "-m", "train.plot", str(root / RUN)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert plot.returncode == 0, plot.stderr
    assert (root / RUN / "plots" / "val_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_non_finite_streak_stops_with_the_last_good_checkpoint(tmp_path):
    result = torchrun(tmp_path, "training.train_iters=10", "checkpoint.save_interval=2",
                      "training.debug_nan_at_iteration=3-10", "training.max_bad_iterations=2")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("stopping: 2 consecutive iterations with non-finite loss/grad norm (iterations 3-4); "
            "last good checkpoint is iter_0000002") in output
    checkpoints = tmp_path / RUN / "checkpoints" / "tiny-qwen3"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000002"]
    steps = [r for r in records(tmp_path / RUN)[0] if "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3]  # iteration 4 stops before it is logged
    assert steps[-1]["loss"] == "nan" and steps[-1]["skipped"] == 1
    status = subprocess.run([sys.executable, "-m", "train.status", str(tmp_path), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)[0]["state"] == "non_finite"
