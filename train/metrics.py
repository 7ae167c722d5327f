"""Metrics fan-out on rank 0: one console line, a JSONL run log, TensorBoard scalars."""

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("train")


class MetricsLogger:
    def __init__(self, jsonl_path: Path | None, tensorboard_dir: Path | None, enabled: bool):
        self.enabled = enabled
        self.jsonl = open(jsonl_path, "a") if enabled and jsonl_path else None
        self.tensorboard = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(tensorboard_dir))

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        log.info("iter %d | %s", iteration, text)
        if self.jsonl:
            self.jsonl.write(json.dumps({"iteration": iteration, "time": time.time(), **metrics}) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, iteration)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
