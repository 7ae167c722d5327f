"""The training engine: models, data, parallelism, QAD and the entrypoints `python -m train.<job>`."""

import time

PROCESS_START_S = time.time()  # startup timeline (benchmarks/launch_latency): before torch loads
