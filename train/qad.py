"""python -m train.qad [key=value ...]: quantization-aware distillation (configs/qad.yaml).

The student (STUDENT_CKPT) learns from the frozen full-precision teacher (TEACHER_CKPT).
Usually started by launchers/qad.sh or slurm/qad.sh through torchrun."""

import hydra
import torch

import train.config  # noqa: F401  registers the schemas
from train.distill.losses import kd_loss
from train.engine import run_job
from train.trainer import auxiliary_loss, masked_cross_entropy


def build_teacher(cfg) -> torch.nn.Module:
    from train.models import load_hf

    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    teacher = load_hf(cfg.distill.teacher_checkpoint).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


@hydra.main(config_path="../configs", config_name="qad", version_base=None)
def main(cfg) -> None:
    teacher = None

    def distill_loss(student, inputs, targets, mask):
        nonlocal teacher
        teacher = teacher or build_teacher(cfg)
        logits = student(inputs)
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss = kd_loss(logits, teacher_logits, mask, cfg.distill.temperature)
        if cfg.distill.lm_loss_weight:
            loss = loss + cfg.distill.lm_loss_weight * masked_cross_entropy(logits, targets, mask)
        return loss + auxiliary_loss(student)  # MoE students: load balancing (zero when dense)

    run_job("qad", cfg, distill_loss)


if __name__ == "__main__":
    main()
