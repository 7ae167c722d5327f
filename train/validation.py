"""In-loop validation: val_loss and val_ppl on the valid split, eval-only jobs, early stopping.

    python -m pytest tests/integration/test_finetune.py tests/unit/test_lora.py

The trainer's validation component, the Validation class: Trainer.__init__ creates it and it
owns the valid split and the early-stopping tracker; fine-tuning's validate mode reuses its
evaluate(). Named for the job it does, validating the weights being trained, as opposed to
train/compare.py (`python -m train.eval`: a student against its teacher) and
train/finetune_validate.py (fine-tuning's mode=validate: a LoRA checkpoint's accuracy on a
labeled set).

Every training.eval_interval iterations (0: never) each data-parallel rank runs
training.eval_iters micro-batches of the valid split (the same samples every time, so
evaluations compare); the loss is the language-model cross entropy over the loss-masked
tokens (also for QAD, whose training loss is the KD loss), summed over the micro-batches
and all ranks, then divided by the token count: a token-weighted mean over the
data-parallel ranks. val_ppl = exp(val_loss). Under PP_SIZE > 1 the micro-batches go through
the stages one after another (train/parallel/pipeline.py forward_logits) and the last stage
counts them. Both go to the metrics sinks with the
iteration they were taken at.

Eval-only (training.eval_only=true / EVAL_ONLY=1): the trainer loads the latest
checkpoint (the resume rule; otherwise the job started from its initial weights),
evaluates once, logs {"val_loss", "val_ppl", "eval_only": true} and returns without an
optimizer step or a checkpoint.

Early stopping (training.early_stop_patience > 0, with eval_interval): after each evaluation
the val_loss is compared with the best so far; an improvement is a loss below best -
early_stop_min_delta. An improvement saves a checkpoint at that iteration and protects it
from keep_last rotation (CheckpointManager.protected), so the best weights stay on disk; after
`patience` evaluations in a row without one the job saves and stops with reason "early_stop"
(no requeue). The tracker's state goes into trainer.pt: a resumed job continues the count,
and a job resumed after an early stop stops again at once. val_loss is all-reduced, so every
rank reaches the same verdict.
"""

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from train.config import JobConfig, TrainingConfig
from train.data.collate import to_batch
from train.losses import masked_cross_entropy_sum
from train.parallel.pipeline import forward_logits

log = logging.getLogger("train")


def eval_batches(dataset, eval_iters: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """The sample indices of each micro-batch of one rank: disjoint across ranks, fixed."""
    for step in range(eval_iters):
        first = (step * dp_size + dp_rank) * micro_batch_size
        yield list(range(first, first + micro_batch_size))


class Validation:
    """The trainer's validation component (created in Trainer.__init__, held as trainer.validation):
    the valid split (built on first use and kept), evaluate, the metrics record of each
    evaluation, and the early-stopping tracker (None when off). Fine-tuning's validate mode
    builds one without a tracker or sinks and calls evaluate()."""

    def __init__(self, cfg: JobConfig, ctx, layout, metrics=None, early_stopping: "EarlyStopping | None" = None):
        self.cfg, self.ctx, self.layout, self.metrics = cfg, ctx, layout, metrics
        self.early_stopping = early_stopping
        self.interval = cfg.training.eval_interval
        self._dataset, self._dataset_built = None, False

    def dataset(self, model):
        """The valid split, built on first use; None without one."""
        if not self._dataset_built:
            from train.data.job_datasets import build_eval_dataset

            vocab_size = getattr(model, "module", model).args.vocab_size
            self._dataset = build_eval_dataset(self.cfg, self.ctx, vocab_size)
            self._dataset_built = True
            if self._dataset is None:
                log.warning("evaluation skipped: the datablend has no valid split")
        return self._dataset

    @torch.no_grad()
    def evaluate(self, model) -> dict | None:
        """{"val_loss", "val_ppl"} averaged over every data-parallel rank; None without a valid split."""
        dataset = self.dataset(model)
        if dataset is None:
            return None
        layout, device = self.layout, self.layout.device
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, token count
        was_training = model.training
        model.eval()
        try:
            for indices in eval_batches(dataset, self.cfg.training.eval_iters, self.cfg.training.micro_batch_size,
                                        layout.dp_rank, layout.dp_size):
                inputs, targets, mask = to_batch([dataset[i] for i in indices], device)
                logits = model(inputs) if layout.pp == 1 else forward_logits(model, layout, inputs)
                if logits is not None:  # PP: the last stage's; the others add nothing
                    totals[0] += float(masked_cross_entropy_sum(logits, targets, mask))
                    totals[1] += float(mask.sum())
        finally:
            model.train(was_training)
        if dist.is_initialized():
            totals = totals.to(device) if device.startswith("cuda") else totals
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            totals = totals.cpu()
        # tensor-parallel peers evaluated the same tokens: the ratio is unchanged by the duplication
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        ppl = math.exp(loss) if loss < 700 else float("inf")
        return {"val_loss": loss, "val_ppl": ppl}

    def evaluate_and_log(self, model, iteration: int, **extra) -> dict | None:
        metrics = self.evaluate(model)
        if metrics is not None:
            self.metrics.log(iteration, {**metrics, **extra})
        return metrics

    def maybe_evaluate(self, model, iteration: int) -> dict | None:
        """Evaluates and logs when the iteration is a multiple of training.eval_interval."""
        if not self.interval or iteration % self.interval:
            return None
        return self.evaluate_and_log(model, iteration)

    def early_stopping_verdict(self, metrics: dict | None, iteration: int, keep_best) -> str | None:
        """After an evaluation: keep_best(iteration) (the trainer protects and saves that
        checkpoint) on a new best; "stop" when the patience ran out. None when there is no
        tracker or no evaluation happened."""
        tracker = self.early_stopping
        if tracker is None or metrics is None:
            return None
        verdict = tracker.update(metrics["val_loss"], iteration)
        if verdict == "improved":
            keep_best(iteration)
        log.info("early stopping: val_loss %.4f, best %.4f at iteration %s, %d/%d evaluations without "
                 "improvement", metrics["val_loss"], tracker.best_loss, tracker.best_iteration,
                 tracker.evaluations_without_improvement, tracker.patience)
        return verdict


@dataclass
class EarlyStopping:
    patience: int  # evaluations without improvement that stop the job
    min_delta: float  # how much lower than the best a val_loss must be to count as better
    best_loss: float = math.inf
    best_iteration: int | None = None
    evaluations_without_improvement: int = 0
    stopped: bool = False

    def update(self, val_loss: float, iteration: int) -> str:
        """improved | wait | stop."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_iteration = val_loss, iteration
            self.evaluations_without_improvement = 0
            return "improved"
        self.evaluations_without_improvement += 1
        if self.evaluations_without_improvement >= self.patience:
            self.stopped = True
            return "stop"
        return "wait"

    def state_dict(self) -> dict:
        return asdict(self)


def build_early_stopping(training_cfg: TrainingConfig) -> EarlyStopping | None:
    patience = training_cfg.early_stop_patience
    if patience <= 0:
        return None
    if not training_cfg.eval_interval:
        raise ValueError(f"training.early_stop_patience (EARLY_STOP_PATIENCE) = {patience} needs "
                         "training.eval_interval (EVAL_INTERVAL) > 0: it counts evaluations")
    return EarlyStopping(patience, training_cfg.early_stop_min_delta)
