"""Exceptions raised by flexkd. Every message names the thing that is wrong (file, row, column, key)."""


class FlexKDError(Exception):
    """Base class of every error flexkd raises on purpose."""


class ConfigError(FlexKDError):
    """A parameter is missing, unknown or out of range. The message names the key."""


class DataError(FlexKDError):
    """A data file or dataset cannot be read as configured. The message names file, row and column."""


class ValidationFailed(FlexKDError):
    """The data did not pass its expectation suite. ``report`` holds the full report."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ProvenanceError(FlexKDError):
    """An artifact (checkpoint, relevance index, cache) does not match the inputs it claims to come from."""
