"""The training engine: models, data, parallelism, QAD and the entrypoints `python -m train.<job>`."""
