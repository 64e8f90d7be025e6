"""The trainer's configuration error type."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem found before the first step; the message names the key and the fix."""
