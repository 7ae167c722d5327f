"""The training loop: a stateful Trainer over a model built and parallelized outside it.

One iteration = one optimizer step over a global batch of GBS sequences:
GBS = MBS x data-parallel size x gradient-accumulation steps.

The step's loss is token-weighted: the sum of the per-token losses over every loss-mask token
of the global batch, divided by the number of those tokens (loss_tokens: one all-reduce of the
count per step, before the backward passes), so its value and gradient do not depend on how
GBS is split; the MoE auxiliary loss stays a mean per micro-batch, averaged over the step's
micro-batches. Gradients are reduced over the data-parallel ranks once per step, in the last
micro-batch's backward (train.parallel.gradient_sync).

The loop only, and no utility module: within train/ only the job runner (train/engine.py)
imports it. Its parts live where other jobs reach them without the loop: the losses in
train/losses.py (language_model_loss is the default loss_fn), batch collation in
train/data/collate.py, in-loop validation and early stopping in train/validation.py.

Its components own their state and are created in Trainer.__init__: the checkpoints
(CheckpointManager), the metrics sinks (MetricsLogger) and the training record
(IterationMetrics), the non-finite guard (NonFiniteGuard), validation with early stopping
(Validation), the stop request (StopRequest) and the hang watchdog (HangWatchdog: a rank
that stops ends the job with a line naming it). Ranks and sizes come from the job's ParallelLayout (train/parallel/layout.py); the trainer alone writes the stop file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from train.checkpoint import CheckpointManager
from train.data.collate import Prefetcher, to_batch
from train.data.sampler import MicroBatchSampler, parse_iterations_to_skip
from train.launch.job import JobContext
from train.launch.torchrun import write_error_record
from train.launch.watchdog import HangWatchdog
from train.losses import language_model_loss, split_loss
from train.metrics import IterationMetrics, MetricsLogger, NonFiniteGuard, NonFiniteStop, debug_nan, is_bad
from train.optim import build_optimizer, fold_clipping_into_step, learning_rate
from train.parallel import (Pipeline, build_zero_redundancy_optimizer, clip_gradients, expert_checkpoint_view, gradient_sync,
                            local_view, wants_zero_redundancy_optimizer, zero_redundancy_optimizer_state_dict)
from train.parallel.layout import ParallelLayout
from train.validation import Validation, build_early_stopping
from train.wandb_sink import start_wandb

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig

log = logging.getLogger("train")
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)  # the sbatch wrappers ask for B:USR2@<grace>


class StopRequest:
    """Set by SIGUSR2/SIGTERM; ranks agree on it after each iteration (one tiny all-reduce)."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([1 if self.signal_name else 0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def loss_tokens(micro_batches: list, layout: ParallelLayout) -> torch.Tensor:
    """The denominator of every micro-batch's token loss in one step: N / (accumulation x dp),
    N the loss-mask tokens of the global batch (this rank's micro-batches, summed over the ranks
    by one all-reduce; the TP ranks and pipeline stages of a data-parallel rank hold the same batches).

    Each micro-batch then contributes sum_mb x accumulation x dp / N; the trainer divides by
    accumulation and DDP / FSDP2 average gradients over the dp ranks, which leaves sum / N over
    the global batch exactly."""
    count = sum(mask.sum(dtype=torch.float64) for _, _, mask in micro_batches)  # exact up to 2^53 tokens
    if dist.is_initialized() and layout.world_size > 1:
        dist.all_reduce(count)
        count = count / (layout.tp * layout.pp)
    return (count.clamp(min=1) / (len(micro_batches) * layout.dp_size)).float()


