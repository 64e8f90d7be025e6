"""``pcbench-weights list|fetch``: the registry of published checkpoints, downloaded and converted on demand."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pcbench.cli._kv import UsageError, fail, parse_kv

PROG = "pcbench-weights"
USAGE = f"""usage: {PROG} list
       {PROG} fetch NAME [file=<local copy>] [dir=<folder>]

list prints every published checkpoint pcbench knows: its model config, dataset, the authors' figure with its
protocol, licence and whether it converts. fetch downloads NAME (hash-checked by pooch when the sha256 is known),
converts it and prints the path of the pcbench checkpoint; file= converts a copy you already have (offline)."""
KEYS = {
    "file": "fetch: convert this local copy instead of downloading",
    "dir": "fetch: folder for downloads and converted checkpoints (default $PCBENCH_WEIGHTS or "
           "~/.cache/pcbench/weights)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcbench-weights``."""
    from pcbench.models.zoo_registry import PUBLISHED, fetch_weights  # noqa: PLC0415

    try:
        args, words = parse_kv(sys.argv[1:] if argv is None else argv, KEYS, USAGE)
        if words == ["list"]:
            if args:
                raise UsageError(f"list takes no keys, got {sorted(args)}")
            for w in PUBLISHED.values():
                status = "converts" if w.convertible else "listed only (no converter yet)"
                print(f"{w.name}\n  model {w.model_config} on {w.dataset}; {w.metric} {w.value} ({w.protocol})\n"
                      f"  source: {w.reference}\n  url: {w.url}\n  sha256: {w.sha256 or 'unknown'}; licence: "
                      f"{w.licence}; {status}")
            return 0
        if len(words) != 2 or words[0] != "fetch":
            raise UsageError(f"expected `list` or `fetch NAME`, got {words or 'nothing'} (see --help)")
        path = fetch_weights(words[1], file=args.get("file"), folder=args.get("dir"))
    except (UsageError, ValueError) as err:
        return fail(PROG, str(err))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
