"""Knowledge distillation from a frozen teacher: the KD loss, its full-logits fallback and naive
reference (loss.py), the chunked kernel it runs on (chunked.py), KD_CFG_PATH settings and the
vocabulary rule (kd_config.py)."""