def accumulate_gradients(model, loss_fn, micro_batches: list, layout: ParallelLayout, precision: str,
                         sync_every_micro_batch: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one step's micro-batches [(inputs, targets, mask)], gradients
    reduced over the data-parallel ranks once, in the last backward; in every backward with
    sync_every_micro_batch (FSDP2 ZeRO-3, DP_SHARDING=fsdp: skipping the reduce-scatter would keep
    whole unsharded gradients on every rank until the last micro-batch, the memory FSDP is chosen
    to save). Returns this rank's share of the step's loss (the mean over the ranks is the logged
    loss, the global token mean) and of its terms ({name: share}, e.g. QAD's kd_loss, lm_loss)."""
    accumulation = len(micro_batches)
    tokens = loss_tokens(micro_batches, layout)
    total_loss = torch.zeros((), device=layout.device)
    terms: dict[str, torch.Tensor] = {}
    # bf16: autocast the forward; parameters, gradients and AdamW state stay fp32 (master weights)
    autocast = torch.autocast(torch.device(layout.device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for index, (inputs, targets, mask) in enumerate(micro_batches):
        with gradient_sync(model, sync=sync_every_micro_batch or index == accumulation - 1):
            with autocast:
                # the auxiliary (MoE) term is per micro-batch: / accumulation makes it the step's mean
                loss, micro_terms = split_loss(loss_fn(model, inputs, targets, mask, tokens=tokens))
                loss = loss / accumulation
            loss.backward()
        total_loss += loss.detach()
        for name, value in micro_terms.items():  # divided by the same tokens as the loss
            terms[name] = terms.get(name, 0.0) + value.float() / accumulation
    return total_loss, terms


def schedule_change(saved: dict | None, train_iters: int, iteration: int, optim) -> str | None:
    """One line when a resumed run's TRAIN_ITERS differs from the checkpoint's: the LR schedule
    (a function of the iteration and TRAIN_ITERS, train/optim.py) is recomputed over the new length."""
    saved_iters = (saved or {}).get("train_iters")
    if saved_iters in (None, train_iters):
        return None
    before, after = learning_rate(iteration, saved_iters, optim), learning_rate(iteration, train_iters, optim)
    return (f"TRAIN_ITERS changed on resume: {saved_iters} -> {train_iters}; the {optim.schedule} LR schedule is "
            f"recomputed over {train_iters} iterations: LR at iteration {iteration} {before:.4g} -> {after:.4g}")


@dataclass
class TrainState:
    iteration: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global, over all data-parallel ranks
    skipped_iterations: int = 0


class Trainer:
    def __init__(self, cfg: JobConfig, ctx: JobContext, layout: ParallelLayout, model: torch.nn.Module, dataset, loss_fn=None,
                 checkpoint_files: dict | None = None):
        self.cfg, self.ctx, self.layout, self.model, self.dataset = cfg, ctx, layout, model, dataset
        self.checkpoint_files = checkpoint_files or {}  # {file name: object} saved by rank 0 in each checkpoint
        self.plan = ctx.plan
        self.loss_fn = loss_fn or language_model_loss
        # ZeRO-1 (parallel.data_parallel=zero1): AdamW state sharded over the data-parallel ranks
        self.zero1 = wants_zero_redundancy_optimizer(cfg.parallel)
        self.optimizer = (build_zero_redundancy_optimizer(model, cfg.optim) if self.zero1
                          else build_optimizer(model, cfg.optim))
        self.state = TrainState()
        # PP_SIZE > 1: the step runs through the (interleaved) 1F1B schedule of this rank's stages (parallel/pipeline.py);
        # a loss_fn with pipeline_loss(model) (QAD's) readies the stage and returns the last stage's loss
        self.pipeline = Pipeline(model, layout, self.accumulation, stage_loss=self.stage_loss()) \
            if layout.pp > 1 else None
        self.loss_terms: dict[str, float] = {}  # the last step's loss terms (QAD: kd_loss, lm_loss), for the logs
        self.checkpoints = CheckpointManager(
            self.plan.paths.checkpoints, cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
            save_interval_s=cfg.checkpoint.save_interval_s, async_save=cfg.checkpoint.async_save,
            max_failed_saves=cfg.checkpoint.max_failed_saves)
        self.checkpoints.clean_leftovers()  # *.tmp of a save that was killed
        self._saved_iteration = None  # the iteration this process last saved or resumed from
        self.metrics = MetricsLogger(self.plan.paths.metrics_log if cfg.logging.jsonl else None,
                                     self.plan.paths.tensorboard if cfg.logging.tensorboard else None,
                                     enabled=ctx.is_main, wandb=start_wandb(cfg, self.plan, ctx.is_main))
        self.iteration_metrics = IterationMetrics(cfg, self.plan, layout.world_size, layout.device)
        self.non_finite = NonFiniteGuard(cfg.training, self.checkpoints.latest_iteration, ctx.is_main)
        self.iterations_to_skip = set(parse_iterations_to_skip(cfg.data.iterations_to_skip))
        self.stop = StopRequest()
        self.watchdog = HangWatchdog(self.plan.paths.train_log.parent, self.plan.paths.datetime, ctx.rank,
                                     ctx.world_size, cfg.parallel.timeout_s, ctx.device)
        try:  # the early-stopping tracker: None unless early_stop_patience > 0
            early_stopping = build_early_stopping(cfg.training)
        except ValueError as error:
            from train.launch.job import fail

            fail(str(error))
        self.validation = Validation(cfg, ctx, layout, self.metrics, early_stopping)

    def stage_loss(self):
        """The pipeline's last-stage loss of this job's loss_fn (None: the pretrain loss)."""
        pipeline_loss = getattr(self.loss_fn, "pipeline_loss", None)
        return pipeline_loss(self.model) if pipeline_loss is not None else None

    @property
    def early_stopping(self):
        return self.validation.early_stopping

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """trainer.pt. The LR schedule has no state of its own: the LR is a pure function of the
        iteration (train/optim.py learning_rate); "scheduler" records its settings for reference."""
        optim = self.cfg.optim
        return {"iteration": self.state.iteration, "consumed_samples": self.state.consumed_samples,
                "skipped_iterations": self.state.skipped_iterations, "model_name": str(self.cfg.model.name),
                "scheduler": {"schedule": str(optim.schedule), "lr": optim.lr, "min_lr": optim.min_lr,
                              "warmup_iters": optim.warmup_iters, "train_iters": self.plan.train_iters,
                              "last_lr": self.optimizer.param_groups[0]["lr"]},
                "early_stopping": self.early_stopping.state_dict() if self.early_stopping else None}

    def load_state_dict(self, state: dict) -> None:
        self.state = TrainState(state["iteration"], state["consumed_samples"], state["skipped_iterations"])
        saved = state.get("early_stopping")
        if self.early_stopping is not None and saved:  # keep this run's patience and min_delta
            for key in ("best_loss", "best_iteration", "evaluations_without_improvement", "stopped"):
                setattr(self.early_stopping, key, saved[key])
            if saved["best_iteration"] is not None:
                self.checkpoints.protected = {saved["best_iteration"]}

    def tensors(self) -> dict:
        if self.zero1:  # each rank's share, in get_state_dict's layout: DCP merges them
            return {"model": get_model_state_dict(self.model),
                    "optimizer": zero_redundancy_optimizer_state_dict(self.model, self.optimizer)}
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        # EP: local experts (and their moments) as DTensors of the global shape, so DCP reshards them
        view = expert_checkpoint_view(self.model, {"model": model_state, "optimizer": optimizer_state})
        # PP, tied embeddings: the last stage's lm_head copy keeps AdamW state under PP_SIZE=1's name
        return self.pipeline.checkpoint_view(view) if self.pipeline is not None else view

    def save(self) -> None:
        """Saves the current iteration (once: a second call at the same iteration does nothing)."""
        if self._saved_iteration == self.state.iteration:
            return
        from omegaconf import OmegaConf

        config_yaml = OmegaConf.to_yaml(self.cfg, resolve=True) if self.ctx.is_main else None
        saved = self.checkpoints.save(self.state.iteration, self.tensors(), self.state_dict(), config_yaml,
                                      files=self.checkpoint_files, run_facts=self.run_facts())
        if saved is not None:  # None: failed, logged, retried later
            self._saved_iteration = self.state.iteration

    def run_facts(self) -> dict:
        """What a job resuming this run must keep (train/launch/inputs.py resume_problems)."""
        return {"job": self.plan.job, "global_batch_size": self.plan.global_batch_size,
                "micro_batch_size": self.cfg.training.micro_batch_size, "seq_length": self.cfg.data.seq_length,
                "data_parallel_size": self.plan.data_parallel_size}

    def resume(self) -> None:
        from train.checkpoint import CheckpointDamaged, CheckpointMismatch
        from train.launch.job import fail

        iteration = self.plan.resume.iteration
        tensors = self.tensors()
        param_groups = [list(group["params"]) for group in tensors["optimizer"]["param_groups"]] \
            if self.pipeline is not None else []  # this stage's parameter names, for loaded_view
        try:
            trainer_state = self.checkpoints.load(iteration, tensors, model_name=str(self.cfg.model.name))
        except (CheckpointMismatch, CheckpointDamaged) as error:
            fail(str(error))
        if self.zero1:  # the optimizer's own tensors were filled in place by the load
            set_model_state_dict(self.model, tensors["model"])
        else:
            tensors = local_view(tensors)  # EP: back to the local experts
            if self.pipeline is not None:
                tensors = self.pipeline.loaded_view(tensors, param_groups)
            set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                           optim_state_dict=tensors["optimizer"])
        self.load_state_dict(trainer_state)
        self._saved_iteration = self.state.iteration
        change = schedule_change(trainer_state.get("scheduler"), self.plan.train_iters, self.state.iteration,
                                 self.cfg.optim)
        if change:
            log.warning("%s", change)
        log.info("resumed from %s: iteration %d, %d samples consumed", self.checkpoints.path(iteration),
                 self.state.iteration, self.state.consumed_samples)

    # ---------------------------------------------------------------- loop
    def microbatches(self, depth: int) -> Prefetcher:
        """This rank's micro-batches from consumed_samples on, read and collated (pinned, copied
        asynchronously on CUDA) by a background thread up to `depth` micro-batches ahead."""
        total = self.plan.train_iters * self.plan.global_batch_size
        sampler = MicroBatchSampler(total, self.state.consumed_samples, self.cfg.training.micro_batch_size,
                                    self.layout.dp_rank, self.layout.dp_size)
        return Prefetcher((to_batch([self.dataset[i] for i in indices], self.layout.device) for indices in sampler),
                          depth)

    @property
    def accumulation(self) -> int:
        """Micro-batches per step on each data-parallel rank: GBS / (MBS x dp)."""
        return self.plan.global_batch_size // (self.cfg.training.micro_batch_size * self.layout.dp_size)

    @property
    def max_grad_norm(self) -> float:
        """optim.grad_clip; 0 turns clipping off, as Megatron's --clip-grad 0 (the norm is still logged)."""
        return self.cfg.optim.grad_clip or math.inf

    def pipeline_step(self, micro_batches: list) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """train_step's forward, backward and clipping through the pipeline schedule (PP_SIZE > 1)."""
        tokens = loss_tokens(micro_batches, self.layout)
        autocast = torch.autocast(torch.device(self.layout.device).type, dtype=torch.bfloat16,
                                  enabled=self.cfg.training.precision == "bf16")
        with autocast:
            total_loss, terms = self.pipeline.step(micro_batches, tokens, self.layout.device)
        self.optimizer.grad_scale = None  # clipped in place below, not folded into the step
        return total_loss, terms, self.pipeline.clip_gradients(self.max_grad_norm)

    def train_step(self, batches, accumulation: int) -> tuple[float, float]:
        """Forward/backward over `accumulation` micro-batches, then the gradient norm (clipping);
        the optimizer step is the caller's. Returns (the step's loss, the gradient norm); the loss
        terms a loss_fn returns (train.losses.split_loss) go to self.loss_terms, reduced the same way."""
        micro_batches = [next(batches) for _ in range(accumulation)]  # all of them: loss_tokens counts first
        if self.pipeline is not None:
            total_loss, terms, grad_norm = self.pipeline_step(micro_batches)
        else:
            total_loss, terms = accumulate_gradients(self.model, self.loss_fn, micro_batches, self.layout,
                                                     self.cfg.training.precision,
                                                     sync_every_micro_batch=self.cfg.parallel.data_parallel == "fsdp")
            # fused AdamW: the clipping factor goes into the next optimizer.step() (train/optim.py)
            grad_norm = fold_clipping_into_step(self.model, self.optimizer, self.max_grad_norm)
        if grad_norm is None:
            # clip_grad_norm_; under EP it first finishes the expert gradients (train/parallel/expert_parallel.py)
            grad_norm = clip_gradients(self.model, self.max_grad_norm)
        reduced = torch.stack([total_loss.float(), *terms.values()])  # one all-reduce for the loss and its terms
        if dist.is_initialized():
            dist.all_reduce(reduced, op=dist.ReduceOp.AVG)
        values = reduced.tolist()
        self.loss_terms = dict(zip(terms, values[1:]))
        return values[0], grad_norm.item()

    def periodic_save_due(self) -> bool:
        """This iteration is a multiple of checkpoint.save_interval (0: no periodic saves; the last
        iteration, a signal and save_interval_s still save)."""
        interval = self.cfg.checkpoint.save_interval
        return bool(interval) and self.state.iteration % interval == 0

    def train(self) -> str:
        """Runs to train_iters; returns why it stopped: done | signal | time_budget | early_stop."""
        if self.plan.resume.decision == "resume":
            self.resume()
        cfg, plan = self.cfg, self.plan
        if cfg.training.eval_only:
            return self.eval_only()
        if self.early_stopping is not None and self.early_stopping.stopped:
            log.info("early stopping: this run already stopped (best val_loss %.4f at iteration %s)",
                     self.early_stopping.best_loss, self.early_stopping.best_iteration)
            self.metrics.close()
            self.write_stop_file("early_stop")
            return "early_stop"
        accumulation = self.accumulation
        tokens_per_iter = plan.global_batch_size * cfg.data.seq_length
        # the next step's micro-batches read while this one runs; none when a resumed run is already done
        batches = self.microbatches(depth=2 * accumulation) if self.state.iteration < plan.train_iters \
            else Prefetcher(iter(()), 1)
        started, reason = time.time(), "done"
        self.model.train()
        self.watchdog.start(self.state.iteration)
        while self.state.iteration < plan.train_iters:
            tick = time.time()
            lr = learning_rate(self.state.iteration, plan.train_iters, cfg.optim)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = self.train_step(batches, accumulation)
            if "first_step" not in self.ctx.timeline:
                self.ctx.mark("first_step")
            loss = debug_nan(self, loss)
            bad = is_bad(loss, grad_norm)  # same on every rank: loss all-reduced, grads synced
            try:
                self.non_finite.check(bad, self.state.iteration)
            except NonFiniteStop as stop:  # after max_bad_iterations in a row
                self.stop_non_finite(stop)
            skip = (self.state.iteration + 1) in self.iterations_to_skip or bad
            if skip:
                self.state.skipped_iterations += 1
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.iteration += 1
            self.state.consumed_samples += plan.global_batch_size
            elapsed = time.time() - tick
            if self.state.iteration % cfg.training.log_interval == 0:
                self.metrics.log(self.state.iteration, self.iteration_metrics(
                    self.model, self.state, loss, lr, grad_norm, elapsed, self.loss_terms))
            evaluation = self.validation.maybe_evaluate(self.model, self.state.iteration)  # every eval_interval
            verdict = self.validation.early_stopping_verdict(evaluation, self.state.iteration, self.keep_best)
            if self.periodic_save_due() or self.checkpoints.time_to_save():
                self.save()
            if verdict == "stop":
                reason = "early_stop"
            elif self.stop.agreed():
                reason = "signal"
            elif cfg.training.time_budget_s and time.time() - started > cfg.training.time_budget_s:
                reason = "time_budget"
            if reason != "done":
                if not self.periodic_save_due():
                    self.save()
                break
            self.watchdog.progress(self.state.iteration)
        else:
            if not self.periodic_save_due():  # the last iteration is always saved
                self.save()
        self.watchdog.stop()
        batches.close()  # the prefetch thread (it may be reading ahead)
        self.checkpoints.finalize()  # an async save publishes before the process exits
        self.metrics.close()
        self.write_stop_file(reason)
        log.info("stopped at iteration %d: %s", self.state.iteration, reason)
        return reason

    def keep_best(self, iteration: int) -> None:
        """Early stopping found a new best: its checkpoint is saved and kept out of keep_last rotation."""
        self.checkpoints.protected = {iteration}
        self.save()

    def eval_only(self) -> str:
        """The eval-only job: one evaluation of the loaded weights, logged; no step, no save."""
        log.info("eval-only: evaluating the weights at iteration %d (%s)", self.state.iteration,
                 self.plan.resume.decision)
        self.validation.evaluate_and_log(self.model, self.state.iteration, eval_only=True)
        self.metrics.close()
        log.info("stopped at iteration %d: eval_only", self.state.iteration)
        return "eval_only"

    def stop_non_finite(self, stop: NonFiniteStop) -> None:
        """Ends the job after too many non-finite iterations in a row (exit 3), without saving."""
        self.checkpoints.finalize()  # an asynchronous save of a good iteration still publishes
        if self.ctx.is_main:
            log.error(stop.message)
            if not write_error_record(f"error: {stop.message}", stop.EXIT_CODE):  # printed last, by torchrun's wrapper
                print(f"error: {stop.message}", file=sys.stderr, flush=True)
        self.write_stop_file("non_finite", message=stop.message)
        self.metrics.close()
        raise stop

    def write_stop_file(self, reason: str, message: str | None = None) -> None:
        """Tells the sbatch wrapper why training ended (it requeues after a signal save); the
        only writer of TRAIN_STOP_FILE."""
        path = os.environ.get("TRAIN_STOP_FILE")
        if path and self.ctx.is_main:
            if reason == "non_finite":
                record = {"reason": reason, "iteration": self.state.iteration, "requeue": False, "signal": None,
                          "message": message}
            else:
                record = {"reason": reason, "iteration": self.state.iteration,
                          "requeue": bool(self.cfg.checkpoint.requeue) and reason not in ("done", "early_stop"),
                          "signal": self.stop.signal_name}
            with open(path, "w") as f:
                json.dump(record, f)
