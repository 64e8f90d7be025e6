"""``pcbench-prep``: turn raw official dataset files into prepared HDF5 shards + manifest.json.

Usage::

    pcbench-prep <dataset> raw=<raw folder> out=<output folder> [key=value ...] [--workers N]
    pcbench-prep <dataset> --check raw=<raw folder> [key=value ...]   # validate every input, writes nothing
    pcbench-prep <dataset> --verify out=<output folder> [raw=<raw>]  # re-hash outputs and inputs
    pcbench-prep <dataset> --help                                     # every option of that dataset
    pcbench-prep <dataset> raw=synthetic out=<folder>                 # generated quickstart data

Exit status: 0 success, 1 some samples failed (the others are written), 2 unusable arguments or inputs,
130 interrupted (Ctrl-C; finished units are kept, the same command resumes).
Each preparer module follows the contract in :mod:`data_prep.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .common import PrepError, parse_options, read_manifest, verify_inputs, verify_outputs

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
    # 32 objects per class (24 train, 8 test): enough for the quickstart's scores to separate models (40 test
    # objects) while the whole suite stays a few CPU minutes
    synthetic_objects.write_modelnet_normal_resampled(root, train=24, test=8)
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
              "  --check      validate raw= as preparation would (every sample is read and converted, with the same",
              "               options, e.g. allow_missing); list every problem; writes nothing",
              "  --verify     re-hash every output of out= and every input (in raw=, default: the raw folder recorded",
              "               in manifest.json) against manifest.json: catches shards changed after preparation and",
              "               inputs edited since, even with their modification time restored (preparation itself",
              "               re-hashes an input whenever its size, mtime, ctime or inode changed)",
              "", "exit status: 0 ok, 1 some samples failed (others written, see manifest.json), 2 bad arguments/inputs,",
              "             130 interrupted (finished units are kept; run the same command again to resume)"]
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


def _print(*args: Any, **kwargs: Any) -> None:
    """print() that survives a closed pipe (``pcbench-prep ... | head``): the rest of the output is dropped."""
    try:
        print(*args, **kwargs, flush=True)  # a closed pipe shows here, not in the interpreter's final flush
    except BrokenPipeError:
        # the reader is gone; point stdout at /dev/null so that the interpreter's final flush cannot fail again
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())


def _verify(out: str, raw: str | None) -> int:
    manifest = read_manifest(out)
    problems = verify_outputs(out, manifest)
    raw_dir = raw or manifest.get("raw")
    checked_inputs = bool(raw_dir) and Path(raw_dir).expanduser().is_dir()
    if checked_inputs:
        problems += verify_inputs(Path(raw_dir).expanduser(), manifest, out)
    for p in problems:
        _print(p)
    what = "every output" + (f" and every input (in {raw_dir})" if checked_inputs else "")
    _print(f"{out}: {f'OK, {what} matches manifest.json' if not problems else f'{len(problems)} problems'}")
    if not checked_inputs:
        _print(f"{out}: inputs not checked: raw folder {raw_dir or '(not recorded)'} not found; give raw=<folder>")
    return 1 if problems else 0


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
            _print(dataset_help(args.dataset))
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
            return _verify(out, raw)
        if raw is None:
            raise PrepError("raw=<folder with the official files> is required", None, "raw",
                            f"see `pcbench-prep {args.dataset} --help`")
        if raw == "synthetic":  # the embedded quickstart data: small, generated, in the official layout
            if out is None:
                raise PrepError("raw=synthetic needs out=<folder>", None, "out", "add out=<folder>")
            raw_path = _synthetic_raw(args.dataset, Path(out).expanduser() / "synthetic_raw")
            _print(f"wrote synthetic {args.dataset} raw files to {raw_path}")
        else:
            raw_path = Path(raw).expanduser()
        workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
        if workers < 1:
            raise PrepError(f"--workers must be >= 1, got {workers}", None, "--workers", "use --workers 1 or more")
        if args.check:
            problems = mod.check(raw_path, options, workers=workers)
            for p in problems:
                _print(p)
            _print(f"{raw_path}: " + ("ready to prepare" if not problems else f"{len(problems)} problems found"))
            return 1 if problems else 0
        if out is None:
            raise PrepError("out=<output folder> is required", None, "out", "add out=<folder for the prepared files>")
        report = mod.prepare(raw_path, Path(out).expanduser(), options, workers)
        _print(report.summary())
        return 0 if report.ok else 1
    except PrepError as err:
        _eprint(f"pcbench-prep: error: {err}")
        return 2
    except KeyboardInterrupt:
        _eprint("pcbench-prep: interrupted: finished units are kept; run the same command again to resume")
        return 130
    except (OSError, json.JSONDecodeError) as err:  # an input or output problem no reader above named
        where = getattr(err, "filename", None)
        _eprint(f"pcbench-prep: error: {where + ': ' if where else ''}{getattr(err, 'strerror', None) or err}. "
                "Fix: check that path and its permissions")
        return 2


def _eprint(line: str) -> None:
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
