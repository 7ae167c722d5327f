"""The shared main() of the torchrun test workers: run the named case_* functions on every rank.

    python -m torch.distributed.run --nproc-per-node 2 some_worker.py RESULT_JSON [case1,case2]

Each case runs on all ranks; a failing case is recorded with its traceback and the ranks stay
in step (a barrier after each). Rank 0 writes {case: "ok" | traceback} to RESULT_JSON.
"""

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist


def cases_of(namespace: dict) -> dict:
    """{name: function} for every case_<name> function of a worker module's globals()."""
    return {name[len("case_"):]: function for name, function in namespace.items() if name.startswith("case_")}


def run_cases(cases: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(cases)
    results = {}
    for name in only:
        try:
            cases[name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported per case; the ranks stay in step
            results[name] = traceback.format_exc()
        dist.barrier()
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, results)
    merged = {name: next((r[name] for r in every_rank if r[name] != "ok"), "ok") for name in results}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(merged, f, indent=1)
    dist.destroy_process_group()
