"""``pcbench-results export|import|list``: move results between stores as JSON lines, or list a store."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pcbench.bench.record import STATUSES
from pcbench.bench.store import DEFAULT_RESULTS, ResultStore, read_jsonl_numbered
from pcbench.cli._kv import UsageError, fail, parse_kv

PROG = "pcbench-results"
USAGE = f"""usage: {PROG} export [results=<store.sqlite>] out=<file.jsonl> [status=finished]
       {PROG} import [results=<store.sqlite>] FILE.jsonl [FILE.jsonl ...]
       {PROG} list   [results=<store.sqlite>] [status=...]
       {PROG} release results=<store.sqlite> HASH [HASH ...]

export writes every record of a store (or those with one status) as JSON lines; import merges such files into
a store (created if absent) by result id, so results from several machines or cluster jobs end in one store:
importing the same result twice keeps one row, a running row is replaced by its finished version (an older
running copy of a stored result is ignored), and a different result under the same id is kept as stored and
reported as a conflict (file:line and the fields that differ; exit status 1). Every line is checked before
anything is written. export and list open the store read-only; list also shows the cells claimed by a runner.
release frees cells claimed by a runner that is gone (give 8+ characters of each config hash): pcbench-bench
takes over a dead claim of its own host by itself, but cannot check a process on another host."""
KEYS = {
    "results": f"the results store (default {DEFAULT_RESULTS})",
    "out": "export: the .jsonl file to write (atomically)",
    "status": f"export/list: only records with this status ({', '.join(STATUSES)})",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcbench-results``."""
    try:
        args, words = parse_kv(sys.argv[1:] if argv is None else argv, KEYS, USAGE)
        if not words or words[0] not in ("export", "import", "list", "release"):
            raise UsageError(f"first word must be export, import or list (or release, to free a claimed cell), got "
                             f"{words[:1] or 'nothing'} (see --help)")
        cmd, files = words[0], words[1:]
        status = args.get("status")
        if status is not None and status not in STATUSES:
            raise UsageError(f"status={status}; use one of {', '.join(STATUSES)}")
        results = Path(args.get("results", DEFAULT_RESULTS))
        if cmd == "import":
            if not files:
                raise UsageError("import needs at least one FILE.jsonl written by pcbench-results export")
            batches = [(f, read_jsonl_numbered(f)) for f in files]  # read and check all files before writing
            conflicts = 0
            with ResultStore(results) as store:
                for f, numbered in batches:
                    s = store.import_records([rec for _, rec in numbered])
                    print(f"{f}: {len(numbered)} records: {s['added']} added, {s['updated']} updated, "
                          f"{s['unchanged']} already present, {s['stale']} older copies ignored, {s['conflicts']} "
                          "conflicts (kept as stored)")
                    line_of = {rec["result_id"]: n for n, rec in numbered}
                    for rid, fields in s.conflicting:
                        print(f"{PROG}: conflict: {f}:{line_of[rid]}: result {rid} differs from the stored record in "
                              f"{', '.join(fields)}; the stored one was kept", file=sys.stderr)
                    conflicts += s["conflicts"]
                print(f"{results}: {len(store)} records")
            if conflicts:
                print(f"{PROG}: {conflicts} conflicting record(s) not imported (same result id, different content); "
                      "compare them with pcbench-results export", file=sys.stderr)
                return 1
            return 0
        if cmd == "release":
            if not files:
                raise UsageError("release needs the config hash (8+ characters) of each cell to free")
            with ResultStore(results, create=False) as store:
                for prefix in files:
                    dropped = store.drop_claims(prefix)
                    for c in dropped:
                        print(f"released {c['config_sha256'][:12]}: claimed by pid {c['pid']} on host "
                              f"{c['hostname']} since {c['claimed_at']}")
                    if not dropped:
                        print(f"{prefix}: no claim (nothing to release)")
            return 0
        if files:
            raise UsageError(f"{cmd} takes no file arguments, got {files}" + ("; use out=<file.jsonl>"
                                                                               if cmd == "export" else ""))
        with ResultStore.open_readonly(results) as store:
            if cmd == "export":
                if "out" not in args:
                    raise UsageError("export needs out=<file.jsonl>")
                n = store.export_jsonl(args["out"], status=status)
                print(f"written: {args['out']} ({n} records from {results})")
                return 0
            for r in store.records(status=status):
                print(f"{r['status']:<8} {r.get('suite') or '-':<12} {r['cell']:<48} {r['config_sha256'][:12]} "
                      f"{r.get('finished_at') or r.get('started_at') or '-'}")
            for c in store.claims():
                print(f"claimed  {c['config_sha256'][:12]} by pid {c['pid']} on host {c['hostname']} since "
                      f"{c['claimed_at']}")
    except ValueError as err:
        return fail(PROG, str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
