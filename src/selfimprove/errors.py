"""Exceptions with messages that say what was wrong and how to fix it."""


class SelfImproveError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(SelfImproveError, ValueError):
    """A config file, preset or override is invalid."""


class DatasetError(SelfImproveError):
    """An episode store is missing, corrupt or holds invalid values."""


class CheckpointError(SelfImproveError):
    """A checkpoint is missing, corrupt, or does not match the expected model."""


class RunStateError(SelfImproveError):
    """A run directory is in a state that does not allow the requested action."""


class InputError(SelfImproveError, ValueError):
    """Observations or instructions handed to a model do not fit it (shape, channels, dtype, instruction)."""


class StorageError(SelfImproveError, OSError):
    """A file or folder cannot be written or read: a read-only file system, a path through a file, a full
    disk, missing permissions. Still an ``OSError``, so code that tolerates those keeps doing so."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ..." form, also when errno is set
        return str(self.args[0]) if self.args else ""
