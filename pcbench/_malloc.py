"""glibc allocator tuning: the one copy of the settings the CLI, the trainer and the benchmarks use.

With glibc's defaults every large temporary tensor is mmap'd and unmapped per call and freed heap
memory is trimmed back to the kernel, so CPU point-cloud training spends 40-50% of its time in page
faults on fresh pages (measured; see the performance notes of the design document and
``benchmarks/bm_train.py``). Two ways to switch that off:

* :data:`TUNED_MALLOC` in the environment of a new process (glibc reads the variables at start-up only):
  :func:`reexec_with_tuned_malloc` for a command line.
* :func:`apply_mallopt` in a running process (``mallopt(3)``): same effect for allocations made afterwards,
  usable by an in-process caller of ``pcbench.train.fit`` and inherited by forked DataLoader workers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

__all__ = ["TUNED_MALLOC", "apply_mallopt", "malloc_setting", "reexec_with_tuned_malloc", "tuned_env_active"]

# Large temporaries otherwise go through mmap/munmap on every call; see DESIGN.md performance notes.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}

# mallopt(3) parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps M_MMAP_THRESHOLD set through mallopt at HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit systems
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)

_applied: list[str] = []  # what apply_mallopt did in this process (glibc state is process-wide anyway)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt  # noqa: B018 - musl has no mallopt: probe it here
        lib.gnu_get_libc_version.restype = ctypes.c_char_p
        return lib
    except (OSError, AttributeError):
        return None


def tuned_env_active() -> bool:
    """True when this process started with :data:`TUNED_MALLOC` in its environment."""
    return all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items())


def apply_mallopt() -> bool:
    """Raise glibc's trim threshold and pin its mmap threshold at the maximum (no-op elsewhere); True if applied.

    Pinning any threshold also stops glibc's dynamic mmap-threshold adjustment, as the environment variables do.
    """
    lib = _libc()
    if lib is None:
        return False
    ok_trim = lib.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    ok_mmap = lib.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD_MAX))
    if ok_trim and ok_mmap:
        _applied.append("mallopt")
        return True
    return False


def malloc_setting() -> str:
    """How this process's allocator is tuned: "env", "mallopt", "env+mallopt" or "default" (recorded with results)."""
    parts = (["env"] if tuned_env_active() else []) + (["mallopt"] if _applied else [])
    return "+".join(parts) or "default"


def reexec_with_tuned_malloc(argv: list[str]) -> None:
    """Replace this process by ``argv`` run with TUNED_MALLOC set, unless it is set already or this is not glibc."""
    if tuned_env_active() or _libc() is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **TUNED_MALLOC})
