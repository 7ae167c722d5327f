"""python -m train.qad [key=value ...]: quantization-aware distillation (configs/qad.yaml).

The student (STUDENT_CKPT), fake-quantized with quant.recipe (train/quant/student.py, applied in
train.engine.run_job before parallelism), learns from the frozen full-precision teacher (TEACHER_CKPT).
Usually started by launchers/qad.sh or slurm/qad.sh through torchrun."""

import logging

import hydra
import torch
from omegaconf import DictConfig

from train.config import JobConfig
from train.distill.kd_config import KDConfigError, check_distill_config
from train.distill.loss import distill_loss, distill_terms
from train.engine import job_config, run_job
from train.losses import auxiliary_loss, unwrap


def build_teacher(cfg: JobConfig, layout, student_layers: int | None = None) -> torch.nn.Module:
    """The full-precision teacher: frozen, eval mode, in its checkpoint's dtype, laid out like the
    student on the student's mesh (layout: the job's train.parallel.ParallelLayout; same TP split,
    FSDP2-sharded when the student is; PP_SIZE > 1: this rank's stage of it, split like the student
    of student_layers blocks, train/parallel/pipeline.py split_model). Built on the meta device,
    laid out, then each rank reads its own part of each tensor (train/parallel/sharded_load.py).
    Built on the first loss call (PP: when the trainer builds the pipeline), by every rank at once."""
    from functools import partial

    from torch.distributed.tensor import DTensor

    from train.models import build_model, hf_args, stored_dtype
    from train.parallel import load_hf_sharded, parallelize_frozen
    from train.parallel.pipeline import split_model

    path = cfg.distill.teacher_checkpoint
    teacher = build_model(hf_args(path), device="meta", dtype=stored_dtype(path)).eval()
    teacher.requires_grad_(False)
    if layout.pp > 1:
        teacher = split_model(teacher, cfg.parallel, layout.pp_rank, student_layers)
    teacher = parallelize_frozen(teacher, cfg.parallel, layout.mesh,
                                 materialize=partial(load_hf_sharded, path=path, device=layout.device))
    sharded = any(isinstance(p, DTensor) for p in teacher.parameters())
    logging.getLogger("train").info("teacher %s: frozen, eval mode, %s%s", cfg.distill.teacher_checkpoint,
                                    "sharded like the student" if sharded else "replicated",
                                    f", pipeline stage {layout.pp_rank}" if layout.pp > 1 else "")
    return teacher


class Distillation:
    """The QAD loss_fn: distill_loss (train/distill/loss.py) + the MoE balance loss of the student.

    PP_SIZE > 1 (train/parallel/pipeline.py): the trainer calls pipeline_loss(student stage) once;
    each rank builds its stage of the teacher, split like the student's, which runs under no_grad
    inside the student stage's forward and hands its activations to the next stage beside the
    student's; the last stage computes the KD loss from both final hidden states (stage_loss)."""

    def __init__(self, cfg: JobConfig, vocab: int | None, layout):
        self.cfg, self.vocab, self.layout = cfg, vocab, layout
        self.teacher: torch.nn.Module | None = None  # built on first use, by every rank at once

    def __call__(self, student, inputs, targets, mask, tokens=None):
        self.teacher = self.teacher or build_teacher(self.cfg, self.layout)
        loss, terms = distill_loss(student, self.teacher, inputs, targets, mask, self.cfg.distill, self.vocab, tokens)
        # MoE students: load balancing, a mean over this micro-batch (zero when dense)
        return loss + auxiliary_loss(student), terms

    def pipeline_loss(self, student: torch.nn.Module):
        """The teacher's stage built and run in `student`'s (this rank's stage); returns stage_loss."""
        from train.parallel.pipeline import attach_teacher

        self.teacher = build_teacher(self.cfg, self.layout, unwrap(student).args.num_layers)
        attach_teacher(student, self.teacher)
        return self.stage_loss

    def stage_loss(self, inner, hidden, targets, mask, tokens, teacher_hidden):
        """The last stage's KD loss (the balance loss is the pipeline's): hidden (MBS, T, D) and
        teacher_hidden (MBS, T, D_teacher) after both final norms."""
        return distill_terms(inner, self.teacher, hidden, teacher_hidden, targets, mask, self.cfg.distill,
                             self.vocab, tokens)


@hydra.main(config_path="../configs", config_name="qad", version_base=None)
def main(composed: DictConfig) -> None:
    cfg = job_config(composed)
    try:  # KD_CFG_PATH merged into cfg.distill; the vocabulary rule, before any model is built
        vocab = check_distill_config(cfg)
    except KDConfigError as error:
        from train.launch.job import fail

        fail(str(error))

    run_job("qad", cfg, make_loss_fn=lambda layout: Distillation(cfg, vocab, layout))


if __name__ == "__main__":
    main()
