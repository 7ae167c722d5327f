"""python -m pytest tests/integration/test_distill_parallel.py  (torchrun, 2 processes, gloo: chunked KD under DDP, FSDP2, TP)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_parallel import clean_env  # same folder

REPO = Path(__file__).resolve().parents[2]
CASES = ["ddp", "fsdp", "tp"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tests" / "integration" / "distill_worker.py"), str(out), ",".join(CASES)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # one torchrun of 3 cases: ~70 s here
@pytest.mark.parametrize("case", CASES)
def test_distill_loss_matches_one_device(results, case):
    """2 AdamW steps on the KD loss: loss, gradients and weights equal the single-device student's."""
    assert results[case] == "ok", results[case]
