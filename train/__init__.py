"""The training engine: models, data, parallelism, QAD and the entrypoints `python -m train.<job>`."""

import os
import time

PROCESS_START_S = time.time()  # startup timeline (benchmarks/launch_latency): before torch loads

if os.environ.get("TRAIN_LIFELINE"):  # under the launchers: die with them (train/launch/lifeline.py)
    from train.launch.lifeline import watch_launchers

    watch_launchers(os.environ["TRAIN_LIFELINE"])
