"""python -m pytest tests/integration/test_quickstart.py  (`make quickstart`'s script: a tiny model learns real text)

launchers/quickstart.sh in a temporary directory with fewer iterations: corpus (the stdlib's
docstrings), tokenizer (`python -m train.data tokenizer`), preprocessing with the datablend
written by train.preprocess, pretraining on 2 processes, plots. The loss must fall from about
ln(2048) = 7.6 (uniform over tiny-qwen3's vocabulary) to well under ln(1024) = 6.9, the loss of
guessing uniformly among the tokenizer's tokens. A second run skips the data steps.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-pretrain-Data-stdlib-lr0.003"


def quickstart(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "MASTER_"))}
    env.update(DATA_DIR=str(tmp_path / "data"), QAD_CHECKPOINT_ROOT=str(tmp_path / "runs"), TRAIN_ITERS="40",
               OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(REPO / "launchers" / "quickstart.sh"), *extra], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.mark.slow
def test_quickstart_prepares_real_text_and_the_loss_falls(tmp_path):
    first = quickstart(tmp_path, "LOG_INTERVAL=1")
    data = tmp_path / "data"
    blend = json.loads((data / "datablend_stdlib.json").read_text())
    assert blend == {"train": [1.0, "stdlib_text_document"], "valid": [1.0, "stdlib_valid_text_document"]}
    assert (data / "tokenizer" / "tokenizer.json").is_file()
    log = next((tmp_path / "runs" / RUN / "logs").glob("*.jsonl")).read_text().splitlines()
    records = [json.loads(line) for line in log]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40
    first_loss, last_loss = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert first_loss > 7.2 and last_loss < 6.5 and last_loss < first_loss - 1.0, (first_loss, last_loss)
    assert any("val_loss" in r for r in records)  # the valid split preprocessing held out
    assert (tmp_path / "runs" / RUN / "plots" / "loss.png").is_file()
    assert first.stdout.strip().splitlines()[-1].startswith("loss ")  # train.plot's summary line

    again = quickstart(tmp_path)  # data steps skipped; training resumes and has nothing left to do
    steps = [line for line in again.stderr.splitlines() if line.startswith("[quickstart]")]
    assert [step.split(":")[0] for step in steps] == ["[quickstart] pretrain tiny-qwen3 on it", "[quickstart] plots"]
