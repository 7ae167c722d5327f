"""python -m train.finetune [key=value ...]: LoRA fine-tuning (configs/finetune.yaml).

Adapters (peft) on the base model from BASE_CKPT; only they train.
Usually started by launchers/finetune.sh or slurm/finetune.sh through torchrun."""

import hydra

import train.config  # noqa: F401  registers the schemas
from train.engine import run_job


@hydra.main(config_path="../configs", config_name="finetune", version_base=None)
def main(cfg) -> None:
    run_job("finetune", cfg)


if __name__ == "__main__":
    main()
