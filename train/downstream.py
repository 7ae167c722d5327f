"""python -m train.downstream RUN_DIR|HF_DIR --tasks T[,T...] [--include-path DIR] [--limit N] [--json FILE]

    python -m pytest tests/integration/test_downstream.py

Benchmark accuracy with lm-eval-harness (its Python API and its "hf" model class, on CPU by
default, offline), for the models a user compares side by side:

    QAD run     teacher  distill.teacher_checkpoint, as it is
                PTQ      the student's starting weights (model.hf_checkpoint) with the run's
                         quantizers: the same recipe, the amax calibrated at the run's start
                         (QAD trains the weights; the amax stay as calibrated)
                QAD      the latest checkpoint's weights (fp32) with the same quantizers: what
                         an NVFP4 deployment computes; its tokenizer from the checkpoint's
                         export to a temporary HF directory
    other run   the latest checkpoint, exported to a temporary directory (column: the job name)
    HF_DIR      an export or any HF directory, as it is (column: model)

An unquantized run (quant.recipe none) gives PTQ = the starting weights unquantized. The
quantized columns fake-quantize transformers' modules (train.export.quantize_hf_model, the
llama and qwen3 families). Every model reads its tokenizer from its own directory (the
export's is copied from the run's model.hf_checkpoint by train.export; a teacher directory
without one borrows the student's): a directory without tokenizer files is one error line.

--tasks: lm-eval task names (its own, or YAMLs under --include-path) or paths of task YAML
files; a file's relative `dataset_kwargs.data_files` are resolved against its folder, so a task
shipped beside its items runs from any directory (docs/examples/downstream/tiny_mc.yaml).
Prints one Markdown table (task, metric, one column per model), then writes --json:
{"results": {model: {task: {metric: value}}}, "models": {model: source}, "settings": {...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("train")
EXIT_USAGE = 2
SKIPPED_KEYS = ("alias", "name", "sample_len")  # lm-eval's per-task entries that are not metrics


@dataclass
class Candidate:
    label: str  # the table's column: teacher, PTQ, QAD, a job name, model
    source: str  # where its weights come from (for the JSON)
    directory: Path  # an HF directory: the weights (unless `model` is given) and the tokenizer
    model: object | None = None  # a transformers model already built (fake-quantized), else None


def resolve_task(task: str) -> str | dict:
    """A task name as is; a YAML file as a config dict with its data_files made absolute."""
    if not task.endswith((".yaml", ".yml")):
        return task
    import yaml

    path = Path(task)
    if not path.is_file():
        raise ValueError(f"--tasks {task}: no such task file")
    config = yaml.safe_load(path.read_text())
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {split: str((path.parent / name).resolve())
                                                  for split, name in files.items()}
    elif isinstance(files, str):
        config["dataset_kwargs"]["data_files"] = str((path.parent / files).resolve())
    return config


def check_tokenizer(candidate: Candidate) -> None:
    from train.serving import has_tokenizer

    if not has_tokenizer(candidate.directory):
        raise ValueError(f"{candidate.label} model: {candidate.directory} has no tokenizer files (lm-eval reads the "
                         "tokenizer beside the weights; export with --tokenizer DIR)")


def quantized_hf(directory: Path, source, amax: dict, dtype):
    """transformers' model of `directory` with the run's quantizers (recipe and amax)."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.export import quantize_hf_model

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return quantize_hf_model(model, source.quantizers["recipe"], amax, "cpu").to(dtype)


