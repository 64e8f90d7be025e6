"""Aten ops and host-device synchronisations per training step and per inference forward, for every model config.

Usage: ``python -m benchmarks.bm_syncs [--only pointnet2_ssg_cls,ptv3_seg] [--dispatch cuda,cpu] [--out DIR]``.

On a GPU, each host sync stalls the CPU until the device queue drains and rules out CUDA-graph capture, and
each aten op is (at least) one kernel launch; both counts are properties of the code path, so they are
measured here on CPU tensors: under ``dispatch_as("cuda")`` the ops take the branches they take on a GPU.
A ``TorchDispatchMode`` sees every aten call of one steady-state step (after one untimed warm-up step) of
``zero_grad + forward + cross-entropy + backward`` (train mode) and of one ``no_grad`` forward (eval mode).

Counted as host syncs (each reads a device value on the host, or sizes an output from device data):
``_local_scalar_dense`` (``item()``, ``int(t)``, ``bool(t)``), ``nonzero``, indexing or ``index_put`` with a
boolean mask, ``masked_select``, ``unique*``, ``repeat_interleave`` without ``output_size``, ``bincount``
(its output length is the data's maximum), ``equal``, and ``Tensor.tolist()`` / ``.numpy()`` (a device-to-host
copy on a GPU; on CPU tensors no aten op sees them, so they are intercepted on the Python side).
Inputs: classifiers 16 object clouds x 1024 points, segmentation models 4 scan-like scenes x 8192 points
(``--tiny`` divides every channel width by 4 and keeps every layer, for the tests). Writes ``syncs.json`` and
``syncs.md`` under ``--out`` atomically.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from pcbench.io import write_text
from pcbench.models import build_model, model_task
from pcbench.ops import PointBatch, dispatch_as
from pcbench.testing.clouds import object_batch, scan_like_scene

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "model"
OBJECTS = (16, 1024)
SCENES = (4, 8192)
# Targets of issue 18 under the GPU dispatch (host syncs per training step).
BUDGET = {"cls": 8, "seg": 32}

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique", "_unique2",
             "unique_dim", "unique_dim_consecutive", "bincount", "equal"}
_MASKABLE = {"index", "index_put", "index_put_", "_index_put_impl_"}
# Channel-width keys of the model configs, divided by 4 under --tiny; layer counts, groups and heads stay (the
# configs' group / head counts divide the quartered widths).
_WIDTH_KEYS = ("widths", "global_widths", "fp_widths", "head_hidden", "planes", "init_dim", "embed_channels",
               "fuse_channels", "channels", "patch_embed_channels", "enc_channels", "dec_channels",
               "cls_head_channels", "base_channels")
TINY_FACTOR = 4


def sync_kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The host-sync name of one aten call, or None when the call runs without reading device data."""
    name = func._overloadpacket.__name__
    if name in _SYNC_OPS:
        return name
    if name == "repeat_interleave":
        return "repeat_interleave (no output_size)" if _ri_needs_size(args, kwargs) else None
    if name in _MASKABLE and len(args) > 1 and isinstance(args[1], (list, tuple)):
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            return f"{name} (bool mask)"
    return None


def _ri_needs_size(args: tuple, kwargs: dict) -> bool:
    # repeat_interleave(tensor_repeats) and repeat_interleave(self, tensor_repeats) size their output from data.
    repeats = args[1] if len(args) > 1 else args[0]
    return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None


