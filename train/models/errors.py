"""Error types of the model zoo; each message names the culprit (no torch import here)."""


class ModelConfigError(ValueError):
    """A ModelArgs (or HF config.json) describes an impossible or unsupported model."""


class UnknownModelError(ModelConfigError):
    """A model name that the registry does not hold; the message lists the known names."""


class CheckpointError(ValueError):
    """An HF checkpoint directory that cannot be read into a model (files, keys, shapes)."""
