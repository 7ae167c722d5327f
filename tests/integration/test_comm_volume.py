"""python -m pytest tests/integration/test_comm_volume.py  (torchrun, 2 and 4 processes, gloo)

The communication plan (train/launch/comms.py) against the bytes a real step sends, 2 micro-batches
of 1 x 64 tokens in fp32, bytes from each rank's /proc/self/io (comm_volume_worker.py):
- data parallelism, tiny-llama3: DDP, FSDP2 (ZeRO-3, every micro-batch's gathers and
  reduce-scatter) and fsdp_zero2;
- tensor parallelism, tiny-llama3: TP 2 (the blocks' activation all-reduces in forward and
  backward, the embedding's and lm_head's, the logits gather), TP 2 x FSDP2 2;
- tensor parallelism, tiny-qwen3-next: TP 2 (Gated DeltaNet and gated attention blocks, MoE replicated);
- expert parallelism, tiny-qwen3-moe: EP 2 (the routed rows' all-to-alls, DDP over both ranks).
Gloo has no reduce-scatter: it all-reduces the whole gradient and keeps a shard, so its
reduce-scatters send all-reduce bytes (2 (n-1)/n instead of NCCL's (n-1)/n); all-reduce and
all-gather run as rings, all-to-all sends each peer its rows, as the plan counts them.
"""

import json
import subprocess
import sys

import pytest

from comm_volume_worker import STRATEGIES, planned_gloo_bytes  # same folder
from test_parallel import REPO, clean_env

SEQ_LEN, ACCUMULATION = 64, 2
# DDP also broadcasts the model's buffers (tiny-llama3's 128 KiB rope cache) from rank 0 in the
# forward of the step's synchronized micro-batch, which the plan leaves out: gloo's broadcast tree
# makes ranks 0 (and 1 of 4) send 1.7-3.4% more than the plan here; the mean is within 1.5%.
# Gloo adds a header to every message: ~576 bytes per all-reduce of TP's 32 KiB activations
# (1.8%), 1.4% over TP 2's step
MEAN_TOLERANCE, RANK_TOLERANCE = 0.02, 0.05
# EP 2: the plan's (n-1)/n of the routed rows is even routing, and a random router routes only
# roughly evenly: rank 1 sent 0.5% more than the plan with one set of random weights and 1.8%
# with another (the seeded init changed), rank 0 3.1-1.6 points more (the rope cache broadcast,
# 128 KiB of its 4.3 MB): 2.0% and 3.3% on the mean, rank 0 4.9% over
EP_MEAN_TOLERANCE, EP_RANK_TOLERANCE = 0.05, 0.08


def measured(tmp_path, processes: int, model: str, tp: int, ep: int, strategies: tuple[str, ...]) -> dict:
    result = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(REPO / "tests" / "integration" / "comm_volume_worker.py"), str(result), model, str(SEQ_LEN),
               str(ACCUMULATION), "1", str(tp), str(ep), ",".join(strategies)]
    run = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and result.exists(), (run.stdout + run.stderr)[-4000:]
    return json.loads(result.read_text())


def assert_sent_as_planned(results: dict, model: str, processes: int, tp: int = 1, ep: int = 1,
                           mean_tolerance: float = MEAN_TOLERANCE, rank_tolerance: float = RANK_TOLERANCE) -> None:
    for strategy, result in results.items():
        planned = planned_gloo_bytes(model, SEQ_LEN, ACCUMULATION, strategy, processes, tp=tp, ep=ep)
        sent = result["sent_bytes"]
        assert sum(sent) / len(sent) == pytest.approx(planned, rel=mean_tolerance), (strategy, sent, planned)
        for rank, rank_sent in enumerate(sent):
            assert rank_sent == pytest.approx(planned, rel=rank_tolerance), (strategy, rank, rank_sent, planned)


@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_planned_bytes_match_sent_bytes(tmp_path, processes):
    """The ranks send the plan's bytes (gradient all-reduce, FSDP2's all-gathers in forward and
    backward and its reduce-scatters): within 2% on the mean over the ranks, 5% on each rank,
    for ddp, fsdp and fsdp_zero2."""
    assert_sent_as_planned(measured(tmp_path, processes, "tiny-llama3", 1, 1, STRATEGIES), "tiny-llama3", processes)


@pytest.mark.parametrize("processes, strategy", [(2, "ddp"), pytest.param(4, "fsdp", marks=pytest.mark.slow)])
def test_tensor_parallel_bytes_match_sent_bytes(tmp_path, processes, strategy):
    """TP 2 (alone, and under FSDP2 over 2 data-parallel ranks): per block 2 all-reduces in forward
    and one per colwise Linear (5) in backward, the embedding's and lm_head's, the logits gather."""
    results = measured(tmp_path, processes, "tiny-llama3", 2, 1, (strategy,))
    assert_sent_as_planned(results, "tiny-llama3", processes, tp=2)


# tiny-qwen3-next at TP 2 sends 2.3% more than the plan: gloo's headers (~576 bytes on each of the
# step's ~38 activation all-reduces) and the per-step all-reduce of the Partial gradients of the
# Replicate DeltaNet conv weights (3 x 256 x 4 floats) and norms, which the plan leaves out
QWEN3_NEXT_TP_TOLERANCE = 0.03


def test_tensor_parallel_qwen3_next_bytes_match_sent_bytes(tmp_path):
    """TP 2 on tiny-qwen3-next: 3 Gated DeltaNet blocks (two colwise Linears each, in_proj_qkvz
    and in_proj_ba: 2 all-reduces in backward, out_proj's in forward), a gated attention block,
    MoE layers replicated, the first layer's dense MLP split."""
    results = measured(tmp_path, 2, "tiny-qwen3-next", 2, 1, ("ddp",))
    assert_sent_as_planned(results, "tiny-qwen3-next", 2, tp=2, mean_tolerance=QWEN3_NEXT_TP_TOLERANCE)


def test_expert_parallel_bytes_match_sent_bytes(tmp_path):
    """EP 2 on tiny-qwen3-moe (3 MoE layers of 8 experts, top-2): the routed rows' all-to-alls to
    the experts and back in forward and backward, the rest of the model's gradients under DDP."""
    results = measured(tmp_path, 2, "tiny-qwen3-moe", 1, 2, ("ddp",))
    assert_sent_as_planned(results, "tiny-qwen3-moe", 2, ep=2, mean_tolerance=EP_MEAN_TOLERANCE,
                           rank_tolerance=EP_RANK_TOLERANCE)
