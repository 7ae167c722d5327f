"""Tokenize a dataset into Megatron .bin/.idx: python -m train.preprocess input=... output_prefix=... tokenizer=...

Hydra-style key=value options (configs/preprocess.yaml, schema PreprocessConfig), e.g.
    python -m train.preprocess input=HuggingFaceFW/fineweb subset=sample-10BT \\
        tokenizer=/models/Qwen3-8B output_prefix=data/fineweb_qwen3 max_docs=1000000 workers=8
"""

import sys

import hydra
from omegaconf import DictConfig

import train.config  # noqa: F401  registers preprocess_schema
from train.data import malloc
from train.data.errors import DataError
from train.data.preprocess import preprocess, print_summary


@hydra.main(config_path="../configs", config_name="preprocess", version_base=None)
def main(config: DictConfig) -> None:
    try:
        malloc.reexec_with(config.malloc)  # may restart this command with a faster malloc preloaded
        print_summary(preprocess(config))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
