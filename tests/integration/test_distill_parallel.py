"""python -m pytest tests/integration/test_distill_parallel.py  (torchrun, 2 processes, gloo: chunked KD under DDP, FSDP2, TP)"""

import pytest

CASES = ["ddp", "fsdp", "tp"]


# the worker's cases run in one torchrun with the other files' (conftest.py shared_launch)
SHARED_LAUNCHES = {"test_distill_loss_matches_one_device": ("distill_worker", 2, CASES)}


@pytest.fixture(scope="module")
def results(shared_launch):
    return shared_launch("distill_worker", 2)


@pytest.mark.slow  # 3 cases: ~70 s here
@pytest.mark.parametrize("case", CASES)
def test_distill_loss_matches_one_device(results, case):
    """2 AdamW steps on the KD loss: loss, gradients and weights equal the single-device student's."""
    assert results[case] == "ok", results[case]
