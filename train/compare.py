"""python -m train.eval --student RUN_DIR|HF_DIR --teacher HF_DIR --data BLEND [--quant RECIPE]: student vs teacher.

    python -m pytest tests/unit/test_eval_cli.py tests/integration/test_eval.py

Named compare for what it does, a student measured against its teacher on the same tokens,
apart from train/validation.py (the training loop's val_loss and early stopping) and
train/finetune_validate.py (fine-tuning's mode=validate). The documented command stays
`python -m train.eval` (train/eval.py runs this module's main); `python -m train.compare` is
the same.

Prints, for the teacher and the student, on the first --batches x --batch-size sequences of
the blend's --split (valid by default; the same ones for both models):

    val_loss    cross entropy of the next token over the loss mask (token-weighted mean)
    val_ppl     exp(val_loss)
    kl          KL(teacher || student) per masked token at temperature 1 (teacher row: 0)
    agreement   share of masked tokens where the student's top-1 token is the teacher's

as a Markdown table, then one JSON line ({"teacher": {...}, "student": {...}, "settings": {...}});
--json FILE writes the same JSON. --quant nvfp4 (nvfp4_mlp_only, fp8) evaluates the PTQ
student: the student's weights fake-quantized by train.quant.quantize_model after
--calibration-batches batches of the train split (modelopt's max calibration), no training.
--student RUN_DIR (a directory with checkpoints/<model>/latest_checkpointed_iteration.txt, e.g.
the QAD run's) evaluates that run's latest checkpoint: the model from its config.yaml
(model.hf_checkpoint or the registry name), its quantizers re-created from quantizer_state.pt
(train/quant/student.py: the QAD student as it trained, calibrated amax included), then the
weights from the DCP checkpoint.

Bad input (missing directory, blend, split, unknown recipe, vocabularies the KD rule refuses)
is one `error:` line and exit 2 before any model is loaded where possible. Logits are made in
chunks of --chunk-size positions from the final hidden states, so eval at vocabulary 151936
never holds a whole sequence's logits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

METRICS = ("val_loss", "val_ppl", "kl", "agreement")


@torch.no_grad()
def batch_sums(student, teacher, inputs, targets, mask, chunk_size: int = 512, vocab: int | None = None) -> torch.Tensor:
    """Sums over the masked tokens of one batch: [student CE, teacher CE, KL, agreements, tokens] (float64).

    inputs, targets, mask (B, T); logits are made chunk_size positions at a time."""
    hidden = student.hidden_states(inputs).flatten(0, 1)  # (N, D)
    teacher_hidden = teacher.hidden_states(inputs).flatten(0, 1)
    targets, mask = targets.flatten(), mask.flatten().double()
    sums = torch.zeros(5, dtype=torch.float64)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        logits = student.output_logits(hidden[rows]).float()  # (C, V)
        teacher_logits = teacher.output_logits(teacher_hidden[rows]).float()
        if vocab is not None:
            logits, teacher_logits = logits[:, :vocab], teacher_logits[:, :vocab]
        log_student, log_teacher = F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1)
        m = mask[rows]
        sums[0] += (F.nll_loss(log_student, targets[rows], reduction="none").double() * m).sum()
        sums[1] += (F.nll_loss(log_teacher, targets[rows], reduction="none").double() * m).sum()
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)  # (C,)
        sums[2] += (kl.double() * m).sum()
        sums[3] += ((logits.argmax(-1) == teacher_logits.argmax(-1)).double() * m).sum()
        sums[4] += m.sum()
    return sums


def metrics_from_sums(sums: torch.Tensor) -> dict[str, dict[str, float]]:
    tokens = float(sums[4])
    if tokens == 0:
        raise ValueError("no masked tokens to evaluate")
    student_loss, teacher_loss = float(sums[0]) / tokens, float(sums[1]) / tokens

    def ppl(loss: float) -> float:
        return math.exp(loss) if loss < 700 else float("inf")

    return {"teacher": {"val_loss": teacher_loss, "val_ppl": ppl(teacher_loss), "kl": 0.0, "agreement": 1.0},
            "student": {"val_loss": student_loss, "val_ppl": ppl(student_loss), "kl": float(sums[2]) / tokens,
                        "agreement": float(sums[3]) / tokens, "tokens": int(tokens)}}


def evaluate_models(student, teacher, batches, chunk_size: int = 512, vocab: int | None = None) -> dict:
    """{"teacher": {...}, "student": {...}} over `batches` of (inputs, targets, mask)."""
    was_training = student.training
    student.eval()
    try:
        sums = sum(batch_sums(student, teacher, *batch, chunk_size=chunk_size, vocab=vocab) for batch in batches)
    finally:
        student.train(was_training)
    return metrics_from_sums(sums)


def blend_batches(blend: str, split: str, seq_length: int, batch_size: int, count: int, seed: int, device):
    """`count` batches (inputs, targets, mask) of the split's first samples (packed, shuffled from seed)."""
    from train.data import build_datasets
    from train.data.collate import to_batch

    with tempfile.TemporaryDirectory() as cache:
        datasets = build_datasets(blend, seq_length, {split: count * batch_size}, seed=seed, cache_dir=cache)
        if split not in datasets:
            raise ValueError(f"datablend {blend} has no {split!r} split")
        dataset = datasets[split]
        return [to_batch([dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)], str(device))
                for b in range(count)]


