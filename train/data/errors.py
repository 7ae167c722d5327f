"""DataError: every bad-input problem in the data pipeline, raised before training starts."""


class DataError(ValueError):
    """A data file, blend or input that cannot be used; the message names the file/key/value.

    CLIs catch it and print `error: <message>` with exit status 2 (no traceback).
    """
