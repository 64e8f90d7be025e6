"""Exact k-nearest neighbours on packed batches (pure torch, CPU and CUDA).

Two exact methods, picked automatically:

* ``"grid"``: per-cloud cubic cells (size from a sampled estimate of the k-th neighbour distance),
  the 3x3x3 stencil of a query's cell searched with one batched ``cdist`` + ``topk`` per chunk of
  cells (see ``_grid``), and an exactness check per query: its k-th distance must not exceed the
  distance to the outside of the searched block. Queries that fail are searched again with wider
  stencils on the same grid, then on coarser grids, and the last few by brute force. About linear
  in N; the method for scenes and object batches on CPU.
* ``"dense"``: per-cloud brute force (``cdist`` + ``topk``) in bounded chunks, ragged clouds padded
  internally. Quadratic, but a few large kernels: the method for tiny clouds and for GPUs.

Selection uses direct coordinate differences in float32 (float64 for float64 inputs); the selected
squared distances are then recomputed in float64 and rounded to the input dtype, so ``dist2``
matches a float64 brute force, and among neighbours whose distances tie to ~1e-7 relative any may
win. For float16 inputs ``dist2`` is float16 too, like the reference: it saturates to inf above
65504 (such entries keep a valid ``idx``).

Any finite coordinates are searched exactly: a cloud whose largest |coordinate| lies outside
[2^-32, 2^32] (e.g. at 1e20 or 1e-20, where float32 squares overflow or flush to zero) is rescaled
internally by an exact power of two first (``_grid.unit_scale``). ``dist2`` is returned in the input
dtype, so in float32 it saturates to inf beyond distances of ~1.8e19 and loses precision below ~1e-19;
``idx`` stays exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dense import dense_select, max_lengths
from ._dispatch import on_gpu_path
from ._grid import MAX_REACH, Grid, cloud_bounds, stencil_search, unit_scale
from .batch import check_coords, check_same_device, offset2batch, offset2lengths, resolve_offset

__all__ = ["knn"]

METHODS = ("auto", "dense", "grid")

# Dense chunk budget: elements of one padded distance block [clouds, queries, support]; CPU
# blocks stay cache-sized, GPU blocks are large so that a few launches do all the work.
_DENSE_BLOCK = 1 << 22
_DENSE_BLOCK_CUDA = 1 << 26
# "auto" on CPU: brute force only while every support cloud is at most this big.
_CPU_DENSE_MAX = 64
# "auto" on GPU: padded brute force while (clouds x largest query cloud x largest support cloud) stays below this.
_GPU_DENSE_WORK = 1 << 32
# After the first grid pass, the few failing queries go to brute force when this cheap.
_FALLBACK_DENSE_WORK = 1 << 23
# Cell size relative to the sampled k-th neighbour distance (tuned on uniform and scan-like clouds).
_CELL_FACTOR = 1.15
# Stencil reaches tried on one grid before coarsening it.
_FIRST_REACH = 1
_EST_QUERIES = 64
# Quantile of the sampled k-th distances that sets the cell size (0.5: the median).
_EST_QUANTILE = 0.5
_EST_WORK = 1 << 24
_EXACT_ROWS = 1 << 16


def knn(
    query: Tensor,
    support: Tensor,
    k: int,
    query_offset: Tensor | None = None,
    support_offset: Tensor | None = None,
    *,
    method: str = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest support points of every query point, searched within the same cloud.

    Args:
        query: ``[M, 3]`` float16/32/64 query points, packed by cloud.
        support: ``[N, 3]`` support points (same dtype and device), packed by cloud.
        k: number of neighbours (> 0); may exceed a cloud's size.
        query_offset, support_offset: ``[B]`` int cumulative end offsets (``None`` = one cloud); both
            must describe the same number of clouds, cloud b of the queries searches cloud b of the
            support. Query and support sets may differ.
        method: ``"auto"`` (default), ``"grid"`` (cell stencil, for scenes on CPU) or ``"dense"``
            (chunked brute force, for small clouds / GPU). All are exact; only speed differs.
        validate: check that coordinates are finite and offsets well formed (host syncs); ``False`` only for
            inputs already checked, e.g. taken from a ``PointBatch`` or produced by another op.

    Returns:
        ``idx [M, k]`` int64 global support rows and ``dist2 [M, k]`` squared distances in the query
        dtype, ascending along each row. If ``idx[i, j] = m`` then ``support[m]`` is the j-th nearest
        of ``query[i]`` and ``dist2[i, j] = |query[i] - support[m]|^2``. When the query's cloud has
        fewer than ``k`` support points (or none), the missing tail is ``idx = -1``, ``dist2 = inf``.
        Ties may be broken either way; the set of distances is exact.
    """
    check_same_device(query=query, support=support, query_offset=query_offset, support_offset=support_offset)
    _validate(query, support, k, method, finite=validate)
    qo = resolve_offset("query_offset", query_offset, query.shape[0], query.device, validate)
    so = resolve_offset("support_offset", support_offset, support.shape[0], support.device, validate)
    if qo.numel() != so.numel():
        raise ValueError(
            f"query_offset and support_offset must describe the same number of clouds, got {qo.numel()} and "
            f"{so.numel()}; pass one offset entry per cloud on both sides (None means a single cloud)"
        )
    return _knn(query, support, k, qo, so, method)


