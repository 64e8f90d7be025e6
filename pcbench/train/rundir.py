"""Ownership of a run directory: one live run holds ``<run dir>/.lock``; leftovers of a killed run are removed.

The lock is an exclusive ``fcntl.flock`` on a file that records the owner's pid and host. The kernel drops a
flock when its process dies, so a lock left by a killed run is simply taken again; the file's old contents
say whose it was, for the log.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from pcbench.io import TEMP_PREFIX

from .errors import ConfigError

__all__ = ["LOCK_NAME", "hold_run_dir", "remove_leftover_temps"]

LOCK_NAME = ".lock"


def _owner(text: str) -> tuple[int | None, str]:
    """(pid, host) from a lock file's ``pid=N host=H`` line."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    try:
        pid = int(fields.get("pid", ""))
    except ValueError:
        pid = None
    return pid, fields.get("host", "?")


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[str | None]:
    """Hold ``run_dir`` exclusively for this process; yields a note when a dead run's lock was taken over.

    ConfigError naming the owner's pid and host when another live process holds it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid, host = _owner(os.pread(fd, 4096, 0).decode(errors="replace"))
            raise ConfigError(f"run dir {run_dir} is in use by another run (pid {pid} on host {host}, lock "
                              f"{path}); wait for it to finish, or choose another run directory "
                              "(hydra.run.dir=... / paths.run_dir=...)") from None
        # a run that ends (even by an exception) empties the file, so an owner named here died holding it
        old_pid, old_host = _owner(os.pread(fd, 4096, 0).decode(errors="replace"))
        note = None if old_pid is None else f"taking over the lock of pid {old_pid} on {old_host} (gone)"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        try:
            yield note
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def remove_leftover_temps(run_dir: Path) -> list[Path]:
    """Remove atomic-write temporaries (``.pcbench-tmp-*``) a killed run left in ``run_dir`` (call with the lock)."""
    removed = []
    for p in sorted(run_dir.rglob(f"{TEMP_PREFIX}*")):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
