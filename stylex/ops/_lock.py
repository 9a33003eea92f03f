"""A cross-process build lock that says who holds it and notices a holder that was killed.

:class:`BuildLock` lets one process (one rank of a multi-GPU job) compile while the others wait.
Its core is ``filelock.FileLock`` (``flock`` on ``<name>.lock``; the kernel drops the lock of
a process that dies, so a killed build never blocks the next run). What it adds lives in a
second file beside it, ``<name>.owner`` (filelock truncates or replaces its own file, so the
record cannot share it): the holder's pid, host and start time while the lock is held, and
nothing after a clean release. From that record

* a waiter says once on stderr whom it waits for, and gives up after ``timeout`` seconds
  (``$STYLEX_BUILD_LOCK_TIMEOUT``, default one hour) with a ``TimeoutError`` naming the holder;
* the next holder after a killed build finds the record left behind, warns that the lock was
  stale and that it recovers by building again, and takes over.

Each ``BuildLock`` opens its own descriptor, so two of them on one path exclude each other
between the threads of one process as between processes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

LOCK_TIMEOUT_S = 3600.0  # a waiter gives up after this long ($STYLEX_BUILD_LOCK_TIMEOUT overrides)


def owner_path(lock_path: Path) -> Path:
    """Where the owner record of the lock ``<name>.lock`` lives: ``<name>.owner``."""
    lock_path = Path(lock_path)
    if lock_path.suffix == ".lock":
        return lock_path.with_suffix(".owner")
    return lock_path.with_name(lock_path.name + ".owner")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BuildLock:
    """An exclusive lock on ``path`` with the holder recorded beside it; see the module docstring."""

    def __init__(
        self,
        path: Path,  # the lock file, <name>.lock; the record goes to <name>.owner
        timeout: float | None = None,  # seconds to wait; default $STYLEX_BUILD_LOCK_TIMEOUT or one hour
        poll: float = 0.25,  # seconds between attempts
        what: str = "the CUDA extension",  # what the holder builds, for the waiting message
    ) -> None:
        self.path = Path(path)
        self.owner_path = owner_path(self.path)
        if timeout is None:
            timeout = float(os.environ.get("STYLEX_BUILD_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
        self.timeout = timeout
        self.poll = poll
        self.what = what
        self._file_lock = None  # the filelock.FileLock, while it is held
        self._held = False  # acquired (with or without the file lock) and not yet released
        self.stale_owner: dict | None = None  # the record of an interrupted build, if one was found

    def _read_owner(self) -> dict | None:
        try:
            text = self.owner_path.read_text()
        except OSError:
            return None
        try:
            owner = json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return {"pid": None, "host": "?", "raw": text[:200]}
        return owner if isinstance(owner, dict) else None

    def _write_owner(self, text: str) -> None:
        # Written aside and renamed into place, so that a waiter reads the old or the new record,
        # never half of one.
        scratch = self.owner_path.with_name(f"{self.owner_path.name}.{os.getpid()}.tmp")
        with open(scratch, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(scratch, self.owner_path)

    def acquire(self) -> None:
        import filelock  # only a build needs it: importing stylex.ops stays light

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(
            self.path,
            # On a file system without flock, filelock would fall back to an existence lock that a
            # killed holder leaves behind for good; we build unlocked instead (see below).
            fallback_to_soft=False,
        )
        start = time.monotonic()
        told = False
        while True:
            try:
                lock.acquire(blocking=False)
                self._file_lock = lock
                break
            except filelock.Timeout:  # busy. A TimeoutError, hence an OSError: caught first
                pass
            except OSError as err:  # a file system without flock: go on unlocked (publishing stays atomic)
                warnings.warn(f"cannot lock {self.path} ({err}); building without a cross-process lock", stacklevel=3)
                break
            owner = self._read_owner() or {}
            waited = time.monotonic() - start
            if waited > self.timeout:
                raise TimeoutError(
                    f"waited {waited:.0f} s for the build lock {self.path}, held by process {owner.get('pid')} on "
                    f"{owner.get('host')}. If no build is running there, delete the lock file; to wait longer "
                    "set STYLEX_BUILD_LOCK_TIMEOUT (seconds)"
                )
            if not told:
                print(
                    f"stylex: waiting for process {owner.get('pid')} on {owner.get('host')} to finish building "
                    f"{self.what} ({self.path})",
                    file=sys.stderr,
                    flush=True,
                )
                told = True
            time.sleep(self.poll)
        self._held = True
        try:
            previous = self._read_owner()
            if previous:
                self.stale_owner = previous
                pid = previous.get("pid")
                alive = previous.get("host") == socket.gethostname() and isinstance(pid, int) and _pid_alive(pid)
                state = "still running but no longer holds it" if alive else "no longer running"
                warnings.warn(
                    f"found a stale build lock {self.path} left by process {previous.get('pid')} on "
                    f"{previous.get('host')} ({state}: a killed or interrupted build); recovering by building again",
                    stacklevel=3,
                )
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            self._write_owner(json.dumps(record))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            # Clear the owner record before unlocking: an empty record means a clean finish.
            self._write_owner("")
        finally:
            if self._file_lock is not None:
                self._file_lock.release()
                self._file_lock = None

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
