"""Errors the command line prints as one line (exit status 1) instead of a traceback."""


class ShoggothError(Exception):
    """Base: bad input or a run that cannot go on; the message names the file, line or step."""


class DataError(ShoggothError, ValueError):
    """A corpus, dataset or rankings file that cannot be read as asked."""


class ModelDirError(ShoggothError, ValueError):
    """A model directory that is missing, incomplete or of an unsupported kind."""


class TrainingError(ShoggothError, RuntimeError):
    """A run that must stop (a NaN loss, say); the last good checkpoint is kept."""
