"""Speed benchmark of every pcbench.ops op against its peers, in one run.

Usage: ``pcbench-bench-ops [--quick] [--only knn,fps] [--out bench_out/ops]``. Writes ``ops.json`` and
``ops.md`` (median of repeats after warm-up, ratio to the fastest peer) and prints the table.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from benchmarks.harness import Case, markdown_table, reexec_with_tuned_malloc, run_cases

# One module per op family, each exposing ``cases(quick: bool) -> list[Case]``.
CASE_MODULES = ("benchmarks.bm_ops_knn", "benchmarks.bm_ops_fps", "benchmarks.bm_ops_serialize",
                "benchmarks.bm_ops_sparse")


def collect(quick: bool, only: set[str] | None) -> list[Case]:
    """Cases of every op module (``only`` filters by op name)."""
    cases: list[Case] = []
    for name in CASE_MODULES:
        module = importlib.import_module(name)
        cases += [c for c in module.cases(quick) if only is None or c.op in only]
    return cases


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pcbench-bench-ops``."""
    p = argparse.ArgumentParser(prog="pcbench-bench-ops", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small inputs only (about a minute on 2 cores)")
    p.add_argument("--only", default="", help="comma-separated op names to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("bench_out/ops"), help="folder for ops.json / ops.md")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per entry (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="glibc allocator setting for this process (peers run under the same one)")
    args = p.parse_args(argv)
    reexec_with_tuned_malloc("benchmarks.bm_ops", args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    cases = collect(args.quick, only)
    rows = run_cases(cases, out_dir=args.out, repeats=args.repeats, warmup=args.warmup, title="ops")
    print()
    print(markdown_table(rows, "ops"))
    print(f"written: {args.out / 'ops.json'} and {args.out / 'ops.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
