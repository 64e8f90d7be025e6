"""``pcbench-prep``: turn raw official dataset files into prepared HDF5 shards + manifest.json.

Usage::

    pcbench-prep <dataset> raw=<raw folder> out=<output folder> [key=value ...] [--workers N]
    pcbench-prep <dataset> --check raw=<raw folder> [key=value ...]   # inspect only, writes nothing
    pcbench-prep <dataset> --verify out=<output folder>              # re-hash a prepared folder
    pcbench-prep <dataset> --help                                     # every option of that dataset
    pcbench-prep <dataset> raw=synthetic out=<folder>                 # generated quickstart data

Exit status: 0 success, 1 some samples failed (the others are written), 2 unusable arguments or inputs.
Each preparer module follows the contract in :mod:`data_prep.common`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .common import PrepError, parse_options, read_manifest, verify_outputs

#: dataset name -> (preparer module, options fixed by the dataset name and hidden from --help)
DATASETS: dict[str, tuple[str, dict[str, Any]]] = {
    "scannet": ("data_prep.scannet", {}),
    "scanobjectnn": ("data_prep.scanobjectnn", {}),
    "modelnet40": ("data_prep.modelnet", {"num_classes": 40}),
    "modelnet10": ("data_prep.modelnet", {"num_classes": 10}),
}


def _synthetic_raw(dataset: str, root: Path) -> Path:
    """Write the embedded synthetic raw files of ``dataset`` under ``root`` (official layout); returns raw=."""
    if dataset == "scannet":
        from . import synthetic_scannet  # noqa: PLC0415

        synthetic_scannet.generate(root)
        return root
    from . import synthetic_objects  # noqa: PLC0415

    if dataset == "scanobjectnn":
        synthetic_objects.write_scanobjectnn(root, train=8, test=2)
        return root
    synthetic_objects.write_modelnet_normal_resampled(root, train=8, test=2)
    return root


def load_preparer(dataset: str) -> tuple[ModuleType, dict[str, Any]]:
    """The preparer module of ``dataset`` and its fixed options; PrepError for unknown names."""
    if dataset not in DATASETS:
        raise PrepError(f"unknown dataset {dataset!r}", None, "dataset", f"use one of {', '.join(DATASETS)}")
    mod_name, fixed = DATASETS[dataset]
    return importlib.import_module(mod_name), dict(fixed)


def dataset_help(dataset: str) -> str:
    """The ``pcbench-prep <dataset> --help`` text: accepted raw layouts and every option."""
    mod, fixed = load_preparer(dataset)
    lines = [f"usage: pcbench-prep {dataset} raw=<raw folder> out=<output folder> [key=value ...] "
             "[--workers N] [--check] [--verify]",
             "       raw=synthetic writes small generated raw files in the official layout to "
             "<out>/synthetic_raw first (quickstart, tests)", ""]
    doc = (mod.__doc__ or "").strip()
    if doc:
        lines += [doc, ""]
    lines.append("options (key=value; booleans take true/false):")
    for key, opt in mod.OPTIONS.items():
        if key in fixed:
            continue
        kind = "true/false" if opt.type is bool else opt.type.__name__
        extra = f"; one of {', '.join(map(str, opt.choices))}" if opt.choices else ""
        lines.append(f"  {key}=<{kind}>  (default {opt.default!r}{extra})")
        lines += ["      " + t for t in textwrap.wrap(opt.help, 92)]
    lines += ["", "flags:",
              "  --workers N  processes for the conversion (default: all cores); 1 = in-process, easiest to debug",
              "  --check      inspect raw= and list what is missing or malformed; writes nothing",
              "  --verify     re-hash every file of out= against its manifest.json",
              "", "exit status: 0 ok, 1 some samples failed (others written, see manifest.json), 2 bad arguments/inputs"]
    return "\n".join(lines)


def _split_kv(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        if "=" not in p:
            raise PrepError(f"argument {p!r} is not key=value", None, None,
                            "write options as key=value, e.g. raw=/data/ModelNet40 out=/data/prepared/mn40")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcbench-prep``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="pcbench-prep", add_help=False,
        description="Prepare a point-cloud dataset from its raw official files.",
        epilog=f"datasets: {', '.join(DATASETS)}. `pcbench-prep <dataset> --help` lists a dataset's options.")
    parser.add_argument("dataset", nargs="?")
    parser.add_argument("pairs", nargs="*")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.dataset is None:
            parser.print_help()
            return 0 if args.help else 2
        if args.help:
            print(dataset_help(args.dataset))
            return 0
        mod, fixed = load_preparer(args.dataset)
        kv = _split_kv(args.pairs)
        raw = kv.pop("raw", None)
        out = kv.pop("out", None)
        for key in fixed:
            if key in kv:
                raise PrepError(f"option {key} is fixed by the dataset name {args.dataset!r}", None, key,
                                "drop it or choose the other dataset name")
        options = parse_options(mod.OPTIONS, {**kv, **fixed}, args.dataset)
        if args.verify:
            if out is None:
                raise PrepError("--verify needs out=<prepared folder>", None, "out", "add out=...")
            problems = verify_outputs(out, read_manifest(out))
            for p in problems:
                print(p)
            print(f"{out}: {'OK, every output matches manifest.json' if not problems else f'{len(problems)} problems'}")
            return 1 if problems else 0
        if raw is None:
            raise PrepError("raw=<folder with the official files> is required", None, "raw",
                            f"see `pcbench-prep {args.dataset} --help`")
        if raw == "synthetic":  # the embedded quickstart data: small, generated, in the official layout
            if out is None:
                raise PrepError("raw=synthetic needs out=<folder>", None, "out", "add out=<folder>")
            raw_path = _synthetic_raw(args.dataset, Path(out).expanduser() / "synthetic_raw")
            print(f"wrote synthetic {args.dataset} raw files to {raw_path}")
        else:
            raw_path = Path(raw).expanduser()
        if args.check:
            problems = mod.check(raw_path, options)
            for p in problems:
                print(p)
            print(f"{raw_path}: " + ("ready to prepare" if not problems else f"{len(problems)} problems found"))
            return 1 if problems else 0
        if out is None:
            raise PrepError("out=<output folder> is required", None, "out", "add out=<folder for the prepared files>")
        workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
        if workers < 1:
            raise PrepError(f"--workers must be >= 1, got {workers}", None, "--workers", "use --workers 1 or more")
        report = mod.prepare(raw_path, Path(out).expanduser(), options, workers)
        print(report.summary())
        return 0 if report.ok else 1
    except PrepError as err:
        print(f"pcbench-prep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
