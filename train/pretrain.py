"""python -m train.pretrain [key=value ...]: pretraining from scratch (configs/pretrain.yaml).

Usually started by launchers/pretrain.sh or slurm/pretrain.sh through torchrun."""

import hydra

import train.config  # noqa: F401  registers the schemas
from train.engine import run_job


@hydra.main(config_path="../configs", config_name="pretrain", version_base=None)
def main(cfg) -> None:
    run_job("pretrain", cfg)


if __name__ == "__main__":
    main()
