"""python -m pytest tests/integration/test_distill_parallel.py  (torchrun, 2 processes, gloo: chunked KD under DDP, FSDP2, TP)"""

import pytest

from test_parallel import run_worker  # same folder

CASES = ["ddp", "fsdp", "tp"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("distill"), CASES, "distill_worker.py")


@pytest.mark.slow  # one torchrun of 3 cases: ~70 s here
@pytest.mark.parametrize("case", CASES)
def test_distill_loss_matches_one_device(results, case):
    """2 AdamW steps on the KD loss: loss, gradients and weights equal the single-device student's."""
    assert results[case] == "ok", results[case]
