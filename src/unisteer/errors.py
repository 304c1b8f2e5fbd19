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


class PlotError(UnisteerError, ValueError):
    """Inputs to a plot are inconsistent (lengths, missing splits, output path)."""


class TrainingError(UnisteerError):
    """Training cannot go on (a NaN loss, a checkpoint that does not match, an output folder in use)."""


class FitError(UnisteerError, ValueError):
    """The data cannot be fitted (too few points, non-finite values, mismatched lengths)."""


class LogOddsError(UnisteerError, ValueError):
    """Inputs to the log-odds computation or its aggregation are invalid (NaN, shape, sign, ...)."""


class ManifoldError(UnisteerError, ValueError):
    """The reference sample cannot support the measurement (too few points or examples, non-finite values)."""


class JudgeError(UnisteerError):
    """The judge endpoint cannot be used (wrong URL, unknown model)."""


class JudgeAuthError(JudgeError):
    """The judge endpoint rejected the API key."""
