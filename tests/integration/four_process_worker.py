"""torchrun --nproc-per-node=4 tests/integration/four_process_worker.py RESULTS.json WORKER:CASE,...
(driven by conftest.py's four_processes)

The 4-process cases of several test workers (sharded_load_worker.py, tp_quant_worker.py,
expert_parallel_worker.py, step_worker.py) in one launch: 4 processes start up once instead of
once per file. A case is named after its worker, e.g. "step_worker:token_weighted_ddp"; each
starts from torch.manual_seed(0), as the first case of its own worker's launch would.
"""

import importlib

import torch

from worker_cases import cases_of, run_cases  # same folder: the shared main()

WORKERS = ["sharded_load_worker", "tp_quant_worker", "expert_parallel_worker", "step_worker"]


def seeded(case):
    def run():
        torch.manual_seed(0)
        case()
    return run


if __name__ == "__main__":
    run_cases({f"{worker}:{name}": seeded(case) for worker in WORKERS
               for name, case in cases_of(vars(importlib.import_module(worker))).items()})
