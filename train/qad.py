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
from train.distill.loss import distill_loss
from train.engine import job_config, run_job
from train.losses import auxiliary_loss


def build_teacher(cfg: JobConfig, layout) -> torch.nn.Module:
    """The full-precision teacher: frozen, eval mode, in its checkpoint's dtype, laid out like the
    student on the student's mesh (layout: the job's train.parallel.ParallelLayout; same TP split,
    FSDP2-sharded when the student is). Built on the meta device, laid out, then each rank reads
    its own part of each tensor (train/parallel/sharded_load.py). Built on the first loss call, by
    every rank at once."""
    from functools import partial

    from torch.distributed.tensor import DTensor

    from train.models import build_model, hf_args, stored_dtype
    from train.parallel import load_hf_sharded, parallelize_frozen

    path = cfg.distill.teacher_checkpoint
    teacher = build_model(hf_args(path), device="meta", dtype=stored_dtype(path)).eval()
    teacher.requires_grad_(False)
    teacher = parallelize_frozen(teacher, cfg.parallel, layout.mesh,
                                 materialize=partial(load_hf_sharded, path=path, device=layout.device))
    sharded = any(isinstance(p, DTensor) for p in teacher.parameters())
    logging.getLogger("train").info("teacher %s: frozen, eval mode, %s", cfg.distill.teacher_checkpoint,
                                    "sharded like the student" if sharded else "replicated")
    return teacher


@hydra.main(config_path="../configs", config_name="qad", version_base=None)
def main(composed: DictConfig) -> None:
    cfg = job_config(composed)
    try:  # KD_CFG_PATH merged into cfg.distill; the vocabulary rule, before any model is built
        vocab = check_distill_config(cfg)
    except KDConfigError as error:
        from train.launch.job import fail

        fail(str(error))

    def make_loss_fn(layout):
        teacher = None

        def loss_fn(student, inputs, targets, mask, tokens=None):
            nonlocal teacher
            teacher = teacher or build_teacher(cfg, layout)
            loss, terms = distill_loss(student, teacher, inputs, targets, mask, cfg.distill, vocab, tokens)
            # MoE students: load balancing, a mean over this micro-batch (zero when dense)
            return loss + auxiliary_loss(student), terms

        return loss_fn

    run_job("qad", cfg, make_loss_fn=make_loss_fn)


if __name__ == "__main__":
    main()