def _validate(query: Tensor, support: Tensor, k: int, method: str, k_name: str = "k", finite: bool = True) -> None:
    check_coords("query", query, finite=finite)
    check_coords("support", support, finite=finite)
    if query.dtype != support.dtype:
        raise ValueError(
            f"query and support must share a dtype, got {query.dtype} and {support.dtype}; convert one with .to()"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"{k_name} must be a positive int number of neighbours, got {k!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Selection arithmetic runs in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _knn(query: Tensor, support: Tensor, k: int, qo: Tensor, so: Tensor, method: str) -> tuple[Tensor, Tensor]:
    dev = query.device
    m = query.shape[0]
    cd = compute_dtype(query.dtype)
    q64 = query.detach().double()
    s64 = support.detach().double()
    num = qo.numel()
    qcl = offset2batch(qo, m)
    scl = offset2batch(so, support.shape[0])
    ns = offset2lengths(so)
    nq = offset2lengths(qo)
    idx = torch.full((m, k), -1, dtype=torch.long, device=dev)
    d2 = torch.full((m, k), math.inf, dtype=torch.float64, device=dev)
    if on_gpu_path(dev) and method != "grid" and m and support.shape[0]:
        # GPU path: padded brute force per cloud while the padded work stays small enough, sized by the one
        # host read of the largest clouds (the CPU path's bookkeeping reads the device many times).
        sizes = max_lengths(qo, so)
        if method == "dense" or num * sizes[0] * sizes[1] <= _GPU_DENSE_WORK:
            lo, hi = cloud_bounds(q64, s64, qcl, scl, num)
            scale = unit_scale(lo, hi, always=True)
            if scale is not None:
                q64, s64 = q64 * scale[qcl, None], s64 * scale[scl, None]
            idx, d2 = dense_select(q64, s64, qo, so, k, _DENSE_BLOCK_CUDA, sizes=sizes)
            if scale is not None:
                d2 = d2 / scale[qcl, None] / scale[qcl, None]
            return idx, d2.to(query.dtype)
        method = "grid"
    active = torch.nonzero(ns[qcl] > 0).squeeze(1) if m else qcl
    if active.numel():
        if method == "auto":
            method = _auto_method(dev, nq, ns)
        lo, hi = cloud_bounds(q64, s64, qcl, scl, num)
        scale = unit_scale(lo, hi)
        if scale is None:
            q, s = query.detach().to(cd), support.detach().to(cd)
        else:  # exact power-of-two rescaling of clouds at extreme scales; dist2 is scaled back below
            q64, s64 = q64 * scale[qcl, None], s64 * scale[scl, None]
            lo, hi = lo * scale[:, None], hi * scale[:, None]
            q, s = q64.to(cd), s64.to(cd)
        if method == "dense":
            _dense_into(q, s, q64, s64, qcl, qo, so, lo, hi, active, k, idx, d2)
        else:
            _grid_into(q, s, q64, s64, qcl, scl, qo, so, lo, hi, active, k, idx, d2)
        if scale is not None:
            d2 = d2 / scale[qcl, None] / scale[qcl, None]  # twice: scale**2 may overflow float64
    return idx, d2.to(query.dtype)


def _auto_method(dev: torch.device, nq: Tensor, ns: Tensor) -> str:
    # (the GPU path decided above, in _knn)
    return "dense" if int(ns.max()) <= _CPU_DENSE_MAX else "grid"


def _exact(q64t: Tensor, s64t: Tensor, rows: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Exact float64 dist2 of the selected neighbours, rows re-sorted where rounding reordered them.

    ``q64t`` is the float64 query ``[3, M]`` and ``s64t`` the float64 support ``[3, N + 1]`` with an
    inf sentinel column last (where ``idx`` is -1); coordinate-major layouts make the gathers cheap.
    """
    n = idx.shape[0]
    out = torch.empty(idx.shape, dtype=torch.float64, device=idx.device)
    sentinel = s64t.shape[1] - 1
    for a in range(0, n, _EXACT_ROWS):
        b = min(n, a + _EXACT_ROWS)
        ii = idx[a:b]
        fi = torch.where(ii < 0, sentinel, ii).view(-1)
        rr = rows[a:b]
        acc = out[a:b]
        for d in range(3):
            g = s64t[d].index_select(0, fi).view(b - a, -1).sub_(q64t[d].index_select(0, rr)[:, None])
            if d == 0:
                torch.mul(g, g, out=acc)
            else:
                acc.addcmul_(g, g)
    if out.shape[1] > 1:
        bad = torch.nonzero((out[:, 1:] < out[:, :-1]).any(1)).squeeze(1)
        if bad.numel():
            sd, order = torch.sort(out[bad], dim=1, stable=True)
            out[bad] = sd
            idx[bad] = idx[bad].gather(1, order)
    return idx, out


def coord_major(p64: Tensor, sentinel: bool = False) -> Tensor:
    """``[3, n]`` float64 copy of ``[n, 3]`` points, optionally with an inf sentinel column appended."""
    t = p64.t()
    if sentinel:
        t = torch.cat([t, t.new_full((3, 1), math.inf)], dim=1)
    return t.contiguous()


def _grid_into(
    q: Tensor,
    s: Tensor,
    q64: Tensor,
    s64: Tensor,
    qcl: Tensor,
    scl: Tensor,
    qo: Tensor,
    so: Tensor,
    lo: Tensor,
    hi: Tensor,
    active: Tensor,
    k: int,
    idx: Tensor,
    d2: Tensor,
) -> None:
    # Cells of 1/reach of the searched radius: a (2 reach + 1)^3 stencil hugs the ball better
    # than 3x3x3 big cells (fewer candidates per query), at the price of fewer queries per cell.
    h = _estimate_cell(q, s, qo, so, k) * (_CELL_FACTOR / _FIRST_REACH)
    q64t, s64t = coord_major(q64), coord_major(s64, True)
    ns = offset2lengths(so)
    while active.numel():
        grid = Grid(lo, hi, h)
        grid.sort_support(s, s64, scl)
        # Wider stencils on the same sorted grid for the queries whose k-th neighbour lies beyond
        # their block; only then a coarser grid (or brute force for the last few).
        for reach in range(_FIRST_REACH, MAX_REACH + 1):
            ii, bdist = stencil_search(q, q64, qcl, active, grid, k, reach)
            ii, dd = _exact(q64t, s64t, active, ii)
            # Every support point outside the searched block is >= bdist away: if the k-th found
            # distance is within it, nothing outside can be strictly nearer (margin covers rounding).
            ok = dd[:, -1] <= bdist * bdist * (1.0 - 1e-9)
            done = active[ok]
            idx[done] = ii[ok]
            d2[done] = dd[ok]
            active = active[~ok]
            if active.numel() == 0:
                return
        if active.numel() * int(ns[qcl[active]].max()) <= _FALLBACK_DENSE_WORK:
            _dense_into(q, s, q64, s64, qcl, qo, so, lo, hi, active, k, idx, d2)
            return
        h = h * 2.0 * MAX_REACH / _FIRST_REACH


def _estimate_cell(q: Tensor, s: Tensor, qo: Tensor, so: Tensor, k: int) -> Tensor:
    """Per-cloud estimate [B] (float64) of the median k-th neighbour distance, from a small sample.

    Brute force of up to 64 evenly spaced queries per cloud against an evenly strided support
    subsample (stride f <= k/4, so the subsample's j = k/f >= 4 th neighbour stands in for the
    k-th, with the Poisson median correction ((k - 1/3) / (f (j - 1/3)))^(1/d), d ~ 2.5 between
    surfaces and volumes). Clouds without queries or support get inf.
    """
    dev = q.device
    nq = offset2lengths(qo)
    ns = offset2lengths(so)
    qstart = qo - nq
    sstart = so - ns
    num = qo.numel()
    lq = int(min(_EST_QUERIES, int(nq.max())))
    est = torch.full((num,), math.inf, dtype=torch.float64, device=dev)
    if lq == 0 or int(ns.max()) == 0:
        return est
    stride = torch.clamp((ns * lq + _EST_WORK - 1) // _EST_WORK, min=max(1, k // 4))
    nsub = (ns + stride - 1) // stride
    rank = torch.clamp(torch.round(k / stride.double()).long(), min=1)
    rank = torch.minimum(rank, nsub.clamp(min=1))
    correction = ((k - 1 / 3) / (stride * (rank - 1 / 3)).double()).pow(1 / 2.5)
    ls = int(nsub.max())
    iq = torch.arange(lq, device=dev)
    # +1 keeps the sampled queries off the support stride when query and support are the same set
    # (a sampled query would otherwise always find itself in the subsample and bias the estimate).
    qpos = qstart[:, None] + ((iq * nq[:, None]) // lq + 1) % nq.clamp(min=1)[:, None]
    qvalid = (nq > 0)[:, None].expand(-1, lq)
    js = torch.arange(ls, device=dev)
    spos = sstart[:, None] + js * stride[:, None]
    svalid = js < nsub[:, None]
    rmax = int(rank.max())
    per = max(1, _DENSE_BLOCK // (lq * ls))
    out = torch.empty((num, lq), dtype=torch.float64, device=dev)
    for a in range(0, num, per):
        b = min(num, a + per)
        qp = q[qpos[a:b].clamp(max=max(q.shape[0] - 1, 0))]
        sp = s[spos[a:b].clamp(max=max(s.shape[0] - 1, 0))]
        sp.masked_fill_(~svalid[a:b, :, None], math.inf)
        dd = torch.cdist(qp, sp, compute_mode="donot_use_mm_for_euclid_dist")
        kth = torch.topk(dd, min(rmax, ls), dim=2, largest=False, sorted=True).values
        r = (rank[a:b] - 1).clamp(max=kth.shape[2] - 1)
        out[a:b] = kth.gather(2, r[:, None, None].expand(-1, lq, 1)).squeeze(2).double()
    out = torch.where(qvalid, out, torch.full_like(out, math.nan))
    med = torch.nanquantile(out, _EST_QUANTILE, dim=1)
    return torch.where(torch.isfinite(med), med * correction, est)


def _dense_into(
    q: Tensor,
    s: Tensor,
    q64: Tensor,
    s64: Tensor,
    qcl: Tensor,
    qo: Tensor,
    so: Tensor,
    lo: Tensor,
    hi: Tensor,
    sel: Tensor,
    k: int,
    idx: Tensor,
    d2: Tensor,
) -> None:
    """Brute force for the queries ``sel`` (ascending rows), chunked over clouds and queries."""
    dev = q.device
    budget = _DENSE_BLOCK_CUDA if on_gpu_path(dev) else _DENSE_BLOCK
    num = qo.numel()
    ns = offset2lengths(so)
    sstart = so - ns
    qcount = torch.bincount(qcl[sel], minlength=num)
    qstart = torch.cumsum(qcount, 0) - qcount
    clouds = torch.nonzero((qcount > 0) & (ns > 0)).squeeze(1)
    cl_list = clouds.tolist()
    qc_list = qcount[clouds].tolist()
    ns_list = ns[clouds].tolist()
    sel_idx = torch.empty((sel.shape[0], k), dtype=torch.long, device=dev)
    chunks: list[tuple[list[int], int, int, int]] = []  # (clouds, query row window start, Lq, Ls)
    cur: list[int] = []
    mq = ms = 0
    for c, a, b in zip(cl_list, qc_list, ns_list, strict=True):
        if a * b > budget:
            rows = max(1, budget // b)
            for r0 in range(0, a, rows):
                chunks.append(([c], r0, min(rows, a - r0), b))
            continue
        nmq, nms = max(mq, a), max(ms, b)
        if cur and (len(cur) + 1) * nmq * nms > budget:
            chunks.append((cur, 0, mq, ms))
            cur, nmq, nms = [], a, b
        cur.append(c)
        mq, ms = nmq, nms
    if cur:
        chunks.append((cur, 0, mq, ms))
    for cls, r0, lq, ls in chunks:
        ct = torch.tensor(cls, device=dev)
        ir = torch.arange(lq, device=dev) + r0
        qrow = qstart[ct, None] + ir
        qvalid = ir < qcount[ct, None]
        qrow = torch.where(qvalid, qrow, qstart[ct, None])
        js = torch.arange(ls, device=dev)
        srow = sstart[ct, None] + js
        svalid = js < ns[ct, None]
        srow = torch.where(svalid, srow, sstart[ct, None])
        sp = s[srow]
        sp.masked_fill_(~svalid[:, :, None], math.inf)
        # Direct differences: exact selection whatever the coordinate offset or scale.
        dist = torch.cdist(q[sel[qrow]], sp, compute_mode="donot_use_mm_for_euclid_dist")
        kk = min(k, ls)
        val, arg = torch.topk(dist, kk, dim=2, largest=False, sorted=True)
        gi = srow.gather(1, arg.reshape(len(cls), lq * kk)).reshape(len(cls), lq, kk)
        gi = torch.where(torch.isinf(val), torch.full_like(gi, -1), gi)
        rows = qrow[qvalid]
        sel_idx[rows, :kk] = gi[qvalid]
        if kk < k:
            sel_idx[rows, kk:] = -1
    ii, dd = _exact(coord_major(q64), coord_major(s64, True), sel, sel_idx)
    idx[sel] = ii
    d2[sel] = dd
