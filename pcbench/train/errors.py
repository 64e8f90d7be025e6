"""The trainer's error types: each message is one line naming the file or key and the fix."""

from __future__ import annotations

__all__ = ["ConfigError", "DivergedError", "RunFileError"]


class ConfigError(ValueError):
    """A configuration problem found before the first step; the message names the key and the fix."""


class RunFileError(ConfigError):
    """A file the run reads or writes is unusable (damaged checkpoint, full disk, bad prepared sample).

    A ConfigError so that every entry point reports it the same way: one line, exit status 2.
    """


class DivergedError(FloatingPointError):
    """The run diverged (non-finite weights, too many skipped steps): it failed and records no result."""
