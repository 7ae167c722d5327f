"""python -m pytest tests/integration/test_pipeline.py  (torchrun, 2 and 4 processes, gloo; ~2 min)

Pipeline parallelism (PP_SIZE=2, train/parallel/pipeline.py) through the real entrypoint against
one process with the same global batch (8 micro-batches of 1 sequence): the logged losses per
iteration, and the weights of the DCP checkpoint after 3 AdamW steps, equal within fp rounding.
The checkpoint of a PP 2 x DP 2 run resumes in one process (names independent of the stages).
tiny-llama3: 4 layers, untied embeddings (PP refuses tied ones).
"""

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from test_parallel import run_pretrain  # same folder

COMMON = ["model.name=tiny-llama3", "data.source=synthetic", "data.seq_length=32", "training.micro_batch_size=1",
          "training.global_batch_size=8", "optim.lr=1e-2", "optim.schedule=constant", "optim.warmup_iters=0",
          "optim.eps=1e-4", "optim.grad_clip=1.0", "logging.tensorboard=false"]


def pretrain(root: Path, overrides: list[str], processes: int) -> list[float]:
    return run_pretrain(root, [*COMMON, *overrides], processes, timeout=300)


def weights(root: Path, iteration: int) -> dict[str, torch.Tensor]:
    """The model tensors of the DCP checkpoint at `iteration`, by name."""
    [directory] = root.glob(f"*/checkpoints/*/iter_{iteration:07d}")
    dcp_to_torch_save(directory, root / "weights.pt")
    return torch.load(root / "weights.pt", weights_only=False)["model"]


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[list[float], dict]:
    """The reference: 3 iterations (their weights), resumed to 5 (the losses of all 5)."""
    root = tmp_path_factory.mktemp("one")
    pretrain(root, ["training.train_iters=3"], 1)
    reference = weights(root, 3)
    return pretrain(root, ["training.train_iters=5"], 1), reference


@pytest.mark.slow
@pytest.mark.parametrize("layers", ["", "1,3"], ids=["balanced", "uneven"])
def test_two_stages_match_one_process(tmp_path, one_process, layers):
    expected_losses, expected_weights = one_process
    result = pretrain(tmp_path, ["training.train_iters=3", "parallel.pipeline_parallel_size=2",
                                 f"parallel.pipeline_layers={layers!r}"], 2)
    assert result == pytest.approx(expected_losses[:3], rel=1e-5)
    assert_same_weights(weights(tmp_path, 3), expected_weights)


@pytest.mark.slow
def test_two_stages_times_fsdp2_match_and_resume_in_one_process(tmp_path, one_process):
    """PP 2 x DP 2 (FSDP2 inside each stage) on 4 processes, then 2 more iterations as PP 1."""
    expected_losses, expected_weights = one_process
    pretrain(tmp_path, ["training.train_iters=3", "parallel.pipeline_parallel_size=2",
                        "parallel.data_parallel=fsdp"], 4)
    assert_same_weights(weights(tmp_path, 3), expected_weights)
    result = pretrain(tmp_path, ["training.train_iters=5"], 1)
    assert result == pytest.approx(expected_losses, rel=1e-5)
