"""One writer per record: an exclusive lock held for the writer's lifetime.

A record (:mod:`sdelip.record`) has one writer. The writer holds an exclusive
``flock`` on the file ``<record>.lock`` from before it touches the record until it
closes it; the lock file names the holder (process id, host, start time). A second
writer — another :class:`~sdelip.tracking.tracker.Tracker` or ``sdelip track`` in this or any
other process on the machine — is refused at open with :class:`RecordLockedError`
naming the record and the holder. The kernel releases the lock when the holder dies
(``kill -9`` included), so a killed run never blocks its own rerun; a stale lock file
left by it is taken over. Readers take no lock.

The lock follows the file, not its spelling: the record's path is resolved (symlinks
and ``..`` followed) before the lock file's name is derived, so ``alias.db → r.db``
locks ``r.db.lock``; and while a writer holds the record it also holds a ``flock`` on
the database file itself (:meth:`RecordLock.hold_file`), so deleting the ``.lock``
file does not let a second writer in. The same lock, with ``what="checkpoint"`` or
``"sweep folder"``, guards a checkpoint file and a sweep's output folder.

``flock`` locks are reliable on local file systems; on network file systems (NFS,
SMB) they depend on the server, so keep two runs from writing one record there by
other means.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from pathlib import Path
from typing import Optional, Union

from ..errors import RecordLockedError  # noqa: F401  (defined there, re-exported)

try:  # pragma: no cover - always present on POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking
    fcntl = None

__all__ = ["RecordLock", "RecordLockedError", "lock_path"]


def lock_path(record: Union[str, os.PathLike]) -> Path:
    """The lock file of a record: ``<record>.lock`` beside the file the path resolves to."""
    record = Path(record).resolve()
    return record.with_name(record.name + ".lock")


class RecordLock:
    """An exclusive lock on a record path for one writer (released by :meth:`release` or death).

    Args:
        record: the record's path (the lock is ``<record>.lock`` beside the file it resolves
            to; its folder is created if missing).
        what: what the path is, for the messages (``"record"``, ``"checkpoint"``, …).
        lock_file: the lock file, instead of ``<record>.lock`` (e.g. a sweep folder's
            ``<folder>/.sweep.lock``).

    Raises:
        RecordLockedError: another writer holds the record.
        PermissionError / OSError: the lock file cannot be created (e.g. a read-only
            folder); the message names the folder.
    """

    def __init__(self, record: Union[str, os.PathLike], what: str = "record",
                 lock_file: Union[None, str, os.PathLike] = None):
        self.record = Path(record)
        self.what = what
        self.path = lock_path(self.record) if lock_file is None else Path(lock_file).resolve()
        self._fd: Optional[int] = None
        self._file_fd: Optional[int] = None
        self._acquire()
        try:
            self.hold_file()
        except BaseException:
            self.release()
            raise

    def hold_file(self) -> None:
        """Also hold a ``flock`` on the locked file itself (when it exists), as long as the lock is held.

        A second writer that finds the file locked is refused even if the ``.lock`` file was
        deleted. Called again after the file was replaced (``overwrite``), it moves to the
        new file. SQLite's own locks (``fcntl``) are independent of ``flock``.
        """
        if fcntl is None or self._fd is None:  # pragma: no cover
            return
        try:
            fd = os.open(str(self.record), os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        except OSError:  # pragma: no cover - unreadable: the lock file alone guards it
            return
        if self._file_fd is not None:
            if os.path.samestat(os.fstat(fd), os.fstat(self._file_fd)):
                os.close(fd)
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RecordLockedError(
                    f"the {self.what} {str(self.record)!r} is being written by another writer (it holds a lock on "
                    f"the file itself; its lock file {str(self.path)!r} was removed, so the holder is unknown); a "
                    f"{self.what} has one writer: wait for that run to finish (or stop it)"
                ) from None
            raise
        old, self._file_fd = self._file_fd, fd
        if old is not None:
            os.close(old)

    def _acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, f"cannot create the folder {str(self.record.parent)!r} of the {self.what} "
                                 f"{str(self.record)!r}: {exc.strerror}") from None
        for _ in range(100):
            try:
                fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _os_error(exc, f"cannot write the {self.what} {str(self.record)!r}: creating its lock file "
                                     f"{str(self.path)!r} failed ({exc.strerror}); is the folder "
                                     f"{str(self.record.parent)!r} writable?") from None
            if fcntl is None:  # pragma: no cover
                self._fd = fd
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RecordLockedError(
                        f"the {self.what} {str(self.record)!r} is being written by another writer ({holder}); a "
                        f"{self.what} has one writer: wait for that run to finish (or stop it), or write to another "
                        f"{self.what} path"
                    ) from None
                raise
            # The file may have been unlinked (released) between our open and our lock: retry on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            self._write_holder()
            return
        raise RecordLockedError(f"could not lock the {self.what} {str(self.record)!r}: its lock file {str(self.path)!r} "
                                "keeps changing")  # pragma: no cover

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        data = json.dumps(info).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:  # pragma: no cover - the lock holds without the description
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        if self._fd is None:
            return
        try:
            try:
                if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                    os.unlink(self.path)
            except OSError:
                pass
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "RecordLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __deepcopy__(self, memo):  # a lock is a resource of its holder, never copied
        return self

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.release()
        except Exception:
            pass


def _os_error(exc: OSError, message: str) -> OSError:
    """An OSError of the same type and errno whose text is ``message`` alone (no "[Errno N]" prefix)."""
    err = type(exc)(message)
    err.errno = exc.errno  # (strerror left unset, so that str(err) is the message)
    return err


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "holder unknown"
    return f"process {info['pid']} on host {info.get('host', '?')}, since {info.get('since', '?')}"
