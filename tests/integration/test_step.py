"""python -m pytest tests/integration/test_step.py  (torchrun, 1, 2 and 4 processes, gloo; ~1 min in all)

One optimizer step of the trainer (train.trainer.accumulate_gradients), driven through
tests/integration/step_worker.py: the token-weighted loss on answer-only loss masks, gradient
synchronization once per step, the same weights with and without accumulation.
"""

import pytest

from test_parallel import run_worker  # same folder

TOKEN_CASES = ["token_weighted_ddp", "token_weighted_fsdp", "token_weighted_kd_fsdp"]
STEP_CASES = ["sync_ddp", "sync_fsdp_zero2", "sync_fsdp_every_micro_batch", "accumulation_weights_ddp", "accumulation_weights_fsdp"]


# the worker's cases run in one torchrun per process count with the other files' (conftest.py shared_launch)
SHARED_LAUNCHES = {**dict.fromkeys(["test_token_weighted_step_two_ranks", "test_gradients_synchronized_once_per_step",
                                    "test_accumulation_keeps_weights"], ("step_worker", 2, TOKEN_CASES + STEP_CASES)),
                   "test_token_weighted_step_other_splits": ("step_worker", 4, TOKEN_CASES)}


@pytest.fixture(scope="module")
def two_processes(shared_launch):
    return shared_launch("step_worker", 2)


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_weighted_step_two_ranks(two_processes, case):
    """GBS 16 as MBS 4 x 2 accumulation x 2 ranks: loss and gradients equal plain PyTorch's sum over
    every loss-mask token of the batch / their count (LM loss; KD loss with its LM term)."""
    assert two_processes[case] == "ok", two_processes[case]


@pytest.mark.slow  # a torchrun each: ~25 s
@pytest.mark.parametrize("processes", [1, 4])
def test_token_weighted_step_other_splits(tmp_path, shared_launch, processes):
    """GBS 16 as MBS 1 x 16 accumulation x 1 rank, and MBS 2 x 2 x 4 ranks: the same gradients."""
    results = (run_worker(tmp_path, TOKEN_CASES, "step_worker.py", processes=1) if processes == 1
               else shared_launch("step_worker", 4))
    assert results == {case: "ok" for case in TOKEN_CASES}, results


@pytest.mark.parametrize("case", ["sync_ddp", "sync_fsdp_zero2", "sync_fsdp_every_micro_batch"])
def test_gradients_synchronized_once_per_step(two_processes, case):
    """4 accumulated micro-batches issue the gradient all-reduces (FSDP2: reduce-scatters) of one."""
    assert two_processes[case] == "ok", two_processes[case]


@pytest.mark.parametrize("case", ["accumulation_weights_ddp", "accumulation_weights_fsdp"])
def test_accumulation_keeps_weights(two_processes, case):
    """3 AdamW steps: 4 micro-batches of 1 per rank leave the weights of 1 micro-batch of 4."""
    assert two_processes[case] == "ok", two_processes[case]
