"""The library's own errors: each says what was received and what is expected.

Every error derives from `PiggybackError` and from the matching built-in
(`ValueError`, `LookupError`, `FileNotFoundError`), so callers can catch either.
"""

from __future__ import annotations


class PiggybackError(Exception):
    """Base class of every error raised on purpose by piggyback."""


class ConfigError(PiggybackError, ValueError):
    """A setting has a value outside what is allowed."""


class UnknownTaskError(PiggybackError, LookupError):
    """A task name was asked for that the model does not hold."""


class TaskFileError(PiggybackError, ValueError):
    """A task file is truncated, corrupt, or not a piggyback task file."""


class BackboneMismatchError(TaskFileError):
    """A task file was made for another backbone (fingerprint or layer shapes differ)."""


class TaskFileNotFoundError(PiggybackError, FileNotFoundError):
    """A task file or task directory does not exist."""


class DataError(PiggybackError, ValueError):
    """A dataset is missing, empty, or unreadable."""


class DegenerateTaskWarning(UserWarning):
    """A trained task that is not what its method promises: a mask that keeps every
    weight (a classifier-only head in disguise) or a network that fell to chance."""