def format_table(results: dict) -> str:
    lines = ["| model | val_loss | val_ppl | KL(teacher‖student) | top-1 agreement |", "|---|---|---|---|---|"]
    for name in ("teacher", "student"):
        r = results[name]
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['kl']:.4f} | {r['agreement']:.2%} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="HF directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--teacher", required=True, help="HF directory of the teacher")
    parser.add_argument("--data", required=True, help="datablend JSON ({'train': [...], 'valid': [...]})")
    parser.add_argument("--split", default="valid", help="split to evaluate on (default valid)")
    parser.add_argument("--quant", default=None, help="PTQ recipe for the student: nvfp4 | nvfp4_mlp_only | fp8")
    parser.add_argument("--calibration-batches", type=int, default=4, help="train-split batches for PTQ calibration")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8, help="evaluation batches")
    parser.add_argument("--chunk-size", type=int, default=512, help="positions per chunk of logits")
    parser.add_argument("--seed", type=int, default=1234, help="the data's shuffle seed (the jobs' data.seed)")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    for name in ("seq_length", "batch_size", "batches", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def check_inputs(args, student_is_run: bool = False) -> int | None:
    """Cheap checks before any model is loaded; returns the KD vocabulary rule's result."""
    from train.distill.kd_config import hf_vocab_size, resolve_vocab, tokenizer_size

    for flag, directory in (("--student", args.student), ("--teacher", args.teacher)):
        if flag == "--student" and student_is_run:
            continue
        if not (Path(directory) / "config.json").is_file():
            raise ValueError(f"{flag} {directory}: neither an HF checkpoint directory (config.json) nor a run "
                             "directory (checkpoints/<model>/latest_checkpointed_iteration.txt)"
                             if flag == "--student" else f"{flag} {directory}: not an HF checkpoint directory "
                             "(no config.json)")
    if not Path(args.data).is_file():
        raise ValueError(f"--data {args.data}: datablend file does not exist")
    if args.quant is not None:
        from train.quant.recipes import RECIPES

        if args.quant not in RECIPES:
            raise ValueError(f"--quant {args.quant}: unknown recipe (known: {', '.join(RECIPES)})")
    if student_is_run:
        return None  # the QAD job applied the vocabulary rule to this student at its start
    student_vocab, teacher_vocab = hf_vocab_size(args.student), hf_vocab_size(args.teacher)
    if student_vocab == teacher_vocab:
        return None
    return resolve_vocab(student_vocab, teacher_vocab, tokenizer_size(args.teacher) or tokenizer_size(args.student))


def latest_checkpoint(run_dir: str) -> Path | None:
    """RUN_DIR/checkpoints/<model>/iter_XXXXXXX of the tracker file; None if run_dir is not a run."""
    from train.launch.rundir import TRACKER_FILE, checkpoint_dir_name, read_tracker

    trackers = sorted(Path(run_dir).glob(f"checkpoints/*/{TRACKER_FILE}"))
    if not trackers:
        return None
    if len(trackers) > 1:
        raise ValueError(f"--student {run_dir}: several models' checkpoints ({', '.join(str(t.parent) for t in trackers)})")
    return trackers[0].parent / checkpoint_dir_name(read_tracker(trackers[0].parent))


def load_run_student(checkpoint: Path, device) -> torch.nn.Module:
    """The model of a run's checkpoint: architecture from its config, quantizers, then the DCP weights."""
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from train.config import to_job_config
    from train.engine import master_dtype
    from train.models import build_model, load_hf
    from train.quant.student import load_quantizer_state

    cfg = to_job_config(OmegaConf.load(checkpoint / "config.yaml"))
    dtype = master_dtype(cfg.model)  # the dtype the run trained (and checkpointed) in
    if cfg.model.hf_checkpoint:
        model = load_hf(cfg.model.hf_checkpoint, dtype)
    else:
        model = build_model(str(cfg.model.name), device="cpu", dtype=dtype)
    saved = load_quantizer_state(checkpoint)
    if saved:
        from train.quant.recipes import restore_quantizer_state

        model = restore_quantizer_state(model, saved["modelopt_state"])
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(model, state["model"])
    return model.to(device)


def run(args) -> dict:
    from train.models import load_hf

    checkpoint = latest_checkpoint(args.student)
    vocab = check_inputs(args, student_is_run=checkpoint is not None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = blend_batches(args.data, args.split, args.seq_length, args.batch_size, args.batches, args.seed, device)
    teacher = load_hf(args.teacher).to(device).eval().requires_grad_(False)
    student = load_run_student(checkpoint, device) if checkpoint else load_hf(args.student).to(device)
    student.eval().requires_grad_(False)
    if vocab is None and student.args.vocab_size != teacher.args.vocab_size:  # a run's student
        from train.distill.kd_config import resolve_vocab, tokenizer_size

        vocab = resolve_vocab(student.args.vocab_size, teacher.args.vocab_size, tokenizer_size(args.teacher))
    if args.quant is not None:
        from train.quant.recipes import quantize_model

        calibration = blend_batches(args.data, "train", args.seq_length, args.batch_size, args.calibration_batches,
                                    args.seed, device) if args.calibration_batches else []
        student = quantize_model(student, args.quant, [inputs for inputs, _, _ in calibration])
    results = evaluate_models(student, teacher, batches, args.chunk_size, vocab)
    results["settings"] = {"student": args.student, "teacher": args.teacher, "data": args.data, "split": args.split,
                           "quant": args.quant, "seq_length": args.seq_length, "batch_size": args.batch_size,
                           "batches": args.batches, "calibration_batches": args.calibration_batches if args.quant else 0}
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except (ValueError, OSError) as error:  # DataError, CheckpointError, KDConfigError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
