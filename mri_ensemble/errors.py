"""Errors a user can cause. The CLIs turn them into one line and a non-zero exit."""


class PipelineError(Exception):
    """Base class for every error caused by input or configuration, not by a bug."""


class DataError(PipelineError):
    """A data file or folder is missing, unreadable or not what the pipeline expects.

    The message names the file and says what was expected and what was found.
    """


class ConfigError(PipelineError, ValueError):
    """A parameter in params.yaml (or on the command line) is missing or invalid.

    The message names the key and says what was expected and what was found.
    """


class OutputError(PipelineError):
    """An output the pipeline refuses to write: it would replace an input, or another run
    is writing it now. The message names the path."""
