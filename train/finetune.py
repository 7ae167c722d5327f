"""python -m train.finetune [mode=train|validate] [key=value ...]: LoRA fine-tuning (configs/finetune.yaml).

mode=train (default): peft LoRA adapters (train/lora.py) on the base model from BASE_CKPT,
optionally on a fake-quantized base (lora.quantized_base); only the adapters train; early
stopping with training.early_stop_patience. mode=validate: val loss and generated-label
accuracy of the run's latest checkpoint on a labeled set (train/finetune_validate.py).
Usually started by launchers/finetune.sh or slurm/finetune.sh through torchrun."""

import hydra
from omegaconf import DictConfig

from train.engine import job_config, run_job
from train.launch.job import fail

MODES = ("train", "validate")


@hydra.main(config_path="../configs", config_name="finetune", version_base=None)
def main(composed: DictConfig) -> None:
    from train.lora import check_lora_config, check_quantized_base
    from train.finetune_validate import LabeledSetError, check_validate_inputs, run_validate

    cfg = job_config(composed)
    mode = str(cfg.mode)
    if mode not in MODES:
        fail(f"mode (MODE) = {mode!r} is not one of {', '.join(MODES)}")
    try:  # bad input fails here, before any model is built
        check_lora_config(cfg.lora)
        check_quantized_base(cfg.lora)
        inputs = check_validate_inputs(cfg) if mode == "validate" else None
    except (ValueError, LabeledSetError) as error:
        fail(str(error))
    if mode == "validate":
        run_validate(cfg, *inputs)
    else:
        run_job("finetune", cfg)


if __name__ == "__main__":
    main()
