"""Optional heavy dependencies, imported lazily with actionable errors."""

from __future__ import annotations

import functools
import types


@functools.cache
def require_open3d() -> types.ModuleType:
    """Import open3d, or raise ImportError that says which system library is missing and how to add it."""
    try:
        import open3d  # noqa: PLC0415 - heavy import kept out of module import time
    except OSError as err:  # the wheel loads shared libraries at import time
        if "libusb" in str(err):
            raise ImportError(
                "open3d cannot load libusb-1.0 (system library). Install it, e.g. on Debian/Ubuntu: "
                "`apt-get install libusb-1.0-0`, or re-run `bash scripts/setup.sh` as root. "
                f"Original error: {err}"
            ) from err
        raise ImportError(f"open3d failed to load a shared library: {err}") from err
    except ImportError as err:
        raise ImportError("open3d is not installed: `pip install open3d` (or re-run scripts/setup.sh).") from err
    return open3d
