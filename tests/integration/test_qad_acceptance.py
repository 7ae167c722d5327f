"""python -m pytest tests/integration/test_qad_acceptance.py  (QAD on CPU wins back a clear share of the NVFP4 PTQ loss)

Real text (stdlib docstrings, a locally trained BPE, train.preprocess with a valid split, a
datablend), as in the quick start (test_quickstart.py). A tiny Qwen3 teacher is trained on it (in process, one
thread, then saved as an HF directory); `python -m train.eval --quant nvfp4` measures its NVFP4
PTQ student; the real `python -m train.qad` job distills the quantized student from the teacher
on the same corpus; `python -m train.eval --student RUN_DIR` measures it again.

Why it holds on every machine: the runs are deterministic on one machine, but fp32 GEMMs sum in
another order on another CPU, so the teacher differs slightly from one machine to the next. The
teacher is trained for 1000 steps (val loss ~3.96) so that NVFP4 costs a clear amount (seen: +0.023
nats, KL 0.018; after 300 steps only +0.003, smaller than the machine-to-machine difference).
The verdict rests on the KL to the teacher and top-1 agreement, which QAD optimizes directly and
which are steadier than val loss, with thresholds far from what was seen (KL 0.59x of PTQ's,
+2.8 points of agreement, 68% of the val-loss gap; asserted: under 0.8x, over +1 point, over 25%). A QAD that does not train (KD loss zeroed,
no optimizer step) leaves the student as PTQ made it: KL ratio 1.0, and the test fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.synthetic_data import build_tokenizer
from train.data.corpus import stdlib_docstrings

REPO = Path(__file__).resolve().parents[2]
SEQ, BATCH, EVAL_BATCHES = 128, 8, 6
# QAD: 40 steps of 32 sequences (4 micro-batches of 8), LR 3e-4 cosine to 3e-5. Seen with 8 sequences
# at a constant 1e-4: KL 0.69x of PTQ's, 42% of the val-loss gap; with 32 and this schedule 0.59x, 68%.
TEACHER_STEPS, QAD_STEPS, QAD_BATCH, QAD_LR, QAD_MIN_LR = 1000, 40, 32, 3e-4, 3e-5
# one thread per process: on a shared 2-core machine torch's thread pool spinning against other
# processes made a tiny-qwen3 step 10x slower (0.5 s with one thread, 2-10 s with two)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def build_corpus(tmp_path: Path) -> Path:
    texts = stdlib_docstrings(1500)
    tokenizer = build_tokenizer(str(tmp_path / "tokenizer"), texts, vocab_size=1024)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    subprocess.run([sys.executable, "-m", "train.preprocess", f"input={tmp_path / 'docs.jsonl'}", f"tokenizer={tokenizer}",
                    f"output_prefix={tmp_path / 'stdlib'}", "workers=1", "validation_fraction=0.1"],
                   cwd=REPO, check=True, capture_output=True)
    blend = tmp_path / "datablend_stdlib.json"
    blend.write_text(json.dumps({"train": [1.0, str(tmp_path / "stdlib_text_document")],
                                 "valid": [1.0, str(tmp_path / "stdlib_valid_text_document")]}))
    return blend


def train_teacher(blend: Path, directory: Path, steps: int = TEACHER_STEPS, model_name: str = "tiny-qwen3") -> None:
    """A registry model trained with AdamW on the train split, saved as an HF checkpoint directory."""
    from train.data import build_datasets
    from train.data.collate import to_batch
    from train.losses import masked_cross_entropy
    from train.models import build_model, init_weights, save_hf

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset = build_datasets(str(blend), SEQ, {"train": steps * BATCH}, seed=1)["train"]
    model = init_weights(build_model(model_name, device="cpu"), 1234)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        inputs, targets, mask = to_batch([dataset[i] for i in range(step * BATCH, (step + 1) * BATCH)], "cpu")
        loss = masked_cross_entropy(model(inputs), targets, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    save_hf(model, directory)


def evaluate(student, teacher: Path, blend: Path, out: Path, *extra) -> dict:
    result = subprocess.run([sys.executable, "-m", "train.eval", "--student", str(student), "--teacher", str(teacher),
                             "--data", str(blend), "--seq-length", str(SEQ), "--batch-size", str(BATCH), "--batches",
                             str(EVAL_BATCHES), "--json", str(out), *extra],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout.split("\n{")[0])
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_qad_wins_back_the_nvfp4_ptq_loss(tmp_path):
    blend = build_corpus(tmp_path)
    teacher = tmp_path / "teacher"
    train_teacher(blend, teacher)
    ptq = evaluate(teacher, teacher, blend, tmp_path / "ptq.json", "--quant", "nvfp4")
    teacher_loss, ptq_student = ptq["teacher"]["val_loss"], ptq["student"]
    # NVFP4 PTQ is clearly worse (seen: +0.023 nats, KL 0.018, 87.6% top-1 agreement)
    assert ptq_student["val_loss"] > teacher_loss + 0.008 and ptq_student["kl"] > 0.006, ptq

    root = tmp_path / "runs"
    job = subprocess.run(
        [sys.executable, "-m", "train.qad", f"checkpoint.root={root}", "model.name=tiny-qwen3",
         f"model.hf_checkpoint={teacher}", f"distill.teacher_checkpoint={teacher}", "distill.teacher_model=tiny-qwen3",
         "data=blend", "data.dataset_name=stdlib", f"data.datacache_dir={tmp_path}", f"data.seq_length={SEQ}",
         f"training.micro_batch_size={BATCH}", f"training.global_batch_size={QAD_BATCH}",
         f"training.train_iters={QAD_STEPS}", "quant.recipe=nvfp4", f"optim.lr={QAD_LR}", f"optim.min_lr={QAD_MIN_LR}",
         "optim.schedule=cosine", "checkpoint.save_interval=1000",
         "logging.tensorboard=false"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stderr[-3000:]
    run_dir = next(root.glob("*-Teacher-*"))
    qad = evaluate(run_dir, teacher, blend, tmp_path / "qad.json")
    qad_student = qad["student"]
    gap = ptq_student["val_loss"] - teacher_loss
    print(json.dumps({"teacher": teacher_loss, "ptq": ptq_student, "qad": qad_student,
                      "recovered": (ptq_student["val_loss"] - qad_student["val_loss"]) / gap}))
    assert qad["teacher"]["val_loss"] == pytest.approx(teacher_loss)  # the same tokens
    assert qad_student["kl"] < 0.8 * ptq_student["kl"], (ptq_student, qad_student)
    assert qad_student["agreement"] > ptq_student["agreement"] + 0.01, (ptq_student, qad_student)
    assert qad_student["val_loss"] < ptq_student["val_loss"] - 0.25 * gap, (teacher_loss, ptq_student, qad_student)