def _call_site() -> str:
    """``file:line`` of the innermost pcbench frame that caused the current call (for the sources column)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = frame.filename
        if "/pcbench/" in f and "_python_dispatch" not in f:
            return f"{f[f.rindex('/pcbench/') + 1:]}:{frame.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts aten calls and host syncs (by kind and by call site) of everything run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()

    def note(self, kind: str) -> None:
        """Record one host sync of ``kind`` at the current call site."""
        self.syncs[kind] += 1
        self.sites[_call_site()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        self.ops += 1
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.note(kind)
        return func(*args, **kwargs)

    @property
    def total_syncs(self) -> int:
        """All host syncs counted."""
        return sum(self.syncs.values())


@contextmanager
def counting() -> Iterator[SyncCounter]:
    """A SyncCounter that also sees ``Tensor.tolist()`` / ``.numpy()`` (host copies no aten op reports on CPU)."""
    counter = SyncCounter()
    patched = {}
    for meth in ("tolist", "numpy"):
        real = getattr(torch.Tensor, meth)
        patched[meth] = real

        def wrapper(self: torch.Tensor, *a: Any, _real: Callable = real, _m: str = meth, **kw: Any) -> Any:
            counter.note(_m)
            return _real(self, *a, **kw)

        setattr(torch.Tensor, meth, wrapper)
    try:
        with counter:
            yield counter
    finally:
        for meth, real in patched.items():
            setattr(torch.Tensor, meth, real)


def _shrink(cfg: DictConfig, factor: int) -> None:
    """Divide every channel width of a model config by ``factor`` (layer, group and head counts unchanged)."""
    def div(v: Any) -> Any:
        if isinstance(v, list):
            return [div(x) for x in v]
        return max(1, v // factor) if isinstance(v, int) and not isinstance(v, bool) else v
    for key in _WIDTH_KEYS:
        if key in cfg and cfg[key] is not None:
            cfg[key] = div(OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key])


def inputs(task: str, objects: tuple[int, int] = OBJECTS, scenes: tuple[int, int] = SCENES
           ) -> tuple[PointBatch, torch.Tensor, int]:
    """(batch, labels, classes): object clouds for classifiers, scan-like scenes for segmentation."""
    g = torch.Generator().manual_seed(0)
    if task == "cls":
        coord, offset = object_batch(*objects)
    else:
        b, n = scenes
        coord = torch.cat([scan_like_scene(n, seed=i) for i in range(b)])
        offset = torch.arange(1, b + 1) * n
    feat = torch.nn.functional.normalize(torch.randn(coord.shape[0], 3, generator=g), dim=1)
    batch = PointBatch(coord, feat, offset)
    classes = 40 if task == "cls" else 20
    rows = batch.num_clouds if task == "cls" else batch.num_points
    return batch, torch.randint(0, classes, (rows,), generator=g), classes


def measure(config: str, dispatch: str, tiny: bool = False, objects: tuple[int, int] = OBJECTS,
            scenes: tuple[int, int] = SCENES) -> dict[str, Any]:
    """One row: aten ops and host syncs of one training step and one inference forward of ``config``."""
    cfg = OmegaConf.load(CONF / f"{config}.yaml")
    task = model_task(cfg)
    if tiny:
        _shrink(cfg, TINY_FACTOR)
    batch, labels, classes = inputs(task, objects, scenes)
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, num_classes=classes)

    # Every call gets fresh tensors, as a training step gets a new batch: nothing remembered on the previous
    # batch's tensors (e.g. cloud sizes, ``ops.batch.length_bounds``) may save a host read here.
    def fresh() -> PointBatch:
        return PointBatch(batch.coord.clone(), batch.feat.clone(), batch.offset.clone())

    def train_step(b: PointBatch) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(b), labels).backward()

    def infer(b: PointBatch) -> None:
        model.eval()
        with torch.no_grad():
            model(b)

    row: dict[str, Any] = {"config": config, "task": task, "dispatch": dispatch, "tiny": tiny,
                           "points": batch.num_points, "clouds": batch.num_clouds,
                           "params": sum(p.numel() for p in model.parameters())}
    with dispatch_as(dispatch):
        for name, fn in (("train", train_step), ("infer", infer)):
            fn(fresh())  # warm-up: lazily built state is not a per-step cost
            b = fresh()  # built (and checked) outside the count, as the data pipeline does
            with counting() as c:
                fn(b)
            row[f"{name}_ops"] = c.ops
            row[f"{name}_syncs"] = c.total_syncs
            row[f"{name}_sync_kinds"] = dict(c.syncs.most_common())
            row[f"{name}_sync_sites"] = dict(c.sites.most_common(12))
    return row


def markdown(rows: list[dict[str, Any]], title: str, objects: tuple[int, int] = OBJECTS,
             scenes: tuple[int, int] = SCENES) -> str:
    """Rows as a Markdown table with the budget check."""
    lines = [f"## {title}", "",
             "| config | dispatch | aten ops / train step | host syncs / train step | budget | "
             "aten ops / forward | host syncs / forward | main sync kinds (train) |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['dispatch']} | failed: {r['error']} | | | | | |")
            continue
        budget = BUDGET[r["task"]]
        ok = "ok" if r["train_syncs"] <= budget else "over"
        kinds = ", ".join(f"{k} {v}" for k, v in list(r["train_sync_kinds"].items())[:4])
        lines.append(f"| {r['config']} | {r['dispatch']} | {r['train_ops']:,} | {r['train_syncs']} | "
                     f"<= {budget}: {ok if r['dispatch'] == 'cuda' else '-'} | {r['infer_ops']:,} | "
                     f"{r['infer_syncs']} | {kinds} |")
    o, s = objects, scenes
    lines += ["", f"Classifiers: {o[0]} object clouds x {o[1]} points; segmentation: {s[0]} scan-like scenes x "
              f"{s[1]} points{' (channel widths / 4, every layer kept)' if rows and rows[0].get('tiny') else ''}. "
              "One steady-state step after a warm-up; train = zero_grad + forward + cross-entropy + backward; "
              "dispatch cuda = the ops' GPU branches on CPU tensors (`pcbench.ops.dispatch_as`). "
              f"torch {torch.__version__}, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: count every (config, dispatch) and write syncs.json / syncs.md."""
    p = argparse.ArgumentParser(prog="bm_syncs", description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated config names (default: every *_cls / *_seg)")
    p.add_argument("--dispatch", default="cuda,cpu", help="comma-separated: cuda (GPU branches), cpu")
    p.add_argument("--tiny", action="store_true", help="channel widths / 4, every layer kept (fast)")
    p.add_argument("--objects", default=f"{OBJECTS[0]}x{OBJECTS[1]}", help="classifier input: clouds x points")
    p.add_argument("--scenes", default=f"{SCENES[0]}x{SCENES[1]}", help="segmentation input: scenes x points")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("bench_out/syncs"), help="folder for syncs.json / syncs.md")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    configs = [c.stem for c in sorted(CONF.glob("*.yaml")) if c.stem.endswith(("_cls", "_seg"))]
    only = [s.strip() for s in ns.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(configs))
    if unknown:
        print(f"bm_syncs: --only names unknown configs {unknown}; known: {configs}", file=sys.stderr)
        return 2
    try:
        objects, scenes = (tuple(int(v) for v in s.split("x", 1)) for s in (ns.objects, ns.scenes))
    except ValueError:
        print(f"bm_syncs: --objects / --scenes take BxN (e.g. 16x1024), got {ns.objects!r} / {ns.scenes!r}",
              file=sys.stderr)
        return 2
    dispatches = [d.strip() for d in ns.dispatch.split(",") if d.strip()]
    bad = [d for d in dispatches if d not in ("cuda", "cpu")]
    if bad:
        print(f"bm_syncs: --dispatch takes cuda and/or cpu, got {bad}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    ns.out.mkdir(parents=True, exist_ok=True)
    for config in only or configs:
        for d in dispatches:
            try:
                row = measure(config, d, tiny=ns.tiny, objects=objects, scenes=scenes)
            except Exception as err:  # noqa: BLE001 - one failing model is a row, not a lost table
                row = {"config": config, "dispatch": d, "error": f"{type(err).__name__}: {err}"[:300]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("sites")}), flush=True)
            record = {"title": "syncs", "objects": objects, "scenes": scenes, "torch": torch.__version__,
                      "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
            write_text(ns.out / "syncs.json", json.dumps(record, indent=2))
            write_text(ns.out / "syncs.md", markdown(rows, "host syncs per step", objects, scenes))
    print(markdown(rows, "host syncs per step", objects, scenes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
