"""Hydra-style ``key=value`` arguments for the small pcbench commands that do not compose a Hydra config."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

__all__ = ["UsageError", "parse_kv"]


class UsageError(ValueError):
    """A command line that cannot be run; the message says what to type instead."""


def parse_kv(argv: Sequence[str], keys: Mapping[str, str], usage: str) -> tuple[dict[str, str], list[str]]:
    """Split ``argv`` into known ``key=value`` pairs and positional words; ``-h``/``--help`` prints the usage.

    ``keys`` maps each accepted key to its help line. Unknown keys and empty values raise UsageError.
    """
    if any(a in ("-h", "--help") for a in argv):
        width = max((len(k) for k in keys), default=0)
        print(usage.rstrip() + "\n\nkeys:\n" + "\n".join(f"  {k}=<...>{' ' * (width - len(k))}  {h}"
                                                         for k, h in keys.items()))
        raise SystemExit(0)
    values: dict[str, str] = {}
    words: list[str] = []
    for arg in argv:
        if "=" in arg and not arg.startswith("="):
            key, value = arg.split("=", 1)
            if key not in keys:
                raise UsageError(f"unknown key {key!r} in {arg!r}; accepted keys: {', '.join(keys)} (see --help)")
            if not value:
                raise UsageError(f"{key}= needs a value, e.g. {key}=<path>")
            values[key] = value
        else:
            words.append(arg)
    return values, words


def fail(prog: str, message: str) -> int:
    """Print ``prog: error: message`` to stderr; returns the exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
