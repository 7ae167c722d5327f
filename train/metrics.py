"""Metrics fan-out on rank 0: one console line, a JSONL run log, TensorBoard scalars, W&B (when
logging.wandb_project is set: train/wandb_sink.py).

JSONL (logs/<model>_<job>_<datetime>.jsonl): one JSON object per line, each with
"iteration" and "time". Training records (every training.log_interval):

    loss [kd_loss lm_loss] lr grad_norm [params_norm] iter_time_s step_time_max_s step_time_min_s
    slowest_rank tokens_per_s tokens_per_s_per_device flops_per_token mfu memory_allocated_gb
    memory_peak_gb skipped train_iters

iter_time_s is rank 0's wall time of the step; step_time_max_s / step_time_min_s the slowest and
fastest rank's, slowest_rank the slowest's rank (one all-gather of a float per logged step). Ranks
wait for each other in every collective, so their times differ by the work outside the step's
collectives (reading its batches before the first, the optimizer step after the last): a rank
slow at that shows as a spread; a rank slow in forward/backward slows every rank alike.

kd_loss and lm_loss (QAD) are the unweighted terms of loss, T^2 KL and CE, each only when the
job computes it (lm_loss when distill.lm_loss_weight > 0): loss = kd_loss_weight x kd_loss +
lm_loss_weight x lm_loss (+ the MoE auxiliary loss).

Evaluation records (every training.eval_interval, and the one of an eval-only job):
val_loss val_ppl (+ "eval_only": true). Values that do not exist on the device (MFU on
a CPU, CUDA memory on a CPU) are null in the JSONL, "n/a" on the console, and absent
from TensorBoard. On a CPU memory_peak_gb is the process's peak RSS (getrusage) and
memory_allocated_gb is null.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from train import mfu as mfu_lib

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig, TrainingConfig

log = logging.getLogger("train")
NOT_SCALARS = {"train_iters", "eval_only"}  # context fields: JSONL only
GB = 1024**3


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsLogger:
    """The sinks: console, JSONL, TensorBoard and (wandb: train/wandb_sink.py WandbSink) W&B."""

    def __init__(self, jsonl_path: Path | None, tensorboard_dir: Path | None, enabled: bool, wandb=None):
        self.enabled = enabled
        self.jsonl = open(jsonl_path, "a") if enabled and jsonl_path else None
        self.tensorboard = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(tensorboard_dir))
        self.wandb = wandb if enabled else None

    def log(self, iteration: int, metrics: dict) -> None:
        if not self.enabled:
            return
        text = " | ".join(f"{k} {format_value(v)}" for k, v in metrics.items() if k not in NOT_SCALARS)
        log.info("iter %d | %s", iteration, text)
        if self.jsonl and not self.jsonl.closed:
            record = {"iteration": iteration, "time": time.time(), **metrics}
            self.jsonl.write(json.dumps({k: json_safe(v) for k, v in record.items()}) + "\n")
            self.jsonl.flush()
        scalars = {key: value for key, value in metrics.items()
                   if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, iteration)
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(iteration, scalars)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.close()
            self.wandb = None


def json_safe(value):
    """NaN/inf are not JSON: they go into the log as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ------------------------------------------------------------------ what is measured

def step_time_spread(elapsed: float, device: str = "cpu") -> dict:
    """The slowest and fastest rank's step time and the slowest's rank (this rank's alone
    without a process group); every rank must call it (an all-gather, on the device: NCCL)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return {"step_time_max_s": elapsed, "step_time_min_s": elapsed, "slowest_rank": 0}
    times = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(times, torch.tensor([elapsed], dtype=torch.float64, device=device))
    values = [t.item() for t in times]
    slowest = max(range(len(values)), key=values.__getitem__)
    return {"step_time_max_s": values[slowest], "step_time_min_s": min(values), "slowest_rank": slowest}


def memory_gb(device: str) -> tuple[float | None, float | None]:
    """(allocated, peak) in GiB: CUDA allocator on a GPU; (None, peak RSS) on a CPU."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        return torch.cuda.memory_allocated(dev) / GB, torch.cuda.max_memory_allocated(dev) / GB
    try:
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None, None
    # Linux reports KiB, macOS bytes
    return None, peak_kb * (1 if sys.platform == "darwin" else 1024) / GB


