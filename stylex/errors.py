"""Errors that speak to the user.

Both command lines (``train.py`` and ``explain.py``) print these as one line, ``error: ...``,
and exit with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """A problem with what the user asked for: an option, a path, a file. The message names it
    and says what to do."""


class ConfigError(UsageError, ValueError):
    """A problem with a training configuration; the message names the option (``loss.adv``,
    ``dataset.root``, ...) and what to do."""
