"""QAD vs QAT: how much of the NVFP4 PTQ val-loss gap each wins back, over seeds.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/qad_recovery/run.py \
        [--model tiny-qwen3] [--teacher-steps 1000] [--cache runs/bench-qad-recovery] [--seeds 3] \
        [--configs qad-lr3e-4-T1 qad-lr3e-4-T2 qad-lr1e-4-T1 qat-lr3e-4]

The setup of tests/integration/test_qad_acceptance.py, whose functions this imports: real text
(stdlib docstrings, local BPE, train.preprocess, a datablend), a teacher trained in process
(AdamW, 8 x 128 tokens per step, one thread), NVFP4 PTQ measured with `python -m train.eval
--quant nvfp4`. Then, per configuration and seed, the real `python -m train.qad` job (40
iterations of 32 sequences, micro-batch 8, LR cosine to LR/10, NVFP4 student) and `python -m
train.eval --student RUN_DIR`. QAT is the same job with distill.kd_loss_weight=0 and
distill.lm_loss_weight=1: the quantized student trained on the LM loss only. A seed sets the
job's training.seed and data.seed; the corpus and the teacher stay fixed.

The corpus, teacher, PTQ result and each job's eval JSON are cached under --cache: a rerun only
runs what is missing (delete a JSON to redo it). Prints a Markdown table (mean +- half the range
over the seeds) and writes it with the raw numbers to
<cache>/<teacher>-results/results-<N>seeds.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]  # run from anywhere without installing

from test_qad_acceptance import (ENV, QAD_BATCH, QAD_STEPS, SEQ, BATCH,  # noqa: E402
                                 build_corpus, evaluate, train_teacher)

# name: (LR, temperature, kd_loss_weight, lm_loss_weight)
CONFIGS = {"qad-lr3e-4-T1": (3e-4, 1.0, 1.0, 0.0), "qad-lr3e-4-T2": (3e-4, 2.0, 1.0, 0.0),
           "qad-lr1e-4-T1": (1e-4, 1.0, 1.0, 0.0), "qat-lr3e-4": (3e-4, 1.0, 0.0, 1.0)}
METRICS = ("val_loss", "val_ppl", "kl", "agreement", "recovered")
START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {message}", flush=True)


def prepare(cache: Path, model: str, steps: int) -> tuple[Path, Path, dict]:
    """The corpus blend, the teacher directory and the PTQ eval result, built once and cached."""
    corpus, teacher = cache / "corpus", cache / f"teacher-{model}-{steps}"
    blend = corpus / "datablend_stdlib.json"
    if not blend.exists():
        log("building the corpus (stdlib docstrings, BPE, train.preprocess)")
        corpus.mkdir(parents=True, exist_ok=True)
        build_corpus(corpus)
    if not (teacher / "config.json").exists():
        log(f"training the teacher: {model}, {steps} steps of {BATCH} x {SEQ} tokens")
        train_teacher(blend, teacher.with_suffix(".tmp"), steps, model_name=model)
        teacher.with_suffix(".tmp").rename(teacher)
    ptq_json = teacher / "ptq.json"
    if not ptq_json.exists():
        log("evaluating the teacher and its NVFP4 PTQ student")
        evaluate(teacher, teacher, blend, ptq_json.with_suffix(".tmp"), "--quant", "nvfp4")
        ptq_json.with_suffix(".tmp").rename(ptq_json)
    return blend, teacher, json.loads(ptq_json.read_text())


def run_job(cache: Path, model: str, blend: Path, teacher: Path, name: str, seed: int) -> dict:
    """One QAD/QAT job and its eval against the teacher; the eval JSON is the cache."""
    lr, temperature, kd_weight, lm_weight = CONFIGS[name]
    out = cache / f"{teacher.name}-results" / f"{name}-seed{seed}.json"
    if out.exists():
        log(f"{name} seed {seed}: cached")
        return json.loads(out.read_text())
    root = cache / "jobs" / f"{name}-seed{seed}"
    shutil.rmtree(root, ignore_errors=True)  # a stale, unfinished run
    log(f"{name} seed {seed}: train.qad, {QAD_STEPS} iterations of {QAD_BATCH} sequences")
    job = subprocess.run(
        [sys.executable, "-m", "train.qad", f"checkpoint.root={root}", f"model.name={model}",
         f"model.hf_checkpoint={teacher}", f"distill.teacher_checkpoint={teacher}", f"distill.teacher_model={model}",
         "data=blend", "data.dataset_name=stdlib", f"data.datacache_dir={blend.parent}", f"data.seq_length={SEQ}",
         f"training.micro_batch_size={BATCH}", f"training.global_batch_size={QAD_BATCH}",
         f"training.train_iters={QAD_STEPS}", f"training.seed={seed}", f"data.seed={seed}", "quant.recipe=nvfp4",
         f"optim.lr={lr}", f"optim.min_lr={lr / 10}", "optim.schedule=cosine",
         f"distill.temperature={temperature}", f"distill.kd_loss_weight={kd_weight}",
         f"distill.lm_loss_weight={lm_weight}", "checkpoint.save_interval=1000", "logging.tensorboard=false"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    if job.returncode != 0:
        raise RuntimeError(f"{name} seed {seed}: train.qad failed:\n{job.stderr[-3000:]}")
    log(f"{name} seed {seed}: train.eval")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = evaluate(next(root.glob("*-Teacher-*")), teacher, blend, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").rename(out)
    return result


def summarize(ptq: dict, runs: dict[str, list[dict]]) -> dict:
    """Per configuration: mean and spread (half the range) of each metric over the seeds."""
    teacher_loss, ptq_loss = ptq["teacher"]["val_loss"], ptq["student"]["val_loss"]
    table = {"teacher": {m: (ptq["teacher"].get(m, 0.0), 0.0) for m in METRICS},
             "nvfp4 PTQ": {m: (ptq["student"].get(m, 0.0), 0.0) for m in METRICS}}
    table["teacher"]["recovered"], table["nvfp4 PTQ"]["recovered"] = (1.0, 0.0), (0.0, 0.0)
    for name, results in runs.items():
        rows = [dict(r["student"], recovered=(ptq_loss - r["student"]["val_loss"]) / (ptq_loss - teacher_loss))
                for r in results]
        table[name] = {m: (statistics.mean(row[m] for row in rows),
                           (max(row[m] for row in rows) - min(row[m] for row in rows)) / 2) for m in METRICS}
    return table


def markdown(table: dict, seeds: int) -> str:
    lines = [f"| model ({seeds} seeds) | val loss | val ppl | KL(teacher‖student) | top-1 agreement | PTQ gap recovered |",
             "|---|---|---|---|---|---|"]
    for name, row in table.items():
        (loss, dl), (ppl, dp), (kl, dk), (agr, da), (rec, dr) = (row[m] for m in METRICS)
        lines.append(f"| {name} | {loss:.4f} ± {dl:.4f} | {ppl:.2f} ± {dp:.2f} | {kl:.4f} ± {dk:.4f} | "
                     f"{agr:.2%} ± {da:.2%} | {rec:.0%} ± {dr:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-qwen3", help="registry name of the teacher (and student)")
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-qad-recovery")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N of each QAD/QAT job")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    cache = args.cache.resolve()
    blend, teacher, ptq = prepare(cache, args.model, args.teacher_steps)
    runs = {name: [run_job(cache, args.model, blend, teacher, name, seed) for seed in range(1, args.seeds + 1)]
            for name in args.configs}
    text = markdown(summarize(ptq, runs), args.seeds)
    print(text)
    stem = cache / f"{teacher.name}-results" / f"results-{args.seeds}seeds"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"ptq": ptq, "runs": runs, "table": summarize(ptq, runs),
                                                     "args": {**vars(args), "cache": str(cache)},
                                                     "seconds": time.time() - START}, indent=1))
    log(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
