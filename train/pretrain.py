"""python -m train.pretrain [key=value ...]: pretraining from scratch (configs/pretrain.yaml).

Usually started by launchers/pretrain.sh or slurm/pretrain.sh through torchrun."""

import hydra
from omegaconf import DictConfig

from train.engine import job_config, run_job


@hydra.main(config_path="../configs", config_name="pretrain", version_base=None)
def main(composed: DictConfig) -> None:
    run_job("pretrain", job_config(composed))


if __name__ == "__main__":
    main()