def run_candidates(run_dir: Path, scratch: Path, dtype, tokenizer: str | None) -> list[Candidate]:
    """The models of a run directory: teacher, PTQ and QAD for a QAD run, else the run's model."""
    from train.export import base_dir, export, quantized_student_hf, read_source, tokenizer_dir

    source = read_source(run_dir, None, "hf")
    if tokenizer_dir(source.cfg, tokenizer) is None:  # before the export: lm-eval cannot run without one
        raise ValueError(f"{run_dir}: no tokenizer known (the run has no model.hf_checkpoint with tokenizer "
                         "files): pass --tokenizer DIR")
    exported = export(run_dir, "hf", scratch / "student", tokenizer=tokenizer)
    if source.cfg.job != "qad":
        return [Candidate(str(source.cfg.job), str(source.checkpoint), exported)]
    teacher_dir, start_dir = Path(source.cfg.distill.teacher_checkpoint), base_dir(source.cfg)
    if start_dir is None:
        raise ValueError(f"{run_dir}: model.hf_checkpoint {source.cfg.model.hf_checkpoint} is gone: no PTQ student")
    from train.serving import has_tokenizer

    teacher = Candidate("teacher", str(teacher_dir), teacher_dir)
    if not has_tokenizer(teacher_dir):  # same vocabulary (the QAD job checked): the student's tokenizer
        teacher = Candidate("teacher", str(teacher_dir), exported, model=load_plain(teacher_dir, dtype))
    ptq = Candidate("PTQ", str(start_dir), exported)
    qad = Candidate("QAD", str(source.checkpoint), exported)
    if source.quantizers:  # the QAD student from its fp32 weights (the bf16 export would round before FP4)
        qad_model, amax = quantized_student_hf(source, "cpu", scratch)
        qad.model, ptq.model = qad_model.to(dtype), quantized_hf(start_dir, source, amax, dtype)
    else:
        ptq.model = load_plain(start_dir, dtype)
    return [teacher, ptq, qad]


def load_plain(directory: Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def task_manager(tasks: list, include_path: str | None):
    """lm-eval's task index: --include-path, plus its own ~10k task YAMLs only when a task is named
    (indexing those takes minutes on a busy CPU; task files need none of them)."""
    from lm_eval.tasks import TaskManager

    named = any(isinstance(task, str) for task in tasks)
    return TaskManager(include_path=include_path, include_defaults=named)


def evaluate(candidate: Candidate, tasks: list, manager, args) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of one model (lm-eval's "acc,none" keys, stderr included)."""
    import lm_eval

    if candidate.model is None:
        model, model_args = "hf", f"pretrained={candidate.directory},dtype={args.dtype}"
    else:
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=candidate.model.to(args.device), tokenizer=str(candidate.directory), batch_size=args.batch_size,
                     device=args.device)
        model_args = None
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                      device=args.device, batch_size=args.batch_size, limit=args.limit)
    return {task: {metric: value for metric, value in values.items()
                   if metric not in SKIPPED_KEYS and isinstance(value, (int, float))}
            for task, values in results["results"].items()}


def format_table(results: dict[str, dict]) -> str:
    """| task | metric | <one column per model> | over the metrics of the first model."""
    labels = list(results)
    lines = [f"| task | metric | {' | '.join(labels)} |", "|---|---|" + "---|" * len(labels)]
    for task, metrics in results[labels[0]].items():
        for metric in metrics:
            if "_stderr" in metric:
                continue
            values = [results[label].get(task, {}).get(metric) for label in labels]
            cells = [f"{value:.4f}" if isinstance(value, (int, float)) else "-" for value in values]
            lines.append(f"| {task} | {metric.removesuffix(',none')} | {' | '.join(cells)} |")
    return "\n".join(lines)


def run(args) -> dict:
    import torch

    source = Path(args.source)
    tasks = [resolve_task(task) for task in args.tasks.split(",") if task]
    if not tasks:
        raise ValueError("--tasks is empty")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="downstream-") as scratch:
        if (source / "config.json").is_file():
            candidates = [Candidate("model", str(source), source)]
        elif source.is_dir():
            candidates = run_candidates(source, Path(scratch), dtype, args.tokenizer)
        else:
            raise ValueError(f"{source}: neither a run directory nor an HF directory (config.json)")
        for candidate in candidates:
            check_tokenizer(candidate)
        manager = task_manager(tasks, args.include_path)
        results = {candidate.label: evaluate(candidate, tasks, manager, args) for candidate in candidates}
    return {"results": results, "models": {candidate.label: candidate.source for candidate in candidates},
            "settings": {"source": str(source), "tasks": args.tasks, "limit": args.limit, "dtype": args.dtype,
                         "device": args.device}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.downstream", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a run directory (its latest checkpoint) or an HF directory")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names or task YAML files")
    parser.add_argument("--include-path", help="a folder of task YAMLs that --tasks names")
    parser.add_argument("--limit", type=int, help="at most this many documents per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): cuda when torch sees a GPU, else cpu")
    parser.add_argument("--tokenizer", help="tokenizer directory for a run without model.hf_checkpoint")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.device == "auto":  # CUDA_VISIBLE_DEVICES alone says nothing: a CPU build of torch sees none
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # local files only: never wait on the network
        os.environ.setdefault(variable, "1")
    try:
        results = run(args)
    except (ValueError, OSError) as error:  # ExportError, CheckpointError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table(results["results"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
