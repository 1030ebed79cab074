"""An exclusive lock on a run directory while a process works in it.

A requeued job whose first copy is still alive, or a sweep launched twice, would otherwise have two
processes write the same checkpoint and results.json; the second one stops with a one-line error.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from dapt.errors import RunInUseError

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
LOCK_WAIT_SECONDS = 10.0  # how long a run waits for its folder's lock before refusing (see RunLock.acquire)


class RunLock:
    """An exclusive claim on a run directory for as long as one process works in it.

    ``flock`` on ``<run dir>/.run.lock``: the kernel drops the lock when its process ends, however it
    ends (SIGKILL, OOM kill, a node's job killed by the scheduler), so a requeued job can always
    take over an interrupted run, and a run that is still alive cannot be taken over. The file holds
    the owner's pid and host for the error message; it is never deleted (deleting a lock file races
    with a process about to lock it). Network file systems: Linux NFSv4 supports ``flock``; on a
    file system without locks, ``acquire`` warns and goes on unlocked rather than refusing to run; a
    file system whose locks are node-local (Lustre mounted with ``localflock``) protects only against
    a second copy on the same node. A process forked by the holder without exec (a dataloader
    worker) inherits the lock until it exits, hence ``acquire``'s short wait.
    Only global rank 0 of a data-parallel job takes it (its ranks share the folder).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock, as written by its holder ("pid N on host H since T"), or "unknown"."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def held_by_another(self) -> bool:
        """Whether a live process holds the lock now (a probe: nothing is kept)."""
        import fcntl

        if not self.path.is_file():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
        return False

    def acquire(self, wait: float = 0.0) -> "RunLock":
        """Take the lock, retrying for ``wait`` seconds (a requeued job may start while processes
        forked by its predecessor, e.g. dataloader workers, still hold the inherited lock for a few
        seconds), else raise ``RunInUseError`` naming the holder."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                os.close(fd)
                raise RunInUseError(
                    f"run {self.path.parent} is in use by another process ({self.holder()}): wait for it to end, "
                    "or start a separate run with resume=never"
                ) from None
            except OSError as exc:  # no lock support on this file system
                log.warning("could not lock %s (%s); going on without protection against a second copy of this run", self.path, exc)
                break
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
