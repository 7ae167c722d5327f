"""python -m pytest tests/integration/test_comm_volume.py  (torchrun, 2 and 4 processes, gloo)

The communication plan (train/launch/comms.py) against the bytes a real step sends: DDP, FSDP2
(ZeRO-3, every micro-batch's gathers and reduce-scatter) and fsdp_zero2, 2 micro-batches of
1 x 64 tokens of tiny-llama3 in fp32, bytes from each rank's /proc/self/io (comm_volume_worker.py).
Gloo has no reduce-scatter: it all-reduces the whole gradient and keeps a shard, so its
reduce-scatters send all-reduce bytes (2 (n-1)/n instead of NCCL's (n-1)/n); all-reduce and
all-gather run as rings, as the plan counts them.
"""

import json
import subprocess
import sys

import pytest

from comm_volume_worker import planned_gloo_bytes  # same folder
from test_parallel import REPO, clean_env

MODEL, SEQ_LEN, ACCUMULATION = "tiny-llama3", 64, 2
# DDP also broadcasts the model's buffers (tiny-llama3's 128 KiB rope cache) from rank 0 in the
# forward of the step's synchronized micro-batch, which the plan leaves out: gloo's broadcast tree
# makes ranks 0 (and 1 of 4) send 1.7-3.4% more than the plan here; the mean is within 1.5%
MEAN_TOLERANCE, RANK_TOLERANCE = 0.02, 0.05


def measured(tmp_path, processes: int) -> dict:
    result = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(REPO / "tests" / "integration" / "comm_volume_worker.py"), str(result), MODEL, str(SEQ_LEN),
               str(ACCUMULATION), "1"]
    run = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and result.exists(), (run.stdout + run.stderr)[-4000:]
    return json.loads(result.read_text())


@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_planned_bytes_match_sent_bytes(tmp_path, processes):
    """The ranks send the plan's bytes (gradient all-reduce, FSDP2's all-gathers in forward and
    backward and its reduce-scatters): within 2% on the mean over the ranks, 5% on each rank,
    for ddp, fsdp and fsdp_zero2."""
    results = measured(tmp_path, processes)
    for strategy, result in results.items():
        planned, sent = planned_gloo_bytes(MODEL, SEQ_LEN, ACCUMULATION, strategy, processes), result["sent_bytes"]
        assert sum(sent) / len(sent) == pytest.approx(planned, rel=MEAN_TOLERANCE), (strategy, sent, planned)
        for rank, rank_sent in enumerate(sent):
            assert rank_sent == pytest.approx(planned, rel=RANK_TOLERANCE), (strategy, rank, rank_sent, planned)
