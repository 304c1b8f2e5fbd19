"""User-facing errors: the CLI prints these as one clear message, without a traceback."""

from __future__ import annotations


class UnisteerError(Exception):
    """Base class for every error caused by user input, configuration or environment."""


class ConfigError(UnisteerError):
    """A configuration value or key is invalid."""


class DataError(UnisteerError):
    """An input data file is missing or malformed."""


class ModelError(UnisteerError):
    """A model cannot be loaded or its structure is not supported."""


class UpdateMismatchError(UnisteerError):
    """A saved update does not fit the model it is being attached to."""


class PositionError(UnisteerError):
    """The token positions of a forward call cannot be determined (so position-restricted steering refuses)."""
