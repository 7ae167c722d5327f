"""python -m pytest tests/integration/test_downstream.py  (lm-eval on a tiny QAD run: teacher, PTQ, QAD; CPU, offline)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TASK = REPO / "docs" / "examples" / "downstream" / "tiny_mc.yaml"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_module(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **OFFLINE}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# qad_run (two QAD iterations of a random tiny-qwen3 nvfp4 student, student and teacher with the
# task's tokenizer): conftest.py, shared with test_export.py


@pytest.mark.slow
def test_table_has_the_accuracy_of_teacher_ptq_and_qad(qad_run, tmp_path):
    result = run_module("-m", "train", "downstream", str(qad_run), "--tasks", str(TASK.relative_to(REPO)),
                        "--json", str(tmp_path / "downstream.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| task | metric | teacher | PTQ | QAD |"
    acc_row = next(line for line in table if line.startswith("| tiny_mc | acc |")).strip("|").split("|")
    assert all(0.0 <= float(cell) <= 1.0 for cell in acc_row[2:])
    saved = json.loads((tmp_path / "downstream.json").read_text())
    assert list(saved["results"]) == ["teacher", "PTQ", "QAD"]
    for label in saved["results"]:
        assert 0.0 <= saved["results"][label]["tiny_mc"]["acc,none"] <= 1.0
    assert saved["models"]["teacher"] == str(qad_run.parent / "teacher")


@pytest.mark.slow
def test_quantized_columns_compute_the_student_s_fake_quantized_logits(qad_run, tmp_path):
    """PTQ and QAD are transformers' models with the run's quantizers: QAD's logits are those of our
    student as it trained (fake-quantized), PTQ's those of the starting weights quantized alike."""
    from train.downstream import run_candidates
    from train.export import load_student, read_source

    teacher, ptq, qad = run_candidates(qad_run, tmp_path, torch.float32, None)
    source = read_source(qad_run, None, "hf")
    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_student(source, "cpu", quantized=True)(tokens)
        qad_logits, ptq_logits = qad.model(tokens).logits, ptq.model(tokens).logits
    torch.testing.assert_close(qad_logits, ours, rtol=1e-3, atol=1e-3)
    assert (ptq_logits - qad_logits).abs().max() > 1e-3  # QAD moved the weights
    assert teacher.model is None and teacher.directory == qad_run.parent / "teacher"


@pytest.mark.slow
def test_an_export_without_tokenizer_cannot_be_evaluated(qad_run, tmp_path, monkeypatch):
    """lm-eval itself runs on the export and fails on the same export less its tokenizer files;
    train.downstream says so in one line."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from train.downstream import resolve_task
    from train.export import export
    from train.serving import tokenizer_files

    exported = export(qad_run, "hf", tmp_path / "export")
    bare = tmp_path / "bare"
    shutil.copytree(exported, bare)
    for path in tokenizer_files(bare):
        path.unlink()
    result = run_module("-m", "train.downstream", str(bare), "--tasks", str(TASK))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: model model: ")
    assert "has no tokenizer files" in result.stderr
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)

    def evaluate(directory: Path) -> dict:
        return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={directory}", tasks=[resolve_task(str(TASK))],
                                       task_manager=TaskManager(include_defaults=False), limit=2, device="cpu")

    assert 0.0 <= evaluate(exported)["results"]["tiny_mc"]["acc,none"] <= 1.0
    with pytest.raises((AssertionError, OSError)):  # the issue's `assert len(context_enc) > 0`, or no tokenizer
        evaluate(bare)
