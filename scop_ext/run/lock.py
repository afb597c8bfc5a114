"""One live run per output folder.

Two runs writing into one ``--out`` corrupt each other (one's start-up clean-up deletes the
other's temporary files; the folder ends with one run's config beside the other's results). A
run therefore holds an exclusive ``flock`` on ``<folder>/.scop-lock`` for as long as it lives.
The kernel releases a flock when its holder dies, however it dies (SIGKILL, OOM killer, power
cut), so a killed run's lock is simply taken by the next one, and ``--resume`` works after a kill
with nothing to clean up by hand. The file holds the holder's pid, for the message that refuses a
second run; it is never deleted (deleting it would let two runs lock two different files).
"""

from __future__ import annotations

import fcntl
import os
import stat

__all__ = ["LOCK_NAME", "RunLockedError", "RunLock"]

LOCK_NAME = ".scop-lock"


class RunLockedError(ValueError):
    """The folder is held by another live run."""


class RunLock:
    """An exclusive lock on a run folder, held from :meth:`acquire` (or ``with``) to :meth:`release`.

    Args:
        folder: the run's output folder (created if missing).

    Raises (on acquire):
        RunLockedError: another live process holds the folder; the message names its pid.
        OSError: the folder cannot be created or the lock file written.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        fd = self._open(create=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.folder}: in use by another scop run (pid {holder}); wait for it to end, "
                                 "or give another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _open(self, create: bool) -> int:
        """The lock file, opened without following a link and checked to be a lock file this
        package could have written: a link, FIFO or device placed there, a hard link to another
        file, or a file with more than a pid in it is refused, never truncated."""
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o666)  # less the umask
        except OSError as exc:
            raise RunLockedError(f"{self.path}: cannot be used as the run lock ({exc.strerror}: a link or "
                                 "something else that is not a plain file is in its place); remove it") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > 64:
            os.close(fd)
            raise RunLockedError(f"{self.path}: is not a scop run lock (a plain file holding a pid, with no other "
                                 "name); it is left untouched: remove it or give another --out")
        return fd

    def holder(self) -> str | None:
        """The pid of the live run holding the folder, or None when no run holds it."""
        if not os.path.lexists(self.path):
            return None
        fd = self._open(create=False)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # closing drops a shared lock taken above
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a reader between here and the unlock sees "unknown", never a stale pid
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
