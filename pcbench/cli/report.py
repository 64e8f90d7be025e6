"""``pcbench-report results=<store> out=<dir> [ops=<ops.json>]``: write the leaderboard (Markdown, CSV, HTML)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pcbench.bench.report import write_report
from pcbench.bench.store import DEFAULT_RESULTS, ResultStore
from pcbench.cli._kv import UsageError, fail, parse_kv

PROG = "pcbench-report"
USAGE = f"""usage: {PROG} [results=<store.sqlite>] [out=<dir>] [ops=<ops.json>] [title=<text>]

Build the leaderboard from a pcbench results store: leaderboard.md, leaderboard.csv and leaderboard.html
(one static page, opens offline) in <dir>. Models are ranked per dataset and protocol by the headline metric
(mean ± std over seeds), with efficiency columns, published figures and per-run provenance."""
KEYS = {
    "results": f"the results store written by pcbench-bench (default {DEFAULT_RESULTS})",
    "out": "folder for the three files (default: <results folder>/report)",
    "ops": "optional ops.json from pcbench-bench-ops --out <dir>, shown as the ops micro-benchmark table",
    "title": "page title (default: pcbench leaderboard)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcbench-report``."""
    try:
        args, words = parse_kv(sys.argv[1:] if argv is None else argv, KEYS, USAGE)
        if words:
            raise UsageError(f"unexpected argument(s) {words}; use key=value, e.g. results=outputs/results.sqlite")
        results = Path(args.get("results", DEFAULT_RESULTS))
        out = Path(args.get("out", results.parent / "report"))
        with ResultStore.open_readonly(results) as store:  # a report never changes the store it reads
            records = store.records()
        paths = write_report(records, out, ops=args.get("ops"), title=args.get("title", "pcbench leaderboard"),
                             source=str(results))
    except ValueError as err:
        return fail(PROG, str(err))
    print(f"{len(records)} records from {results}")
    for kind in ("md", "csv", "html"):
        print(f"written: {paths[kind]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