@torch.no_grad()
def params_norm(model: torch.nn.Module) -> float:
    """L2 norm of all parameters. Sharded parameters (FSDP/TP DTensors) are gathered one at a
    time, so every rank must call this (it does: the metrics are computed on every rank)."""
    from torch.distributed.tensor import DTensor

    squares = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().float().pow(2).sum()
               for p in model.parameters()]
    return float(torch.stack(squares).sum().sqrt().item()) if squares else 0.0


class IterationMetrics:
    """The training record of one logged iteration (see the module docstring); the trainer holds
    one (trainer.iteration_metrics). The model's FLOPs per token and the device's peak FLOP/s
    are measured on the first record and kept."""

    def __init__(self, cfg: JobConfig, plan, world_size: int, device: str):
        self.cfg, self.plan, self.world_size, self.device = cfg, plan, world_size, device
        self.flops_per_token: float | None = None
        self.peak_flops: float | None = None

    def __call__(self, model, state, loss: float, lr: float, grad_norm: float, elapsed: float,
                 loss_terms: dict | None = None) -> dict:
        cfg, plan = self.cfg, self.plan
        tokens = plan.global_batch_size * cfg.data.seq_length
        tokens_per_s = tokens / elapsed if elapsed > 0 else 0.0
        per_device = tokens_per_s / max(self.world_size, 1)
        if self.flops_per_token is None:
            self.flops_per_token = mfu_lib.model_flops_per_token(model, cfg.data.seq_length)
            self.peak_flops = mfu_lib.device_peak_flops(self.device)
        allocated, peak = memory_gb(self.device)
        metrics = {"loss": loss, **(loss_terms or {}), "lr": lr, "grad_norm": grad_norm}
        if cfg.training.log_params_norm:
            metrics["params_norm"] = params_norm(model)
        metrics.update({
            "iter_time_s": elapsed, **step_time_spread(elapsed, self.device),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
            "flops_per_token": self.flops_per_token,
            "mfu": mfu_lib.mfu(self.flops_per_token, per_device, self.peak_flops),
            "memory_allocated_gb": allocated, "memory_peak_gb": peak,
            "skipped": state.skipped_iterations, "train_iters": plan.train_iters,
        })
        return metrics


# ------------------------------------------------------------------ non-finite guard

class NonFiniteStop(SystemExit):
    """Raised on every rank after max_bad_iterations non-finite iterations in a row (exit 3)."""

    EXIT_CODE = 3

    def __init__(self, message: str):
        super().__init__(self.EXIT_CODE)
        self.message = message


def is_bad(loss: float, grad_norm: float) -> bool:
    return not (math.isfinite(loss) and math.isfinite(grad_norm))


def debug_nan(trainer, loss: float) -> float:
    """training.debug_nan_at_iteration=N[,M-K]: report a NaN loss at those iterations (tests)."""
    spec = str(trainer.cfg.training.debug_nan_at_iteration or "").strip()
    if not spec:
        return loss
    from train.data.sampler import parse_iterations_to_skip

    return float("nan") if trainer.state.iteration + 1 in set(parse_iterations_to_skip(spec)) else loss


class NonFiniteGuard:
    """Counts non-finite iterations in a row; the trainer holds one (trainer.non_finite). After
    training.max_bad_iterations of them (0: never) check() raises NonFiniteStop: the trainer
    then stops the job without saving (the last good checkpoint stays the latest)."""

    def __init__(self, training_cfg: TrainingConfig, latest_checkpoint, is_main: bool):
        self.limit = training_cfg.max_bad_iterations
        self.latest_checkpoint = latest_checkpoint  # () -> the last saved iteration, or None
        self.is_main = is_main
        self.streak = 0

    def check(self, bad: bool, iteration: int) -> None:
        """bad: iteration + 1 (the one just computed) had a non-finite loss or grad norm."""
        self.streak = self.streak + 1 if bad else 0
        if bad and self.is_main:
            log.warning("iteration %d: non-finite loss or grad norm, optimizer step skipped (%d in a row)",
                        iteration + 1, self.streak)
        if not self.limit or self.streak < self.limit:
            return
        last = self.latest_checkpoint()
        good = f"iter_{last:07d}" if last is not None else "none (no checkpoint saved yet)"
        raise NonFiniteStop(f"stopping: {self.streak} consecutive iterations with non-finite loss/grad norm "
                            f"(iterations {iteration + 2 - self.streak}-{iteration + 1}); "
                            f"last good checkpoint is {good}")
