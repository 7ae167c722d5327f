"""python -m train.models.random_hf NAME DIR [--seed S]: a seeded random registry model
saved as an HF checkpoint directory (tiny QAD/LoRA confs, tests, demos; no downloads)."""

import argparse
import sys

from train.models.errors import UnknownModelError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.models.random_hf", description=__doc__)
    parser.add_argument("name")
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    from train.models import build_model, init_weights, save_hf

    try:
        model = build_model(args.name, device="cpu")
    except UnknownModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_hf(init_weights(model, args.seed), args.directory)
    print(f"wrote {args.name} (seed {args.seed}) to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
