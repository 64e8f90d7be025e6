"""kNN and ball-query cases for ``benchmarks.bm_ops``: pcbench against k-d trees, open3d, faiss and torch.

Inputs come from ``pcbench.testing.clouds`` (the same builders the tests use). Every entry includes its
own index build (pcbench builds its cell grid on every call too). Run alone with
``python -m benchmarks.bm_ops_knn [--quick]``; ``--memory`` only measures the 1M-point peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from benchmarks.harness import Case, Entry, optional_entry, run_cases
from pcbench.ops import ball_query, farthest_point_sample, knn, sample_offset
from pcbench.ops._reference import knn_reference
from pcbench.testing.clouds import (
    load_scannet_scene,
    object_batch,
    scan_like_scene,
    shared_data_dir,
    uniform_cloud,
)

# plain cdist + topk materialises [M, N] floats: only where that stays below this
_CDIST_MAX_ELEMS = 1 << 29
# brute-force peers (faiss flat index, O(N^2): ~10 s at 65k here) only up to this many points per cloud
_FLAT_MAX_POINTS = 20_000


def _split(coord: Tensor, offset: Tensor) -> list[np.ndarray]:
    ends = offset.tolist()
    starts = [0, *ends[:-1]]
    return [np.ascontiguousarray(coord[a:b].numpy()) for a, b in zip(starts, ends, strict=True)]


def _pykdtree(clouds: list[np.ndarray], k: int) -> Callable[[], object]:
    from pykdtree.kdtree import KDTree  # noqa: PLC0415 - optional peer

    return lambda: [KDTree(c).query(c, k=k) for c in clouds]


def _ckdtree(clouds: list[np.ndarray], k: int) -> Callable[[], object]:
    from scipy.spatial import cKDTree  # noqa: PLC0415 - optional peer

    return lambda: [cKDTree(c).query(c, k=k, workers=-1) for c in clouds]


def _open3d_knn(clouds: list[np.ndarray], k: int) -> Callable[[], object]:
    import open3d as o3d  # noqa: PLC0415 - optional peer

    tensors = [o3d.core.Tensor(c) for c in clouds]

    def run() -> object:
        out = []
        for t in tensors:
            nns = o3d.core.nns.NearestNeighborSearch(t)
            nns.knn_index()
            out.append(nns.knn_search(t, k))
        return out

    return run


def _faiss(clouds: list[np.ndarray], k: int) -> Callable[[], object]:
    import faiss  # noqa: PLC0415 - optional peer

    def run() -> object:
        out = []
        for c in clouds:
            index = faiss.IndexFlatL2(3)
            index.add(c)
            out.append(index.search(c, k))
        return out

    return run


def _torch_cdist(coord: Tensor, offset: Tensor, k: int) -> Callable[[], object]:
    ends = offset.tolist()
    starts = [0, *ends[:-1]]

    def run() -> object:
        return [torch.topk(torch.cdist(coord[a:b], coord[a:b]), k, dim=1, largest=False)
                for a, b in zip(starts, ends, strict=True)]

    return run


def knn_case(name: str, coord: Tensor, offset: Tensor, k: int, reference: bool = False) -> Case:
    """One kNN input (query = support) timed under pcbench and every available peer."""
    clouds = _split(coord, offset)
    biggest = max(len(c) for c in clouds)
    entries: list[Entry] = [
        Entry("pcbench", lambda: knn(coord, coord, k, offset, offset)),
        optional_entry("pykdtree", lambda: _pykdtree(clouds, k)),
        optional_entry("scipy cKDTree", lambda: _ckdtree(clouds, k), "workers=-1"),
        optional_entry("open3d nns", lambda: _open3d_knn(clouds, k), "knn_search"),
    ]
    if biggest <= _FLAT_MAX_POINTS:
        entries.append(optional_entry("faiss IndexFlatL2", lambda: _faiss(clouds, k)))
    if sum(len(c) ** 2 for c in clouds) <= _CDIST_MAX_ELEMS and biggest ** 2 <= _CDIST_MAX_ELEMS:
        entries.append(Entry("torch cdist+topk", _torch_cdist(coord, offset, k)))
    if reference:
        entries.append(Entry("pcbench reference", lambda: knn_reference(coord, coord, k, offset, offset),
                             "float64 brute force"))
    n = coord.shape[0]
    return Case("knn", f"{name} N={n} k={k}", entries)


def _open3d_hybrid(c: np.ndarray, radius: float, max_nn: int) -> Callable[[], object]:
    import open3d as o3d  # noqa: PLC0415 - optional peer

    t = o3d.core.Tensor(c)

    def run() -> object:
        nns = o3d.core.nns.NearestNeighborSearch(t)
        nns.hybrid_index(radius)
        return nns.hybrid_search(t, radius, max_nn)

    return run


def _ckdtree_ball(c: np.ndarray, radius: float, max_nn: int) -> Callable[[], object]:
    from scipy.spatial import cKDTree  # noqa: PLC0415 - optional peer

    return lambda: cKDTree(c).query(c, k=max_nn, distance_upper_bound=radius, workers=-1)


def _pykdtree_ball(c: np.ndarray, radius: float, max_nn: int) -> Callable[[], object]:
    from pykdtree.kdtree import KDTree  # noqa: PLC0415 - optional peer

    return lambda: KDTree(c).query(c, k=max_nn, distance_upper_bound=radius)


def ball_case(name: str, coord: Tensor, radius: float, max_nn: int) -> Case:
    """One ball query (query = support, one cloud) timed under pcbench and the peers."""
    c = np.ascontiguousarray(coord.numpy())
    mean = float((ball_query(coord, coord, radius, max_nn) >= 0).sum(1).float().mean())
    entries = [
        Entry("pcbench", lambda: ball_query(coord, coord, radius, max_nn)),
        Entry("pcbench order=index", lambda: ball_query(coord, coord, radius, max_nn, order="index")),
        optional_entry("open3d hybrid", lambda: _open3d_hybrid(c, radius, max_nn), "hybrid_search"),
        optional_entry("scipy cKDTree", lambda: _ckdtree_ball(c, radius, max_nn), "k + distance_upper_bound"),
        optional_entry("pykdtree", lambda: _pykdtree_ball(c, radius, max_nn), "k + distance_upper_bound"),
    ]
    return Case("ball_query", f"{name} N={coord.shape[0]} r={radius:.3g} max={max_nn} (mean {mean:.1f} nbrs)",
                entries)


def _dense_first_in_ball(centres: Tensor, coord: Tensor, b: int, radius: float, nsample: int) -> Tensor:
    """The dense-batch formulation of index-order ball query used by PyTorch PointNet++ ports
    (yanx27/Pointnet_Pointnet2_pytorch ``query_ball_point``): all distances, indices outside the ball set to
    N, sort, keep the first ``nsample``, fill with the first."""
    q, s = centres.view(b, -1, 3), coord.view(b, -1, 3)
    n = s.shape[1]
    idx = torch.arange(n).expand(b, q.shape[1], n).clone()
    idx[torch.cdist(q, s) ** 2 > radius * radius] = n
    idx = idx.sort(dim=-1).values[:, :, :nsample]
    first = idx[:, :, :1].expand_as(idx)
    return torch.where(idx == n, first, idx)


def grouping_case(b: int, n: int, m: int, radius: float, nsample: int) -> Case:
    """PointNet++ grouping (object batch, ``m`` FPS centres per cloud): index-order ball query vs the dense port."""
    coord, offset = object_batch(b, n, seed=0)
    sel = farthest_point_sample(coord, offset, n=m)
    centres, coff = coord[sel], sample_offset(offset, n=m)
    entries = [
        Entry("pcbench", lambda: ball_query(centres, coord, radius, nsample, coff, offset, order="index")),
        Entry("pcbench order=distance", lambda: ball_query(centres, coord, radius, nsample, coff, offset)),
        Entry("torch dense sort (yanx27 formulation)", lambda: _dense_first_in_ball(centres, coord, b, radius, nsample)),
    ]
    return Case("ball_query", f"PointNet++ grouping {b}x{n}, {m} centres, r={radius:g}, nsample={nsample}", entries)


def _radius_for(n: int, volume: float, neighbours: float) -> float:
    return (neighbours * volume * 3 / (4 * math.pi * n)) ** (1 / 3)


def peak_memory_1m(k: int = 16, n: int = 1 << 20) -> dict[str, float]:
    """Extra peak resident memory (MiB) of one knn call on ``n`` uniform points, measured in a child.

    ``ru_maxrss`` is a high-water mark, so the child records it after building the input and again
    after the call; the difference is what knn itself added (its outputs included).
    """
    code = (
        "import resource, json, torch\n"
        "from pcbench.ops import knn\n"
        "from pcbench.testing.clouds import uniform_cloud\n"
        f"p = uniform_cloud({n}, seed=0)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"idx, d2 = knn(p, p, {k})\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = idx.numel() * 8 + d2.numel() * 4\n"
        "print(json.dumps({'extra_peak_mib': (after - before) / 1024, 'output_mib': out / 2**20}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def cases(quick: bool) -> list[Case]:
    """kNN (object batches, scenes, real ScanNet scene) and ball-query cases; ``quick`` = small ones only."""
    out: list[Case] = []
    if quick:
        coord, offset = object_batch(8, 1024, seed=0)
        out.append(knn_case("object batch 8x1024", coord, offset, 16, reference=True))
        p = uniform_cloud(16384, seed=0)
        out.append(knn_case("uniform scene", p, torch.tensor([p.shape[0]]), 16))
        p = uniform_cloud(16384, seed=1)
        out.append(ball_case("uniform scene", p, _radius_for(16384, 1.0, 30), 32))
        out.append(grouping_case(8, 1024, 512, 0.2, 32))
        return out
    for b, n in ((32, 1024), (16, 4096)):
        coord, offset = object_batch(b, n, seed=0)
        out.append(knn_case(f"object batch {b}x{n}", coord, offset, 16))
    for k in (16, 32):
        for n in (16384, 65536, 262144):
            p = uniform_cloud(n, seed=0)
            out.append(knn_case("uniform scene", p, torch.tensor([n]), k))
        for n in (65536, 262144):
            p = scan_like_scene(n, seed=0)
            out.append(knn_case("scan-like scene", p, torch.tensor([n]), k))
    root = shared_data_dir()
    if root is not None:
        ply = root / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply"
        if ply.is_file():
            p, _ = load_scannet_scene(ply)
            out.append(knn_case("ScanNet scene0000_00 vertices", p, torch.tensor([p.shape[0]]), 16))
    p = uniform_cloud(1 << 20, seed=0)
    case = knn_case("uniform scene", p, torch.tensor([p.shape[0]]), 16)
    case.notes["memory"] = json.dumps(peak_memory_1m())
    for e in case.entries:
        if e.name == "pcbench":
            mem = json.loads(case.notes["memory"])
            e.note = f"extra peak RSS {mem['extra_peak_mib']:.0f} MiB (outputs {mem['output_mib']:.0f} MiB)"
    out.append(case)
    p = uniform_cloud(65536, seed=1)
    out.append(ball_case("uniform scene", p, _radius_for(65536, 1.0, 30), 32))
    p = scan_like_scene(65536, seed=1)
    out.append(ball_case("scan-like scene", p, 0.16, 32))  # ~29 neighbours on average
    out.append(grouping_case(16, 1024, 512, 0.2, 32))  # SSG level 1
    out.append(grouping_case(16, 1024, 512, 0.4, 128))  # MSG level 1, widest branch
    return out


def main(argv: list[str] | None = None) -> int:
    """Run only the kNN / ball-query cases (same output format as ``pcbench-bench-ops``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory", action="store_true", help="only measure the 1M-point knn peak memory")
    ap.add_argument("--out", default="bench_out/ops_knn")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default); set "
                    "OMP_NUM_THREADS too so that the OpenMP peers match")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(peak_memory_1m()))
        return 0
    run_cases(cases(args.quick), out_dir=args.out, repeats=args.repeats, title="ops_knn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
