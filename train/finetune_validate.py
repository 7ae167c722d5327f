"""Fine-tuning's validate mode: val loss and generated-label accuracy of the latest LoRA checkpoint.

    python -m train.finetune mode=validate validate.val_set=labeled.jsonl [...]
    bash launchers/finetune.sh --config C -- mode=validate      (or MODE=validate VAL_SET=... in C)
    python -m pytest tests/unit/test_lora.py tests/integration/test_finetune.py

Named finetune_validate for the job it is, `train.finetune mode=validate`, a job of its own
(not a part of the training loop, which is train/validation.py) that scores answers generated
on a labeled set; train/compare.py (`python -m train.eval`) compares a student with its teacher.

The job builds the base (BASE_CKPT), restores the checkpoint's quantizers if it was trained
on a quantized base (lora.quantized_base must match), adds the adapters, loads the latest checkpoint of the run directory (the same run directory as the
training job: same conf), then
1. val loss: train/validation.py's val_loss / val_ppl on the valid split (all ranks together);
2. labeled set: each rank takes records rank, rank + W, rank + 2W, ...; every prompt is
   rendered with the tokenizer's chat template (one user turn, generation prompt), answered by
   greedy decoding (train/generate.py) up to validate.max_new_tokens or an end-of-sequence /
   end-of-turn token, and the label is extracted from the answer (extract_label). Rank 0
   gathers the rows and writes, in the run directory's logs/:
     <model>_validate_<datetime>.predictions.jsonl  one row per record, in set order:
         {"index", "prompt", "category", "label", "generated" (the decoded answer),
          "predicted" (the extracted label), "correct" (bool)}
     <model>_validate_<datetime>.summary.json
         {"iteration", "checkpoint", "val_set", "val_loss", "val_ppl", "total", "correct",
          "accuracy", "per_category": {category: {"total", "correct", "accuracy"}}, "world_size"}
   (each written to a temporary name and renamed), and logs val_loss / val_accuracy to the
   metrics sinks.

Labeled set format (JSONL, one object per line; blank lines are skipped):
    {"prompt": "Is this review positive or negative? ...", "label": "positive", "category": "reviews"}
`prompt` and `label` are required strings; `category` is optional (default: the label, which
gives per-class accuracy for a classification set).

Label extraction: reasoning blocks (<think>...</think>) are dropped; among the labels that
occur in the set, the one found earliest in the answer as a whole word (case-insensitive;
the longest on a tie) is the prediction; with none found, the answer's first non-empty line
without surrounding punctuation. correct: prediction equals the label, case-insensitive.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

from train.config import JobConfig, ValidateConfig
from train.labeled_set import LabeledSetError, check_validate_inputs, load_labeled_set  # noqa: F401  (callers')

log = logging.getLogger("train")
THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")  # chat templates' turn ends: stop there too


def extract_label(answer: str, labels: list[str]) -> str:
    """The label an answer gives (module docstring: label extraction)."""
    text = THINK_BLOCK.sub("", answer).strip()
    found = []
    for label in set(labels):
        match = re.search(r"(?<!\w)" + re.escape(label) + r"(?!\w)", text, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), -len(label), label))
    if found:
        return min(found)[2]
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    return first_line.strip().strip(".,;:!?\"'`*()[] ")


def summarize(rows: list[dict]) -> dict:
    """Accuracy overall and per category of scored rows ({"category", "correct"})."""
    per_category: dict[str, dict] = defaultdict(lambda: {"total": 0, "correct": 0})
    for row in rows:
        per_category[row["category"]]["total"] += 1
        per_category[row["category"]]["correct"] += int(row["correct"])
    for counts in per_category.values():
        counts["accuracy"] = counts["correct"] / counts["total"]
    correct = sum(int(row["correct"]) for row in rows)
    return {"total": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else float("nan"),
            "per_category": dict(sorted(per_category.items()))}


def stop_token_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return ids


def prompt_token_ids(tokenizer, prompt: str, enable_thinking: bool) -> list[int]:
    """One user turn through the chat template, ending with the assistant's generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_records(model, tokenizer, records: list[dict], labels: list[str], validate_cfg: ValidateConfig, device: str) -> list[dict]:
    """Generated answers and their scores for `records` (one rank's share)."""
    from train.generate import greedy_generate

    prompts = [prompt_token_ids(tokenizer, r["prompt"], bool(validate_cfg.enable_thinking)) for r in records]
    answers = greedy_generate(model, prompts, int(validate_cfg.max_new_tokens), stop_token_ids(tokenizer),
                              batch_size=int(validate_cfg.batch_size), device=device)
    rows = []
    for record, answer in zip(records, answers):
        generated = tokenizer.decode(answer, skip_special_tokens=True)
        predicted = extract_label(generated, labels)
        rows.append({**record, "generated": generated, "predicted": predicted,
                     "correct": predicted.casefold() == record["label"].casefold()})
    return rows


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def load_latest_lora_checkpoint(model, ctx, cfg: JobConfig) -> int:
    """Fills the model (base + adapters) from the run's latest checkpoint; its iteration."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from train.checkpoint import CheckpointManager, CheckpointMismatch
    from train.launch.job import fail

    plan = ctx.plan
    tensors = {"model": get_model_state_dict(model)}
    try:
        CheckpointManager(plan.paths.checkpoints, keep_last=0).load(plan.resume.iteration, tensors,
                                                                    model_name=str(cfg.model.name))
    except CheckpointMismatch as error:
        fail(str(error))
    set_model_state_dict(model, tensors["model"])
    return plan.resume.iteration


def run_validate(cfg: JobConfig, records: list[dict], tokenizer) -> dict | None:
    """The validate job; returns the summary on rank 0 (None elsewhere)."""
    import torch
    import torch.distributed as dist
    from train.engine import add_adapters, build_job_model, quantize_job_model
    from train.launch.job import fail, start_job
    from train.metrics import MetricsLogger
    from train.parallel import ParallelLayout
    from train.validation import Validation

    ctx = start_job("finetune", cfg)
    if ctx.plan.resume.decision != "resume":
        fail(f"mode=validate: no checkpoint in {ctx.plan.paths.checkpoints} (run mode=train with the same conf "
             "first, or point checkpoint.root at the training run's root)")
    # no mesh: the model is not parallelized here (each rank holds all of it)
    layout = ParallelLayout.build(ctx, cfg.parallel, with_mesh=False)
    torch.manual_seed(cfg.training.seed + ctx.rank)
    # a quantized base gets the checkpoint's quantizers back (no calibration, no dataset)
    model, _ = quantize_job_model("finetune", build_job_model(cfg, ctx), cfg, ctx, None, layout)
    model = add_adapters(model, cfg)
    iteration = load_latest_lora_checkpoint(model, ctx, cfg)
    model.eval()
    # val loss: in-loop validation's evaluate(), without sinks or early stopping
    loss = Validation(cfg, ctx, layout).evaluate(model) or {"val_loss": None, "val_ppl": None}
    labels = sorted({r["label"] for r in records})
    indexed = [{"index": i, **r} for i, r in enumerate(records)][ctx.rank::ctx.world_size]
    rows = answer_records(model, tokenizer, indexed, labels, cfg.validate, ctx.device)
    if dist.is_initialized():
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, rows)
        rows = [row for share in gathered for row in share]
    summary = None
    if ctx.is_main:
        rows.sort(key=lambda row: row["index"])
        summary = {"iteration": iteration, "checkpoint": ctx.plan.resume.path, "val_set": str(cfg.validate.val_set),
                   **loss, **summarize(rows), "world_size": ctx.world_size}
        logs = ctx.plan.paths.train_log.parent
        stem = f"{cfg.model.name}_validate_{ctx.plan.paths.datetime}"
        write_atomically(logs / f"{stem}.predictions.jsonl",
                         "".join(json.dumps({key: row[key] for key in ("index", "prompt", "category", "label",
                                                                       "generated", "predicted", "correct")}) + "\n"
                                 for row in rows))
        write_atomically(logs / f"{stem}.summary.json", json.dumps(summary, indent=1) + "\n")
        log.info("validate: iteration %d, val_loss %s, accuracy %.4f (%d/%d)", iteration, loss["val_loss"],
                 summary["accuracy"], summary["correct"], summary["total"])
        for category, counts in summary["per_category"].items():
            log.info("  %-24s %.4f (%d/%d)", category, counts["accuracy"], counts["correct"], counts["total"])
        log.info("wrote %s.predictions.jsonl and %s.summary.json in %s", stem, stem, logs)
    metrics = MetricsLogger(ctx.plan.paths.metrics_log if cfg.logging.jsonl else None,
                            ctx.plan.paths.tensorboard if cfg.logging.tensorboard else None, enabled=ctx.is_main)
    if summary is not None:
        metrics.log(iteration, {key: value for key, value in (("val_loss", loss["val_loss"]),
                                                              ("val_ppl", loss["val_ppl"]),
                                                              ("val_accuracy", summary["accuracy"]))
                                if value is not None})
    metrics.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary
