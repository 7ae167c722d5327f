"""python -m pytest tests/unit/test_eval_cli.py  (python -m train.eval: metrics on a known case, CLI, errors)"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from train.data.indexed_writer import IndexedDatasetWriter, commit_all
from train.compare import evaluate_models

REPO = Path(__file__).resolve().parents[2]


class FixedLogits(nn.Module):
    """hidden_states returns the given (B, T, V) logits; output_logits is the identity."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def hidden_states(self, inputs):
        return self.logits

    def output_logits(self, hidden):
        return hidden


def test_known_case():
    teacher_probs = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05]]])
    student_probs = torch.tensor([[[0.25, 0.5, 0.25], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]]])
    targets = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token (which would disagree) is not counted
    results = evaluate_models(FixedLogits(student_probs.log()), FixedLogits(teacher_probs.log()),
                              [(torch.zeros(1, 3, dtype=torch.long), targets, mask)], chunk_size=2)
    student, teacher = results["student"], results["teacher"]
    assert student["val_loss"] == pytest.approx((math.log(4) - math.log(0.7)) / 2, rel=1e-6)
    assert student["val_ppl"] == pytest.approx(math.exp(student["val_loss"]))
    assert teacher["val_loss"] == pytest.approx((math.log(2) - math.log(0.7)) / 2, rel=1e-6)
    # KL: token 1: 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) = 0.25 ln 2; token 2: 0
    assert student["kl"] == pytest.approx(0.125 * math.log(2), rel=1e-5)
    assert student["agreement"] == 0.5 and student["tokens"] == 2


def write_blend(tmp_path: Path, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    blend = {}
    for split in ("train", "valid"):
        prefix = str(tmp_path / f"{split}_text_document")
        writer = IndexedDatasetWriter(prefix, np.uint16)
        lengths = rng.integers(20, 60, size=40)
        writer.add_documents(rng.integers(0, vocab, size=int(lengths.sum())), lengths)
        writer.finish()
        commit_all([writer])
        blend[split] = [1.0, prefix]
    path = tmp_path / "datablend_tiny.json"
    path.write_text(json.dumps(blend))
    return path


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "train.eval", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # HF save, blend, python -m train.eval: ~25 s on 2 busy cores
def test_cli_student_equal_to_teacher(tmp_path):
    from train.models import build_model, init_weights, save_hf

    model = init_weights(build_model("tiny-qwen3", device="cpu"), 3)
    save_hf(model, tmp_path / "model")
    blend = write_blend(tmp_path, model.args.vocab_size)
    out = tmp_path / "eval.json"
    result = run_eval("--student", tmp_path / "model", "--teacher", tmp_path / "model", "--data", blend,
                      "--seq-length", 32, "--batch-size", 2, "--batches", 2, "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| student |" in result.stdout
    results = json.loads(out.read_text())
    assert results["student"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert results["student"]["agreement"] == 1.0 and results["student"]["tokens"] == 2 * 2 * 32
    assert results["student"]["val_loss"] == pytest.approx(results["teacher"]["val_loss"])
    assert results["student"]["val_loss"] > 7.0  # random weights: about ln(2048)


def test_cli_errors(tmp_path):
    missing = run_eval("--student", tmp_path / "nope", "--teacher", tmp_path, "--data", tmp_path / "b.json")
    assert missing.returncode == 2 and f"error: --student {tmp_path / 'nope'}: neither an HF checkpoint directory" in missing.stderr
    bad = run_eval("--student", tmp_path, "--teacher", tmp_path, "--data", "x.json", "--batches", 0)
    assert bad.returncode == 2 and "--batches must be >= 1" in bad.stderr
