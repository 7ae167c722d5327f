"""python -m pytest tests/integration/test_pipeline.py  (torchrun, 2 and 4 processes, gloo; ~6 min)

Pipeline parallelism (PP_SIZE=2, train/parallel/pipeline.py) through the real entrypoint against
one process with the same global batch (8 micro-batches of 1 sequence): the logged losses and
gradient norms per iteration, and the weights of the DCP checkpoint after 3 AdamW steps, equal
within fp rounding. Checkpoints cross layouts (names independent of the stages): PP 2 x DP 2
resumes in one process, one process resumes in PP 2, and PP 2 resumes in PP 2 bit for bit.
Models (4 layers each): tiny-llama3 (dense, untied), tiny-qwen3-moe (router auxiliary loss
across the stages, layer 0 dense), tiny-qwen3 (tied embeddings: a copy on each end stage),
tiny-gpt2 and tiny-qwen3-next; tiny-qwen3 and tiny-qwen3-next also as PP 2 x TP 2 resumed under FSDP2,
tiny-qwen3-moe as
PP 2 x EP 2 resumed in one process.
Interleaved 1F1B (PP_SCHEDULE=interleaved_1f1b, 2 virtual stages of one block each: stages 0 and 2
on rank 0, 1 and 3 on rank 1; with DDP, TP, EP or FSDP2 inside the stages) against the same
one-process runs, and its checkpoint resumed there (also from PP 2 x FSDP2 dp 2).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from test_parallel import losses, run_pretrain  # same folder

COMMON = ["model.name=tiny-llama3", "data.source=synthetic", "data.seq_length=32", "training.micro_batch_size=1",
          "training.global_batch_size=8", "optim.lr=1e-2", "optim.schedule=constant", "optim.warmup_iters=0",
          "optim.eps=1e-4", "optim.grad_clip=1.0", "logging.tensorboard=false"]


MODELS = ["tiny-llama3", "tiny-qwen3-moe", "tiny-qwen3"]
PP2 = ["parallel.pipeline_parallel_size=2"]
INTERLEAVED = [*PP2, "parallel.pipeline_schedule=interleaved_1f1b", "parallel.virtual_stages=2"]
FSDP = ("parallel.data_parallel=fsdp",)


def pretrain(root: Path, overrides: list[str], processes: int) -> list[float]:
    return run_pretrain(root, [*COMMON, *overrides], processes, timeout=300)


def grad_norms(root: Path) -> list[float]:
    """The logged gradient norm per iteration (the tied weight counted once)."""
    records = [json.loads(line) for path in sorted(root.glob("*/logs/*.jsonl")) for line in path.read_text().splitlines()]
    return [record["grad_norm"] for record in sorted(records, key=lambda r: r.get("iteration", -1))
            if "grad_norm" in record]


def weights(root: Path, iteration: int) -> dict[str, torch.Tensor]:
    """The model tensors of the DCP checkpoint at `iteration`, by name."""
    [directory] = root.glob(f"*/checkpoints/*/iter_{iteration:07d}")
    dcp_to_torch_save(directory, root / "weights.pt")
    return torch.load(root / "weights.pt", weights_only=False)["model"]


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def matches_then_resumes(root: Path, reference: tuple, model: str, layout: list[str], processes: int,
                         resume_layout: list[str], resume_processes: int) -> None:
    """`layout` on `processes` for 3 iterations gives the reference's (one_process) gradient norms and
    weights; 2 more under `resume_layout` from its checkpoint give its 5 losses."""
    expected_losses, expected_weights, expected_norms, _ = reference
    pretrain(root, [f"model.name={model}", "training.train_iters=3", *layout], processes)
    assert grad_norms(root) == pytest.approx(expected_norms, rel=1e-4)
    assert_same_weights(weights(root, 3), expected_weights)
    result = pretrain(root, [f"model.name={model}", "training.train_iters=5", *resume_layout], resume_processes)
    assert result == pytest.approx(expected_losses, rel=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """model -> the reference: 3 iterations (their weights, gradient norms, and a copy of the run at
    3 for the tests that resume it elsewhere), resumed to 5 (the losses of all 5); run once per model."""
    references = {}

    def reference(model: str) -> tuple[list[float], dict, list[float], Path]:
        if model not in references:
            root = tmp_path_factory.mktemp(model)
            pretrain(root, [f"model.name={model}", "training.train_iters=3"], 1)
            weights_3, norms = weights(root, 3), grad_norms(root)
            at_3 = tmp_path_factory.mktemp(f"{model}-at-3")
            shutil.copytree(root, at_3, dirs_exist_ok=True)
            references[model] = (pretrain(root, [f"model.name={model}", "training.train_iters=5"], 1), weights_3, norms,
                                 at_3)
        return references[model]
    return reference


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """(model, layers) -> a PP 2 run of 3 iterations (left as it ended; tests copy it to resume it)."""
    roots = {}

    def run(model: str, layers: str) -> Path:
        if (model, layers) not in roots:
            root = tmp_path_factory.mktemp(f"{model}-pp2")
            pretrain(root, [f"model.name={model}", "training.train_iters=3", *PP2,
                            f"parallel.pipeline_layers={layers!r}"], 2)
            roots[model, layers] = root
        return roots[model, layers]
    return run


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """(model, processes, overrides) -> an interleaved PP 2 run of 3 iterations (4 processes: PP 2 x
    DP 2, or PP 2 x TP 2)."""
    roots = {}

    def run(model: str, processes: int, overrides: tuple[str, ...] = ()) -> Path:
        if (model, processes, overrides) not in roots:
            root = tmp_path_factory.mktemp(f"{model}-interleaved")
            pretrain(root, [f"model.name={model}", "training.train_iters=3", *INTERLEAVED, *overrides], processes)
            roots[model, processes, overrides] = root
        return roots[model, processes, overrides]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("model, layers", [("tiny-llama3", ""), ("tiny-llama3", "1,3"), ("tiny-qwen3-moe", "1,3"),
                                           ("tiny-qwen3", ""), ("tiny-gpt2", ""), ("tiny-qwen3-next", "")],
                         ids=["balanced", "uneven", "moe", "tied", "gpt2", "qwen3-next"])
def test_two_stages_match_one_process(one_process, two_stages, model, layers):
    """moe 1,3: the first stage's one block is dense, the balance statistics start on the second;
    gpt2: the learned positions on the first stage; qwen3-next: hybrid blocks, each stage its RoPE."""
    expected_losses, expected_weights, expected_norms, _ = one_process(model)
    root = two_stages(model, layers)
    assert losses(root) == pytest.approx(expected_losses[:3], rel=1e-5)
    assert grad_norms(root) == pytest.approx(expected_norms, rel=1e-4)
    assert_same_weights(weights(root, 3), expected_weights)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_two_stages_times_fsdp2_match_and_resume_in_one_process(tmp_path, one_process, model):
    """PP 2 x DP 2 (FSDP2 inside each stage) on 4 processes, then 2 more iterations as PP 1."""
    matches_then_resumes(tmp_path, one_process(model), model, [*PP2, "parallel.data_parallel=fsdp"], 4, [], 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_experts_split_inside_two_stages_match_and_resume_in_one_process(tmp_path, one_process, strategy):
    """PP 2 x EP 2 on 4 processes (DDP or FSDP2 over each stage's 2 data-parallel ranks, which hold
    half the experts each: tokens exchanged by all-to-all inside the stage, the expert gradients and
    norms finished apart), then 2 more iterations in one process from its checkpoint (EP 1)."""
    layout = [*PP2, "parallel.expert_parallel_size=2", f"parallel.data_parallel={strategy}"]
    matches_then_resumes(tmp_path, one_process("tiny-qwen3-moe"), "tiny-qwen3-moe", layout, 4, [], 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-next"])
def test_two_stages_times_tp2_match_and_resume_under_fsdp2(tmp_path, one_process, name):
    """PP 2 x TP 2 on 4 processes (tied tiny-qwen3: both copies vocabulary shards, their gradients
    summed shard by shard; tiny-qwen3-next: each stage's Gated DeltaNet and gated attention heads
    split), then 2 more iterations as FSDP2 on 2 processes from its checkpoint."""
    fsdp = ["parallel.data_parallel=fsdp"]
    matches_then_resumes(tmp_path, one_process(name), name, [*fsdp, *PP2, "parallel.tensor_parallel_size=2"], 4, fsdp, 2)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-qwen3"])
def test_one_process_checkpoint_resumes_in_two_stages(tmp_path, one_process, model):
    """A PP 1 checkpoint (the tied weight's AdamW state under embed_tokens.weight) read by PP 2:
    the reference's run at 3 iterations, copied."""
    expected_losses, _, _, at_3 = one_process(model)
    shutil.copytree(at_3, tmp_path, dirs_exist_ok=True)
    result = pretrain(tmp_path, [f"model.name={model}", "training.train_iters=5", *PP2], 2)
    assert result == pytest.approx(expected_losses, rel=1e-5)


@pytest.mark.slow
def test_two_stages_resume_bit_for_bit(tmp_path, two_stages):
    """tiny-qwen3 (tied) on PP 2: 3 iterations (the tied case's run, copied) then 2 more equal 5
    uninterrupted exactly."""
    model = ["model.name=tiny-qwen3", *PP2]
    shutil.copytree(two_stages("tiny-qwen3", ""), tmp_path / "split")
    resumed = pretrain(tmp_path / "split", [*model, "training.train_iters=5"], 2)
    assert resumed == pretrain(tmp_path / "whole", [*model, "training.train_iters=5"], 2)
    assert all(torch.equal(weights(tmp_path / "split", 5)[name], tensor)
               for name, tensor in weights(tmp_path / "whole", 5).items())


@pytest.mark.slow
@pytest.mark.parametrize("model, processes, overrides", [
    ("tiny-llama3", 4, ()), ("tiny-qwen3-moe", 2, ()), ("tiny-qwen3", 2, ()),
    ("tiny-qwen3", 4, ("parallel.tensor_parallel_size=2", "parallel.data_parallel=fsdp")),
    ("tiny-qwen3-moe", 4, ("parallel.expert_parallel_size=2",)),
    ("tiny-llama3", 4, FSDP), ("tiny-qwen3", 4, FSDP),
], ids=["dense-dp2", "moe", "tied", "tied-tp2", "moe-ep2", "dense-fsdp2", "tied-fsdp2"])
def test_interleaved_stages_match_one_process(one_process, interleaved, model, processes, overrides):
    """dense-dp2: PP 2 x DP 2, each rank's two stages' gradients averaged over dp after the
    schedule; moe: the balance sums through the four stages, across the two ranks twice; tied:
    the embedding on stage 0 (rank 0) and lm_head on stage 3 (rank 1), their gradients summed;
    tied-tp2: PP 2 x TP 2 (data-parallel size 1, so FSDP2 shards nothing), vocabulary shards;
    moe-ep2: PP 2 x EP 2, each stage's experts split over its 2 data-parallel ranks; dense-fsdp2,
    tied-fsdp2: PP 2 x DP 2 under FSDP2, each stage's blocks sharded over its 2 data-parallel ranks
    (the root's embedding and lm_head gathered through the model's call, the tied copies' shards summed)."""
    expected_losses, expected_weights, expected_norms, _ = one_process(model)
    root = interleaved(model, processes, overrides)
    assert losses(root) == pytest.approx(expected_losses[:3], rel=1e-5)
    assert grad_norms(root) == pytest.approx(expected_norms, rel=1e-4)
    assert_same_weights(weights(root, 3), expected_weights)


@pytest.mark.slow
@pytest.mark.parametrize("processes, overrides", [(2, ()), (4, FSDP)], ids=["pp2", "pp2-fsdp2"])
def test_interleaved_checkpoint_resumes_in_one_process(tmp_path, one_process, interleaved, processes, overrides):
    """tiny-qwen3 (tied) saved under interleaved PP 2 (each rank's parameters under the whole
    model's names, lm_head's AdamW state under embed_tokens.weight; pp2-fsdp2: PP 2 x DP 2, FSDP2
    shards), 2 more iterations in one process: the 5 losses of the uninterrupted one-process run
    (the runs of test_interleaved_stages_match_one_process, copied)."""
    expected_losses, _, _, _ = one_process("tiny-qwen3")
    shutil.copytree(interleaved("tiny-qwen3", processes, overrides), tmp_path, dirs_exist_ok=True)
    result = pretrain(tmp_path, ["model.name=tiny-qwen3", "training.train_iters=5"], 1)
    assert result == pytest.approx(expected_losses, rel=1e-5)
