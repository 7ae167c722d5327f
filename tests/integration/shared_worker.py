"""torchrun --nproc-per-node=N tests/integration/shared_worker.py RESULTS.json WORKER:CASE,...
(driven by conftest.py's shared_launch)

The cases of several test workers (the *_worker.py of this folder) in one launch: N processes
start up once per session instead of once per test file. A case is named after its worker,
e.g. "step_worker:token_weighted_ddp"; each starts from torch.manual_seed(0), as the first case
of its own worker's launch would.
"""

import importlib
import sys

import torch

from worker_cases import cases_of, run_cases  # same folder: the shared main()


def seeded(case):
    def run():
        torch.manual_seed(0)
        case()
    return run


if __name__ == "__main__":
    workers = dict.fromkeys(name.split(":")[0] for name in sys.argv[2].split(","))
    run_cases({f"{worker}:{name}": seeded(case) for worker in workers
               for name, case in cases_of(vars(importlib.import_module(worker))).items()})
