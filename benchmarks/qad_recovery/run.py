"""QAD vs QAT vs plain LM training: how much of the NVFP4 PTQ val-loss gap each wins back, over seeds.

    PYTHONPATH=. python benchmarks/qad_recovery/run.py [--seeds 3] [--parallel 2] [--downstream] \
        [--configs NAME ...] [--model tiny-qwen3] [--teacher-steps 6000] [--cache runs/bench-qad-recovery]

1. The corpus: every docstring of the standard library (subpackages included, never
   site-packages: ~2,800 documents, 1.7 MB), a byte-level BPE of the model's vocabulary,
   `python -m train.preprocess` with a 10% valid split, a datablend.
2. The teacher: --model (tiny-qwen3: 1M parameters, vocabulary 2048) trained in process with
   AdamW (LR --teacher-lr 3e-3 after 25 warmup steps, cosine to --teacher-final-lr 0) on
   --teacher-steps x 8 x 256 tokens (6000 steps: 12.3M tokens, ~25 passes over the train split; its
   val loss is flat over the last 3,000 steps while its train loss falls: it ends at what this data
   gives it),
   one thread; its val loss every 40 steps in <teacher>/curve.json; saved as an HF directory.
3. NVFP4 PTQ: `python -m train.eval --quant nvfp4` (4 calibration batches).
4. Per configuration (CONFIGS; the defaults: DEFAULT_CONFIGS) and seed, the real `python -m
   train.qad` job (NVFP4 student, 32 x 256 tokens an iteration, micro-batch 8, LR cosine to
   LR/10) and `python -m train.eval --student RUN_DIR` on 20 x 8 x 256 valid tokens. "qad" is KL
   only at temperature T; "qad+lm" adds the LM loss (distill.lm_loss_weight=1); "qat" is the
   LM loss alone (distill.kd_loss_weight=0: the quantized student trained on the data; the
   teacher still runs, unused); "fp" is the teacher itself trained on, unquantized
   (quant.recipe=none, LM loss): what the same tokens of plain LM training do to val loss, the
   reference QAT's figure must be read against. A seed sets training.seed and data.seed.
5. --downstream: `python -m train.downstream` (lm-eval) of the best QAD and QAT jobs (seed 1)
   on a held-out multiple-choice task built from the valid split (continuation_task).

Jobs run --parallel at a time with one thread each. Everything is cached under --cache (corpus,
teacher, PTQ result, each job's eval JSON): a rerun only runs what is missing. Prints a Markdown
table (mean +- half the range over the seeds) and writes it with the raw numbers to
<cache>/<teacher>-results/results-<N>seeds.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

SEQ, TEACHER_BATCH, WARMUP = 256, 8, 25
QAD_BATCH, MICRO_BATCH = 32, 8  # 8192 tokens an iteration
EVAL_BATCH, EVAL_BATCHES = 8, 20  # 160 x 256 = 41k valid tokens
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
LOSSES = {"qad": (1.0, 0.0, "nvfp4"), "qad+lm": (1.0, 1.0, "nvfp4"),  # kind: (kd weight, lm weight, recipe)
          "qat": (0.0, 1.0, "nvfp4"), "fp": (0.0, 1.0, "none")}


def config_name(kind: str, lr: float, temperature: float, iterations: int) -> str:
    """e.g. qad-lr3e-4-T1-96it; QAT and fp have no temperature."""
    lr_text = f"{lr:.0e}".replace("e-0", "e-")
    return f"{kind}-lr{lr_text}" + (f"-T{temperature:g}" if kind.startswith("qad") else "") + f"-{iterations}it"


# name: (LR, temperature, kd_loss_weight, lm_loss_weight, quant recipe, iterations)
CONFIGS = {config_name(kind, lr, t, iters): (lr, t, *LOSSES[kind], iters) for kind, lr, t, iters in (
    ("qad", 3e-4, 1, 96), ("qat", 3e-4, 1, 96), ("fp", 3e-4, 1, 96), ("qad", 1e-4, 1, 96),
    ("qad", 3e-4, 2, 96), ("qat", 1e-4, 1, 96), ("qat", 1e-3, 1, 96), ("fp", 1e-3, 1, 96),
    ("qad", 1e-3, 1, 96), ("qad", 3e-4, 1, 24), ("qad", 1e-3, 1, 24), ("qad", 3e-3, 1, 24),
    ("qad+lm", 3e-4, 1, 96))}
DEFAULT_CONFIGS = ["qad-lr3e-4-T1-96it", "qad+lm-lr3e-4-T1-96it", "qat-lr3e-4-96it", "fp-lr3e-4-96it"]
METRICS = ("val_loss", "val_ppl", "kl", "agreement", "recovered")
START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {message}", flush=True)


def build_corpus(directory: Path, vocab_size: int) -> Path:
    """Every stdlib docstring, a BPE of `vocab_size` tokens, train.preprocess (10% valid), a datablend."""
    from train.data.corpus import stdlib_docstrings
    from train.data.tokenizer import build_tokenizer

    texts = stdlib_docstrings(10**6, subpackages=True)
    tokenizer = build_tokenizer(str(directory / "tokenizer"), texts, vocab_size)
    (directory / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    subprocess.run([sys.executable, "-m", "train.preprocess", f"input={directory / 'docs.jsonl'}",
                    f"tokenizer={tokenizer}", f"output_prefix={directory / 'stdlib'}", "workers=1",
                    "validation_fraction=0.1"], cwd=REPO, check=True, capture_output=True)
    blend = directory / "datablend_stdlib.json"
    blend.write_text(json.dumps({"train": [1.0, str(directory / "stdlib_text_document")],
                                 "valid": [1.0, str(directory / "stdlib_valid_text_document")]}))
    return blend


def train_teacher(blend: Path, directory: Path, model_name: str, steps: int, lr: float, final_lr: float) -> None:
    """model_name trained with AdamW on the train split (warmup, cosine from lr to final_lr), its
    val loss every 40 steps in directory/curve.json, saved as an HF checkpoint directory."""
    from train.data import build_datasets
    from train.data.collate import to_batch
    from train.losses import masked_cross_entropy
    from train.config import OptimConfig
    from train.models import build_model, init_weights, save_hf
    from train.optim import learning_rate

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a second thread spinning against other processes costs more than it gives
    data = build_datasets(str(blend), SEQ, {"train": steps * TEACHER_BATCH, "valid": EVAL_BATCH * EVAL_BATCHES}, seed=1)
    valid = [to_batch([data["valid"][i] for i in range(b * EVAL_BATCH, (b + 1) * EVAL_BATCH)], "cpu")
             for b in range(EVAL_BATCHES)]
    model = init_weights(build_model(model_name, device="cpu"), 1234)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = OptimConfig(lr=lr, min_lr=final_lr, schedule="cosine", warmup_iters=WARMUP)
    curve, begin = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, schedule)
        batch = [data["train"][i] for i in range(step * TEACHER_BATCH, (step + 1) * TEACHER_BATCH)]
        inputs, targets, mask = to_batch(batch, "cpu")
        loss = masked_cross_entropy(model(inputs), targets, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 40 == 0 or step + 1 == steps:
            with torch.no_grad():
                val = statistics.mean(masked_cross_entropy(model(x), y, m).item() for x, y, m in valid)
            curve.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val})
            log(f"teacher step {step + 1}/{steps}: train {loss.item():.4f} val {val:.4f} "
                f"({(time.time() - begin) / (step + 1):.2f} s/step)")
    save_hf(model, directory)
    (directory / "curve.json").write_text(json.dumps({"curve": curve, "seconds": time.time() - begin}, indent=1))


def evaluate(student, teacher: Path, blend: Path, out: Path, *extra) -> dict:
    """train.eval of student vs teacher on the valid split, its JSON written to `out` (atomically)."""
    partial = out.with_suffix(".tmp")
    result = subprocess.run([sys.executable, "-m", "train.eval", "--student", str(student), "--teacher", str(teacher),
                             "--data", str(blend), "--seq-length", str(SEQ), "--batch-size", str(EVAL_BATCH),
                             "--batches", str(EVAL_BATCHES), "--json", str(partial), *extra],
                            cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"train.eval of {student} failed:\n{result.stderr[-3000:]}")
    partial.rename(out)
    return json.loads(out.read_text())


def prepare(cache: Path, model: str, steps: int, lr: float, final_lr: float) -> tuple[Path, Path, dict]:
    """The corpus blend, the teacher directory and the PTQ eval result, built once and cached."""
    from train.models import get_model_args

    vocab = get_model_args(model).vocab_size
    corpus, teacher = cache / f"corpus-{vocab}", cache / f"teacher-{model}-{steps}-lr{lr:g}-to{final_lr:g}"
    blend = corpus / "datablend_stdlib.json"
    if not blend.exists():
        log("building the corpus (stdlib docstrings with subpackages, BPE, train.preprocess)")
        corpus.mkdir(parents=True, exist_ok=True)
        build_corpus(corpus, vocab)
    if not (teacher / "config.json").exists():
        log(f"training the teacher: {model}, {steps} steps of {TEACHER_BATCH} x {SEQ} tokens, LR {lr:g} to {final_lr:g}")
        shutil.rmtree(teacher.with_suffix(".tmp"), ignore_errors=True)
        train_teacher(blend, teacher.with_suffix(".tmp"), model, steps, lr, final_lr)
        teacher.with_suffix(".tmp").rename(teacher)
    ptq_json = teacher / "ptq.json"
    if not ptq_json.exists():
        log("evaluating the teacher and its NVFP4 PTQ student")
        evaluate(teacher, teacher, blend, ptq_json, "--quant", "nvfp4")
    return blend, teacher, json.loads(ptq_json.read_text())


def run_job(cache: Path, model: str, blend: Path, teacher: Path, name: str, seed: int) -> dict:
    """One QAD/QAT/fp job and its eval against the teacher; the eval JSON is the cache."""
    lr, temperature, kd_weight, lm_weight, recipe, iterations = CONFIGS[name]
    out = cache / f"{teacher.name}-results" / f"{name}-seed{seed}.json"
    if out.exists():
        return json.loads(out.read_text())
    root = cache / f"{teacher.name}-jobs" / f"{name}-seed{seed}"
    shutil.rmtree(root, ignore_errors=True)  # a stale, unfinished run
    log(f"{name} seed {seed}: train.qad, {iterations} iterations of {QAD_BATCH} x {SEQ} tokens")
    begin = time.time()
    job = subprocess.run(
        [sys.executable, "-m", "train.qad", f"checkpoint.root={root}", f"model.name={model}",
         f"model.hf_checkpoint={teacher}", f"distill.teacher_checkpoint={teacher}", f"distill.teacher_model={model}",
         "data=blend", "data.dataset_name=stdlib", f"data.datacache_dir={blend.parent}", f"data.seq_length={SEQ}",
         f"training.micro_batch_size={MICRO_BATCH}", f"training.global_batch_size={QAD_BATCH}",
         f"training.train_iters={iterations}", f"training.seed={seed}", f"data.seed={seed}", f"quant.recipe={recipe}",
         f"optim.lr={lr}", f"optim.min_lr={lr / 10}", "optim.schedule=cosine",
         f"distill.temperature={temperature}", f"distill.kd_loss_weight={kd_weight}",
         f"distill.lm_loss_weight={lm_weight}", "checkpoint.save_interval=1000", "logging.tensorboard=false"],
        cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=3600)
    if job.returncode != 0:
        raise RuntimeError(f"{name} seed {seed}: train.qad failed:\n{job.stderr[-3000:]}")
    seconds = time.time() - begin
    out.parent.mkdir(parents=True, exist_ok=True)
    result = evaluate(next(root.glob("*-Teacher-*")), teacher, blend, out)
    result["train_seconds"] = seconds
    out.write_text(json.dumps(result, indent=1))
    log(f"{name} seed {seed}: val {result['student']['val_loss']:.4f} KL {result['student']['kl']:.4f} "
        f"({seconds:.0f} s of training)")
    return result


def continuation_task(corpus: Path, directory: Path, items: int = 200, context: int = 48, length: int = 16) -> Path:
    """A held-out lm-eval multiple-choice task: the first `context` tokens of a valid-split
    document, then its own next `length` tokens against those of 3 other valid documents
    (decoded to text). Returns the task YAML; the JSONL lies beside it."""
    import random

    from transformers import AutoTokenizer

    from train.data.indexed import IndexedDataset

    tokenizer = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    valid = IndexedDataset(str(corpus / "stdlib_valid_text_document"))
    documents = [valid[i].tolist() for i in range(len(valid)) if len(valid[i]) >= context + length]
    rng = random.Random(0)
    rows = []
    for index, tokens in enumerate(documents[:items]):
        others = rng.sample([d for j, d in enumerate(documents) if j != index], 3)
        choices = [tokenizer.decode(d[context:context + length]) for d in [tokens, *others]]
        rng.shuffle(order := list(range(4)))
        rows.append({"context": tokenizer.decode(tokens[:context]), "choices": [choices[i] for i in order],
                     "answer": order.index(0)})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stdlib_continuation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = directory / "stdlib_continuation.yaml"
    task.write_text("task: stdlib_continuation\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    "    test: stdlib_continuation.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
                    'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                    'target_delimiter: ""\nmetric_list:\n  - metric: acc\n    aggregation: mean\n'
                    "    higher_is_better: true\n  - metric: acc_norm\n    aggregation: mean\n"
                    "    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return task


def downstream(blend: Path, teacher: Path, names: list[str]) -> str:
    """`python -m train.downstream` (lm-eval) of each named seed-1 job on the held-out
    continuation task: the teacher, the PTQ student and the job's student, side by side."""
    corpus, results_dir = blend.parent, teacher.parent / f"{teacher.name}-results"
    task = continuation_task(corpus, results_dir / "downstream")
    lines = ["| model | acc ± stderr | acc_norm ± stderr |", "|---|---|---|"]
    for index, name in enumerate(names):
        out = results_dir / "downstream" / f"{name}-seed1.json"
        if not out.exists():
            log(f"{name} seed 1: train.downstream (lm-eval)")
            subprocess.run([sys.executable, "-m", "train.downstream", str(next((teacher.parent / f"{teacher.name}-jobs" / f"{name}-seed1").glob(
                "*-Teacher-*"))), "--tasks", str(task), "--tokenizer", str(corpus / "tokenizer"),
                "--json", str(out)], cwd=REPO, env=ONE_THREAD, check=True, capture_output=True, timeout=3600)
        results = json.loads(out.read_text())["results"]
        for label, tasks in results.items():
            if label in ("teacher", "PTQ") and index > 0:
                continue  # the same in every QAD/QAT run
            metrics = tasks["stdlib_continuation"]
            lines.append(f"| {name if label == 'QAD' else label} | {metrics['acc,none']:.1%} ± "
                         f"{metrics['acc_stderr,none']:.1%} | {metrics['acc_norm,none']:.1%} ± "
                         f"{metrics['acc_norm_stderr,none']:.1%} |")
    return "\n".join(lines)


