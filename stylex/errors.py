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


class RunError(UsageError):
    """A run stopped for a reason the user can act on once it is named: a full disk, a folder
    that cannot be written, a damaged file, training that diverged. The message says which file
    or option, and what to do."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) reports a full disk or an exhausted
    quota: ``OSError`` ENOSPC / EDQUOT, or the ``RuntimeError`` with which ``torch.save`` reports
    a short write (``unexpected pos ... vs ...``, ``PytorchStreamWriter failed writing file``)."""
    import errno

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if isinstance(error, RuntimeError) and (
            "unexpected pos" in text or "PytorchStreamWriter failed writing" in text or "No space left" in text
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(
    path: object,  # the file being written
    error: BaseException,  # what the write raised
) -> RunError:
    """The message for a write of ``path`` that failed because the disk (or quota) is full."""
    cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return RunError(
        f"the disk is full: writing {path} failed ({cause}). Free some space on that disk (or point "
        "runs_root= at another one), then continue the run with resume=<its run folder>."
    )
