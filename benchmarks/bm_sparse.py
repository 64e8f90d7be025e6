"""Sparse convolution benchmark on the real ScanNet sample scene (scene0000_00, 81k points) at 2 and 5 cm.

Times (median of repeats after warm-up) and peak memory of
  * kernel-map construction (``pcbench.ops.kernel_map``, also part of ``bm_ops``), and all maps one
    MinkUNet forward needs;
  * one sparse convolution layer (32 -> 32 channels, k=3 submanifold and k=2 stride 2), forward and
    forward + backward, against ``torch.nn.functional.conv3d`` on the dense grid of the same scene where
    that grid fits in ``--dense-limit-gib`` per activation (ratio = sparse time / dense time), and for the
    submanifold layer against the gathered-GEMM method (implicit im2col: one GEMM over a [V, K * C_in]
    block of gathered neighbourhoods, zeros where a neighbour is missing, forward and backward without
    scatter-adds), the alternative to the per-offset gather -> matmul -> scatter-add of
    ``pcbench.models.sparse``;
  * whole backbones (MinkUNet14A, MinkUNet34C, SpUNet-base): eval forward and training forward + backward.

Peak memory is the growth of the process's peak RSS during one call, measured in a fresh child process
per entry (the allocator setting is inherited). Usage:
``python -m benchmarks.bm_sparse [--quick] [--threads 1] [--out bench_out/sparse]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from benchmarks.harness import Case, Entry, markdown_table, reexec_with_tuned_malloc, run_cases
from pcbench.io import write_text
from pcbench.models import build_model
from pcbench.models.sparse import CoordinateCache, SparseConv3d, SparseTensor, sparse_conv
from pcbench.ops import PointBatch, voxelize
from pcbench.testing.clouds import load_scannet_scene, shared_data_dir

SCENE = "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply"
CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
# benchmark name -> model config (built as the trainer builds it, with this run's voxel size)
BACKBONES: dict[str, str] = {
    "MinkUNet14A": "minkunet14a_seg", "MinkUNet34C": "minkunet34c_seg", "SpUNet-base": "spunet_base_seg",
}


def build_backbone(name: str, in_channels: int, num_classes: int, voxel_size: float) -> torch.nn.Module:
    """The ``BACKBONES[name]`` config built with ``build_model`` at ``voxel_size``."""
    cfg = OmegaConf.load(CONF_MODEL / f"{BACKBONES[name]}.yaml")
    cfg.voxel_size = voxel_size
    return build_model(cfg, in_channels=in_channels, num_classes=num_classes)


def _scene() -> PointBatch:
    data = shared_data_dir()
    if data is None or not (data / SCENE).is_file():
        raise SystemExit(f"the real sample scene {SCENE} was not found (set PCBENCH_SHARED_DATA)")
    coord, color = load_scannet_scene(data / SCENE)
    return PointBatch(coord, color.float() / 255.0, torch.tensor([coord.shape[0]]))


# --- one layer: sparse vs dense -----------------------------------------------------------------------

def _layer_inputs(batch: PointBatch, vs: float, channels: int) -> tuple[SparseTensor, torch.Tensor, list[int]]:
    vox = voxelize(batch.coord, vs)[0]
    vox[:, 1:] -= vox[:, 1:].min(0).values  # dense grid starts at 0
    feats = torch.randn(vox.shape[0], channels, generator=torch.Generator().manual_seed(0))
    shape = (vox[:, 1:].max(0).values + 1).tolist()
    return SparseTensor(vox, feats), vox, shape


def _dense_from(vox: torch.Tensor, feats: torch.Tensor, shape: list[int]) -> torch.Tensor:
    dense = feats.new_zeros(1, *shape, feats.shape[1])
    dense[0, vox[:, 1], vox[:, 2], vox[:, 3]] = feats
    return dense.permute(0, 4, 1, 2, 3).contiguous()


def _layer_fns(batch: PointBatch, vs: float, k: int, stride: int, train: bool, dense_limit: float,
               channels: int = 32) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    x, vox, shape = _layer_inputs(batch, vs, channels)
    conv = SparseConv3d(channels, channels, k, stride=stride)
    x.cache.kernel_map(1, stride, k, 1)  # kernel map built once, outside the timing (cached per level)
    if stride > 1:
        x.cache.coarser(1, stride)
    if train:
        x.feats.requires_grad_(True)

    def sparse() -> object:
        y = conv(x)
        if train:
            y.feats.sum().backward()
        return y

    fns: dict[str, Callable[[], object]] = {"pcbench sparse": sparse}
    notes = {"pcbench sparse": f"V={x.num_voxels}"}
    if (k, stride) == (3, 1):
        table = _neighbour_table(x.cache.kernel_map(1, 1, k, 1), x.num_voxels)  # built once, like the map

        def gathered() -> object:
            y = _GatheredGemm.apply(x.feats, conv.weight, table)
            if train:
                y.sum().backward()
            return y

        fns["gathered GEMM"] = gathered
        notes["gathered GEMM"] = f"{float((table < x.num_voxels).float().mean()):.0%} of the K*V table occupied"
    if train:
        def plain() -> object:  # same ops through plain autograd (stores every gathered input)
            y = sparse_conv(x.feats, conv.weight, x.cache.kernel_map(1, stride, k, 1),
                            x.cache.level(stride).shape[0], identity_center=13 if (k, stride) == (3, 1) else None,
                            recompute=False)
            y.sum().backward()
            return y

        fns["pcbench plain autograd"] = plain
        notes["pcbench plain autograd"] = "recompute=False"
    cells = math.prod(shape)
    gib = cells * channels * 4 / 2**30
    if gib <= dense_limit:
        dense_x = _dense_from(vox, x.feats.detach(), shape).requires_grad_(train)
        w = conv.weight.detach().reshape(k, k, k, channels, channels).permute(4, 3, 0, 1, 2).contiguous()
        w.requires_grad_(train)
        pad = k // 2 if k % 2 else 0

        def dense() -> object:
            y = F.conv3d(dense_x, w, stride=stride, padding=pad)
            if train:
                y.sum().backward()
            return y

        fns["dense conv3d"] = dense
        notes["dense conv3d"] = f"grid {'x'.join(map(str, shape))} = {cells / 1e6:.1f}M cells"
    else:
        reason = f"not run: dense grid {'x'.join(map(str, shape))} needs {gib:.1f} GiB per activation > {dense_limit} GiB"

        def too_big() -> object:
            raise MemoryError(reason)

        fns["dense conv3d"] = too_big
        notes["dense conv3d"] = reason
    return fns, notes


# --- the gathered-GEMM method, a peer for the submanifold layer ---------------------------------------

class _GatheredGemm(torch.autograd.Function):
    """Submanifold conv as gathered GEMMs both ways (the input gradient uses the flipped kernel: on one
    level, voxel i at offset d of voxel j means j at offset -d of i, kernel index K-1-d)."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(feats, weight, nbr)
        return _gemm_rows(feats, nbr, weight.reshape(-1, weight.shape[2]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        feats, weight, nbr = ctx.saved_tensors
        k, cin, cout = weight.shape
        grad = grad.contiguous()
        gx = _gemm_rows(grad, nbr, weight.flip(0).transpose(1, 2).reshape(k * cout, cin))
        padded = torch.cat([feats, feats.new_zeros(1, cin)])
        gw = feats.new_zeros(k * cin, cout)
        rows = max(1, (1 << 24) // (k * cin))
        for a in range(0, nbr.shape[0], rows):
            gw.addmm_(padded[nbr[a:a + rows]].reshape(-1, k * cin).T, grad[a:a + rows])
        return gx, gw.view(k, cin, cout), None


def _gemm_rows(src: torch.Tensor, nbr: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``out[j] = cat_d src[nbr[j, d]] @ w`` with row ``len(src)`` read as zeros, in ~64 MiB row chunks."""
    padded = torch.cat([src, src.new_zeros(1, src.shape[1])])
    rows = max(1, (1 << 24) // w.shape[0])
    return torch.cat([padded[nbr[a:a + rows]].reshape(-1, w.shape[0]) @ w for a in range(0, nbr.shape[0], rows)])


def _neighbour_table(kmap: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """[n, K] input row at each kernel offset of every output row, ``n`` where there is none."""
    table = torch.full((n, len(kmap)), n, dtype=torch.long)
    for d, (i, j) in enumerate(kmap):
        table[j, d] = i
    return table


# --- backbones ----------------------------------------------------------------------------------------

def _backbone_fn(batch: PointBatch, name: str, vs: float, train: bool) -> Callable[[], object]:
    torch.manual_seed(0)
    model = build_backbone(name, 3, 20, vs).train(train)
    target = torch.randint(0, 20, (batch.num_points,), generator=torch.Generator().manual_seed(0))

    def step() -> object:
        if train:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(batch), target)
            loss.backward()
            return loss
        with torch.no_grad():
            return model(batch)

    return step


def _all_kernel_maps(batch: PointBatch, vs: float) -> Callable[[], object]:
    """Every map a MinkUNet forward builds: k5 stem, k3 per level, k2 s2 between levels."""
    vox = voxelize(batch.coord, vs)[0]

    def build() -> object:
        cache = CoordinateCache()
        cache.coords[1] = vox
        cache.kernel_map(1, 1, 5, 1)
        for s in (1, 2, 4, 8):
            cache.coarser(s, 2)
            cache.kernel_map(s, 2 * s, 2, 1)
            cache.kernel_map(2 * s, 2 * s, 3, 1)
        cache.kernel_map(1, 1, 3, 1)
        return cache

    return build


# --- peak memory in a child process -------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _child_peak(spec: tuple, threads: int) -> tuple[float, float]:
    """(resident MiB after setup, growth of the peak RSS over one call in MiB) for one entry.

    Linux: the peak (VmHWM) is reset after setup through /proc/self/clear_refs, so the setup's own
    peak (reading the ply, building the model) does not hide the call's.
    """
    torch.set_num_threads(threads)
    kind = spec[0]
    batch = _scene()
    if kind == "backbone":
        _, name, vs, train = spec
        fn = _backbone_fn(batch, name, vs, train)
    elif kind == "layer":
        _, entry, vs, k, stride, train, limit = spec
        # Build the dense grid only for the dense entry, so its freed pages cannot hide the others' peaks.
        fn = _layer_fns(batch, vs, k, stride, train, limit if entry == "dense conv3d" else -1.0)[0][entry]
    else:
        fn = _all_kernel_maps(batch, spec[1])
    del batch
    gc.collect()
    try:  # hand freed heap pages back first: otherwise the call reuses them and its peak looks smaller
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    if before is None:  # no procfs: the lifetime peak is the best available
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return before / 1024, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    fn()
    return before / 1024, ((_status_kib("VmHWM") or before) - before) / 1024


def peak_memory(spec: tuple, threads: int) -> float | None:
    """Peak-RSS growth (MiB) of one call of the entry described by ``spec``, in a fresh process."""
    ctx = mp.get_context("spawn")
    try:
        with ctx.Pool(1) as pool:
            return pool.apply(_child_peak, (spec, threads))[1]
    except (RuntimeError, MemoryError, OSError):
        return None


# --- driver -------------------------------------------------------------------------------------------

def collect(quick: bool, dense_limit: float, groups: frozenset[str] = frozenset(("kernel_map", "layers", "backbones")),
            ) -> tuple[list[Case], list[tuple[str, str, str, tuple]], list[Case]]:
    """(fast cases, memory specs (op, case, impl, spec), slow backbone cases) of the chosen groups."""
    from benchmarks.bm_ops_sparse import cases as kernel_map_cases  # noqa: PLC0415

    batch = _scene()
    n = batch.num_points
    voxel_sizes = (0.05,) if quick else (0.02, 0.05)
    fast: list[Case] = list(kernel_map_cases(quick)) if "kernel_map" in groups else []
    mem: list[tuple[str, str, str, tuple]] = []
    for vs in voxel_sizes if "layers" in groups else ():
        cm = f"@{round(vs * 100)}cm"
        fast.append(Case("kernel maps of a MinkUNet fwd", f"scene0000_00 {cm}",
                         [Entry("pcbench", _all_kernel_maps(batch, vs))]))
        mem.append(("kernel maps of a MinkUNet fwd", f"scene0000_00 {cm}", "pcbench", ("maps", vs)))
        for k, stride in ((3, 1), (2, 2)):
            for train in (False, True):
                op = f"conv k{k} s{stride} 32->32 {'fwd+bwd' if train else 'fwd'}"
                fns, notes = _layer_fns(batch, vs, k, stride, train, dense_limit)
                entries = [Entry(name, fn, notes.get(name, "")) for name, fn in fns.items()]
                case = Case(op, f"scene0000_00 {cm}", entries, ours="pcbench sparse",
                            notes={"dense conv3d": notes["dense conv3d"]})
                fast.append(case)
                for name in fns:
                    if notes[name].startswith("not run"):
                        continue
                    mem.append((op, case.case, name, ("layer", name, vs, k, stride, train, dense_limit)))
    slow: list[Case] = []
    names = ("MinkUNet14A",) if quick else tuple(BACKBONES)
    for vs in voxel_sizes if "backbones" in groups else ():
        cm = f"@{round(vs * 100)}cm"
        for name in names:
            for train in (False, True):
                op = f"{name} {'train fwd+bwd' if train else 'eval fwd'}"
                slow.append(Case(op, f"scene0000_00 {cm} N={n}",
                                 [Entry("pcbench", _backbone_fn(batch, name, vs, train))]))
                mem.append((op, f"scene0000_00 {cm} N={n}", "pcbench", ("backbone", name, vs, train)))
    return fast, mem, slow


def _with_cpu_clock(cases: list[Case]) -> dict[tuple[str, str, str], list[float]]:
    """Wrap every entry so that its process CPU time is recorded too (wall time on a shared, loaded
    machine mostly measures the neighbours; CPU time of a 1-thread run does not)."""
    clocks: dict[tuple[str, str, str], list[float]] = {}
    for case in cases:
        for e in case.entries:
            store = clocks.setdefault((case.op, case.case, e.name), [])

            def timed(fn: Callable[[], object] = e.fn, store: list[float] = store) -> object:
                t0 = time.process_time()
                try:
                    return fn()
                finally:
                    store.append((time.process_time() - t0) * 1e3)

            e.fn = timed
    return clocks


def main(argv: list[str] | None = None) -> int:
    """Run the sparse-convolution benchmark and write ``sparse.json`` / ``sparse.md``."""
    p = argparse.ArgumentParser(prog="bm_sparse", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 cm only, MinkUNet14A only (a few minutes)")
    p.add_argument("--out", type=Path, default=Path("bench_out/sparse"))
    p.add_argument("--repeats", type=int, default=None, help="timed calls for kernel maps and layers (5; quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (2; quick: 1)")
    p.add_argument("--backbone-repeats", type=int, default=3, help="timed calls for whole backbones")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: stable on a shared machine; 0 = torch default)")
    p.add_argument("--dense-limit-gib", type=float, default=1.0,
                   help="largest dense activation (GiB) for which the conv3d peer runs")
    p.add_argument("--no-memory", action="store_true", help="skip the per-entry peak-memory child processes")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--only", default="kernel_map,layers,backbones",
                   help="comma-separated groups to run: kernel_map, layers, backbones")
    args = p.parse_args(argv)
    reexec_with_tuned_malloc("benchmarks.bm_sparse", args.malloc)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    groups = frozenset(g.strip() for g in args.only.split(",") if g.strip())
    if not groups <= {"kernel_map", "layers", "backbones"}:
        p.error(f"--only takes kernel_map, layers, backbones; got {args.only!r}")
    fast, mem, slow = collect(args.quick, args.dense_limit_gib, groups)
    clocks = _with_cpu_clock(fast + slow)
    rows = run_cases(fast, repeats=args.repeats, warmup=args.warmup, title="sparse")
    rows += run_cases(slow, repeats=args.backbone_repeats, warmup=1, title="sparse")
    for r in rows:
        cpu = clocks.get((r["op"], r["case"], r["impl"]))
        if cpu:
            # Only the timed calls (the last `repeats` of them), as for the wall-clock median.
            n_timed = args.backbone_repeats if r["op"].startswith(tuple(BACKBONES)) else args.repeats
            r["cpu_ms"] = round(statistics.median(cpu[-n_timed:]), 2)
    cpu_by_case: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r.get("cpu_ms") is not None and r.get("median_ms") is not None:
            cpu_by_case.setdefault((r["op"], r["case"]), {})[r["impl"]] = r["cpu_ms"]
    for r in rows:
        peers = {k: v for k, v in cpu_by_case.get((r["op"], r["case"]), {}).items() if k != r["impl"]}
        note = f"cpu {r['cpu_ms']:.1f} ms" if r.get("cpu_ms") is not None else ""
        if peers and r.get("cpu_ms") is not None and r["impl"].startswith("pcbench"):
            best = min(peers, key=peers.get)
            note += f" = {r['cpu_ms'] / peers[best]:.3f}x {best} (cpu)"
        r["note"] = "; ".join(x for x in (note, r.get("note") or "") if x)
    for r in rows:
        if r["op"].startswith(tuple(BACKBONES)) and r.get("median_ms"):
            n = int(str(r["case"]).rsplit("N=", 1)[1])
            r["points_per_s"] = round(n / (r.get("cpu_ms", r["median_ms"]) / 1e3))
            r["note"] = f"{r['note']}; {r['points_per_s']} points/s (cpu)"
    if not args.no_memory:
        peaks = {(op, case, impl): peak_memory(spec, threads) for op, case, impl, spec in mem}
        for r in rows:
            mib = peaks.get((r["op"], r["case"], r["impl"]))
            if mib is not None:
                r["peak_mib"] = round(mib, 1)
                r["note"] = f"{r['note']}; peak +{mib:.0f} MiB".lstrip("; ")
    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks.harness import environment  # noqa: PLC0415

    record = {"title": "sparse", "environment": environment(), "threads": threads, "rows": rows}
    write_text(args.out / "sparse.json", json.dumps(record, indent=2))
    table = markdown_table(rows, f"sparse convolution ({threads} thread(s))")
    write_text(args.out / "sparse.md", table)
    print()
    print(table)
    print(f"written: {args.out / 'sparse.json'} and {args.out / 'sparse.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
