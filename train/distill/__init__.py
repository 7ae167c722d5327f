"""Knowledge distillation from a frozen teacher: the chunked KD loss (chunked.py, loss.py),
KD_CFG_PATH settings and the vocabulary rule (kd_config.py), the naive reference (losses.py)."""
