"""Real unreadable inputs for tests: permission bits that bind even for root, broken links, loops, folders.

Run as root (as CI containers often are), ``chmod 000`` does not stop a read: root holds
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH. :func:`unreadable` therefore also clears those two capabilities
from the calling thread's *effective* set (keeping them permitted) and raises them again on exit, so the
kernel returns the same EACCES a normal user gets. Capabilities are per thread, so the code under test
must run in this thread (``workers=1``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_CAP_DAC = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities(update: int | None = None) -> int:
    """The effective capability bits 0..31 of this thread; with ``update``, set them first."""
    libc = ctypes.CDLL(None, use_errno=True)
    head, data = _Header(0x20080522, 0), (_Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(head), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    if update is not None:
        data[0].effective = update
        if libc.capset(ctypes.byref(head), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    return data[0].effective


@contextlib.contextmanager
def unreadable(*paths: Path) -> Iterator[None]:
    """``paths`` cannot be read (or listed) inside the block, also when the tests run as root."""
    modes = {p: p.stat().st_mode for p in paths}
    before = None
    if os.geteuid() == 0:
        try:
            before = _capabilities()
            _capabilities(before & ~_CAP_DAC)
        except (OSError, AttributeError) as err:
            pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE ({err}): permission bits would not bind")
    for p in paths:
        p.chmod(0)
    try:
        yield
    finally:
        if before is not None:
            _capabilities(before)
        for p, mode in modes.items():
            p.chmod(mode)


def make_unreadable_kind(path: Path, kind: str) -> None:
    """Turn the file ``path`` into an unreadable input of ``kind`` (not "permission", see :func:`unreadable`)."""
    path.unlink()
    if kind == "folder":
        path.mkdir()
    elif kind == "broken_link":
        path.symlink_to(path.with_name("nowhere.txt"))
    elif kind == "link_loop":
        path.symlink_to(path.name)
    else:
        raise ValueError(kind)
