"""Blocks shared by the model families: norms, RoPE, attention, MLPs, the decoder skeleton."""
