"""python -m train <command> [args]: every operator command in one place.

`python -m train` (or `--help`) lists the commands; `python -m train <command> [args]` runs
`python -m train.<module> [args]` in this process, unchanged (same arguments, exit status and
output). The `python -m train.<module>` forms keep working; this is only an index over them.
Import-light: printing the list imports nothing but this file.
"""

from __future__ import annotations

import runpy
import sys

# command -> (module run as __main__, one line). Two-word commands group the launch layer's tools.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("train.pretrain", "pretraining from scratch (Hydra overrides; usually via torchrun)"),
    "qad": ("train.qad", "quantization-aware distillation of a student from its teacher"),
    "finetune": ("train.finetune", "LoRA fine-tuning (mode=train|validate)"),
    "preprocess": ("train.preprocess", "tokenize a dataset into Megatron .bin/.idx"),
    "data": ("train.data", "data tools: inspect a .bin/.idx, build a datablend from a recipe"),
    "models": ("train.models", "the model registry: list, info NAME"),
    "random-hf": ("train.models.random_hf", "a seeded random registry model saved as an HF directory"),
    "export": ("train.export", "a run's checkpoint as an HF directory (bf16 or NVFP4)"),
    "eval": ("train.eval", "a student against its teacher: val loss, KL, top-1 agreement"),
    "downstream": ("train.downstream", "benchmark accuracy (lm-eval) of teacher, PTQ and QAD student side by side"),
    "submit": ("train.submit", "check a .conf, then sbatch one job or a chain"),
    "status": ("train.status", "the runs under a checkpoint root, one line each"),
    "plot": ("train.plot", "PNG training curves of a run"),
    "launch plan": ("train.launch.plan", "the job plan of a .conf (checks; --dry-run JSON)"),
    "launch conf": ("train.launch.conf", "the .conf variables and what they mean"),
    "launch node": ("train.launch.node", "this node's torchrun command (used by launchers/node.sh)"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m train <command> [args]   (<command> --help for its own options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "Each is also `python -m <module>`, e.g. `python -m train.models list`."]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """(command, module, its arguments) for argv, the longest command first; None if unknown."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, COMMANDS[name][0], argv[words:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    found = resolve(argv)
    if found is None:
        name = " ".join(argv[:2]) if argv[0] == "launch" else argv[0]
        print(f"python -m train: unknown command {name!r} (python -m train --help lists them)", file=sys.stderr)
        return 2
    _, module, args = found
    sys.argv = [module, *args]  # runpy replaces argv[0] with the module's file, as `python -m` does
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