def summarize(ptq: dict, runs: dict[str, list[dict]]) -> dict:
    """Per configuration: mean and spread (half the range) of each metric over the seeds."""
    teacher_loss, ptq_loss = ptq["teacher"]["val_loss"], ptq["student"]["val_loss"]
    table = {"teacher": {m: (ptq["teacher"].get(m, 0.0), 0.0) for m in METRICS},
             "NVFP4 PTQ": {m: (ptq["student"].get(m, 0.0), 0.0) for m in METRICS}}
    table["teacher"]["recovered"], table["NVFP4 PTQ"]["recovered"] = (1.0, 0.0), (0.0, 0.0)
    for name, results in runs.items():
        rows = [dict(r["student"], recovered=(ptq_loss - r["student"]["val_loss"]) / (ptq_loss - teacher_loss))
                for r in results]
        table[f"{name} ({len(rows)})"] = {m: (statistics.mean(row[m] for row in rows),
                                             (max(row[m] for row in rows) - min(row[m] for row in rows)) / 2)
                                         for m in METRICS}
    return table


def markdown(table: dict) -> str:
    lines = ["| model (seeds) | val loss | val ppl | KL(teacher‖student) | top-1 agreement | PTQ gap recovered |",
             "|---|---|---|---|---|---|"]
    for name, row in table.items():
        (loss, dl), (ppl, dp), (kl, dk), (agr, da), (rec, dr) = (row[m] for m in METRICS)
        lines.append(f"| {name} | {loss:.4f} ± {dl:.4f} | {ppl:.2f} ± {dp:.2f} | {kl:.4f} ± {dk:.4f} | "
                     f"{agr:.2%} ± {da:.2%} | {rec:.0%} ± {dr:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-qwen3", help="registry name of the teacher (and student)")
    parser.add_argument("--teacher-steps", type=int, default=6000, help="1500: a teacher short of its data limit")
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--teacher-final-lr", type=float, default=0.0, help="where the teacher's cosine ends")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-qad-recovery")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N of each job")
    parser.add_argument("--run-from-seed", type=int, default=1,
                        help="run only seeds from this one on (the others' cached results still count)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time (one thread each)")
    parser.add_argument("--downstream", action="store_true",
                        help="then lm-eval (train.downstream) of the best QAD and QAT jobs on a held-out task")
    args = parser.parse_args()
    cache = args.cache.resolve()
    blend, teacher, ptq = prepare(cache, args.model, args.teacher_steps, args.teacher_lr, args.teacher_final_lr)
    log(f"teacher val {ptq['teacher']['val_loss']:.4f}, NVFP4 PTQ {ptq['student']['val_loss']:.4f} "
        f"(KL {ptq['student']['kl']:.4f}, agreement {ptq['student']['agreement']:.2%})")
    jobs = [(name, seed) for seed in range(1, args.seeds + 1) for name in args.configs]
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda job: run_job(cache, args.model, blend, teacher, *job),
                      [job for job in jobs if job[1] >= args.run_from_seed]))
    results = [run_job(cache, args.model, blend, teacher, *job) for job in jobs]  # all cached now
    runs: dict[str, list[dict]] = {}
    for (name, _), result in zip(jobs, results):
        runs.setdefault(name, []).append(result)
    table = summarize(ptq, runs)
    text = markdown(table)
    print(text)
    stem = cache / f"{teacher.name}-results" / f"results-{args.seeds}seeds"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"ptq": ptq, "runs": runs, "table": table,
                                                     "args": {**vars(args), "cache": str(cache)},
                                                     "seconds": time.time() - START}, indent=1))
    log(f"wrote {stem}.md and .json")
    if args.downstream:
        best = {kind: max((n for n in args.configs if n.startswith(kind)), default=None,
                          key=lambda n: table[f"{n} ({len(runs[n])})"]["recovered"][0]) for kind in ("qad", "qat")}
        text = downstream(blend, teacher, [name for name in best.values() if name])
        print(text)
        (stem.parent / "downstream.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
