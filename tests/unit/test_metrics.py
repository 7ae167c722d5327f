"""python -m pytest tests/unit/test_metrics.py  (MFU arithmetic, peak table, metric records, NaN guard; CPU, fast)"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from train import mfu as mfu_lib
from train.metrics import IterationMetrics, MetricsLogger, NonFiniteGuard, NonFiniteStop, debug_nan, is_bad, memory_gb
from train.models.registry import flops_per_token, get_model_args


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA RTX A6000", 154.8e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
    ("NVIDIA A10", 125e12), ("NVIDIA A10G", 70e12), ("NVIDIA L4", 121e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA GB200", 2500e12), ("NVIDIA GeForce GTX 1080", None), ("", None), (None, None),
])
def test_peak_table_matches_device_names(name, peak):
    assert mfu_lib.peak_flops_for_name(name) == peak


def test_cpu_has_no_peak_and_env_overrides(monkeypatch):
    monkeypatch.delenv("PEAK_FLOPS", raising=False)
    assert mfu_lib.device_peak_flops("cpu") is None
    monkeypatch.setenv("PEAK_FLOPS", "1e12")
    assert mfu_lib.device_peak_flops("cpu") == 1e12


def test_mfu_arithmetic():
    # 6e9 FLOPs/token x 50k tokens/s per GPU = 3e14 FLOP/s; on an H100 (989e12) that is ~30.3 %
    assert mfu_lib.mfu(6e9, 50_000, 989e12) == pytest.approx(3e14 / 989e12)
    assert mfu_lib.mfu(6e9, 50_000, None) is None
    assert mfu_lib.mfu(None, 50_000, 989e12) is None
    assert mfu_lib.mfu(6e9, 0.0, 989e12) is None


def test_model_flops_per_token_unwraps_ddp_like_wrappers():
    args = get_model_args("tiny-qwen3")
    inner = SimpleNamespace(args=args)
    assert mfu_lib.model_flops_per_token(SimpleNamespace(module=inner), 64) == flops_per_token(args, 64)
    assert mfu_lib.model_flops_per_token(torch.nn.Linear(2, 2), 64) is None


def fake_trainer(tmp_path, log_params_norm=False, max_bad=3, debug_nan_at=None, world_size=2):
    cfg = OmegaConf.create({"data": {"seq_length": 64},
                            "training": {"log_params_norm": log_params_norm, "max_bad_iterations": max_bad,
                                         "debug_nan_at_iteration": debug_nan_at}})
    model = torch.nn.Linear(3, 4, bias=False)
    model.args = get_model_args("tiny-qwen3")
    with torch.no_grad():
        model.weight.fill_(1.0)
    checkpoints = SimpleNamespace(latest_iteration=lambda: 4, finalize=lambda: None)
    return SimpleNamespace(cfg=cfg, model=model, plan=SimpleNamespace(global_batch_size=8, train_iters=100),
                           ctx=SimpleNamespace(world_size=world_size, device="cpu", is_main=True),
                           state=SimpleNamespace(iteration=6, skipped_iterations=1), checkpoints=checkpoints,
                           metrics=MetricsLogger(None, None, enabled=False))


def iteration_metrics(trainer, *values):
    """The record IterationMetrics makes for `trainer` (a fresh meter: it measures FLOPs once)."""
    meter = IterationMetrics(trainer.cfg, trainer.plan, trainer.ctx.world_size, trainer.ctx.device)
    return meter(trainer.model, trainer.state, *values)


def test_iteration_metrics_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("PEAK_FLOPS", raising=False)
    trainer = fake_trainer(tmp_path, log_params_norm=True)
    metrics = iteration_metrics(trainer, 2.5, 1e-4, 0.7, 0.5)
    assert metrics["tokens_per_s"] == 8 * 64 / 0.5 and metrics["tokens_per_s_per_device"] == 8 * 64 / 0.5 / 2
    assert metrics["flops_per_token"] == flops_per_token(get_model_args("tiny-qwen3"), 64)
    assert metrics["mfu"] is None and metrics["memory_allocated_gb"] is None
    assert metrics["memory_peak_gb"] > 0.01  # the RSS peak of this process
    assert metrics["params_norm"] == pytest.approx(math.sqrt(12))
    assert metrics["skipped"] == 1 and metrics["train_iters"] == 100
    assert "params_norm" not in iteration_metrics(fake_trainer(tmp_path), 2.5, 1e-4, 0.7, 0.5)


def test_mfu_with_a_known_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("PEAK_FLOPS", "1e12")
    metrics = iteration_metrics(fake_trainer(tmp_path), 2.5, 1e-4, 0.7, 0.5)
    assert metrics["mfu"] == pytest.approx(metrics["flops_per_token"] * metrics["tokens_per_s_per_device"] / 1e12)


def test_memory_on_cpu():
    allocated, peak = memory_gb("cpu")
    assert allocated is None and peak > 0


def test_jsonl_nulls_and_non_finite_values(tmp_path, caplog):
    path = tmp_path / "run.jsonl"
    logger = MetricsLogger(path, None, enabled=True)
    with caplog.at_level("INFO", logger="train"):
        logger.log(3, {"loss": float("nan"), "mfu": None, "skipped": 2, "train_iters": 10})
    logger.close()
    record = json.loads(path.read_text())
    assert record["iteration"] == 3 and record["loss"] == "nan" and record["mfu"] is None
    assert record["train_iters"] == 10
    assert "mfu n/a" in caplog.text and "train_iters" not in caplog.text


def test_bad_streak_stops_after_k_in_a_row(tmp_path, monkeypatch, capsys):
    trainer = fake_trainer(tmp_path, max_bad=3)
    assert is_bad(float("nan"), 1.0) and is_bad(1.0, float("inf")) and not is_bad(1.0, 1.0)
    guard = NonFiniteGuard(trainer.cfg.training, trainer.checkpoints.latest_iteration, is_main=True)
    guard.check(True, 6)
    guard.check(True, 6)
    guard.check(False, 6)  # a good iteration resets the count
    guard.check(True, 6)
    guard.check(True, 6)
    with pytest.raises(NonFiniteStop) as stop:
        guard.check(True, 6)
    assert stop.value.code == 3 and guard.streak == 3
    assert "stopping: 3 consecutive iterations with non-finite loss/grad norm (iterations 5-7)" in stop.value.message
    assert "last good checkpoint is iter_0000004" in stop.value.message


def test_non_finite_stop_writes_the_stop_file_once(tmp_path, monkeypatch, capsys):
    """The trainer ends the job: stderr line, stop file (its only writer), exit code 3."""
    from train.trainer import Trainer

    stop_file = tmp_path / "stop.json"
    monkeypatch.setenv("TRAIN_STOP_FILE", str(stop_file))
    trainer = fake_trainer(tmp_path)
    trainer.cfg.checkpoint = {"requeue": True}
    trainer.stop = SimpleNamespace(signal_name=None)
    trainer.write_stop_file = lambda reason, message=None: Trainer.write_stop_file(trainer, reason, message)
    with pytest.raises(NonFiniteStop) as stop:
        Trainer.stop_non_finite(trainer, NonFiniteStop("stopping: 3 consecutive iterations; last good checkpoint "
                                                       "is iter_0000004"))
    assert stop.value.code == 3
    assert "error: stopping: 3 consecutive iterations; last good checkpoint is iter_0000004" in capsys.readouterr().err
    record = json.loads(stop_file.read_text())
    assert record["reason"] == "non_finite" and record["requeue"] is False and record["iteration"] == 6


def test_debug_nan_hook(tmp_path):
    trainer = fake_trainer(tmp_path, debug_nan_at="7-9")  # state.iteration 6: the next one is 7
    assert math.isnan(debug_nan(trainer, 1.0))
    trainer.state.iteration = 9
    assert debug_nan(trainer, 1.0) == 1.0
    assert debug_nan(fake_trainer(tmp_path), 1.0) == 1.0


STEP_TIMES = {6: [0.5, 1.25], 7: [2.0, 0.75]}  # {iteration: [rank 0's, rank 1's step time]}: each rank slowest once


def log_steps_on_rank(rank: int, tmp_path) -> None:
    """One rank of a 2-process gloo group: the records of two logged steps, rank 0 writing the JSONL."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=rank, world_size=2)
    try:
        trainer = fake_trainer(tmp_path)
        logger = MetricsLogger(tmp_path / "run.jsonl", None, enabled=rank == 0)
        for iteration, elapsed_by_rank in STEP_TIMES.items():
            logger.log(iteration, iteration_metrics(trainer, 2.5, 1e-4, 0.7, elapsed_by_rank[rank]))
        logger.close()
    finally:
        dist.destroy_process_group()


def test_the_record_carries_the_slowest_and_fastest_ranks_step_time(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(log_steps_on_rank, args=(tmp_path,), nprocs=2)
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [record["iteration"] for record in records] == list(STEP_TIMES)
    for record, elapsed_by_rank in zip(records, STEP_TIMES.values()):
        assert record["step_time_max_s"] == max(elapsed_by_rank)
        assert record["step_time_min_s"] == min(elapsed_by_rank)
        assert record["slowest_rank"] == elapsed_by_rank.index(max(elapsed_by_rank))
        assert record["iter_time_s"] == elapsed_by_rank[0]  # rank 0's own


def test_one_process_reports_its_own_step_time(tmp_path):
    metrics = iteration_metrics(fake_trainer(tmp_path), 2.5, 1e-4, 0.7, 0.5)
    assert (metrics["step_time_max_s"], metrics["step_time_min_s"], metrics["slowest_rank"]) == (0.5, 0.5, 0)
