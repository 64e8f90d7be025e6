"""Cell-hash machinery shared by ``knn`` and ``ball_query`` (private).

Points are binned into cubic cells of a per-cloud size ``h``. Each cell gets one int64 key with the
cloud index folded in (a per-cloud block of key space), so one sort groups every cloud's cells and no
Python loop ever runs over clouds or points. Every cloud's grid is padded by MAX_REACH empty cells on
each side, so a (2r+1)^3 stencil (reach r <= MAX_REACH) never wraps into another row or cloud; the
2r+1 stencil cells along z are consecutive keys, so a stencil is (2r+1)^2 contiguous runs of the
key-sorted support, found with ``searchsorted``.

Queries are processed per "unit" (up to ``_UNIT_QUERIES`` queries of one cell): all queries of a
unit share one candidate list, laid out by a running sum over the runs. A chunk of units is one
batched ``cdist`` ``[U, Q, 3] x [U, C, 3]`` with direct differences (exact relative accuracy at any
coordinate scale, unlike the expanded ``|q|^2 - 2 q.s + |s|^2``) and one ``topk`` on the distances'
integer bit patterns. Units are grouped by query count (no padding along queries) and, within a
group, chunked by candidate count (little padding along candidates). Padded candidate slots point
at an infinitely far sentinel row of the sorted support.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor

# Queries sharing one candidate list; large cells (duplicates, dense spots) are split into units.
_UNIT_QUERIES = 32
# Elements of one distance block [U, Q, C]; bounds the temporaries of a chunk (~16 MiB in float32).
_BLOCK_ELEMS = 1 << 22
# Chunks stop where padding along candidates would exceed this factor ...
_PAD_GROWTH = 1.25
# ... unless they hold fewer distance entries than this (per-chunk launch overhead dominates).
_MIN_BLOCK_ELEMS = 1 << 16
# Cells per dimension and cloud never exceed this, so keys fit int64 whatever the coordinate scale.
_MAX_CELLS_PER_DIM = 1 << 19
# Empty cells padded around every cloud's grid: stencils reach at most this far without wrapping.
MAX_REACH = 3
# Clouds whose largest |coordinate| lies outside [2^-_SAFE_EXP, 2^_SAFE_EXP] are rescaled (see unit_scale).
_SAFE_EXP = 32


class Grid:
    """Per-cloud cell geometry: origin ``lo [B,3]`` (float64), cell size ``h [B]`` (float64),
    padded dims ``g [B,3]`` (int64) and key base ``base [B]`` (int64), plus the support sorted by key."""

    def __init__(self, lo: Tensor, hi: Tensor, h: Tensor) -> None:
        num = lo.shape[0]
        ext = (hi - lo).clamp_min(0)
        # Bound the number of cells per dimension (and in total) so int64 keys cannot overflow.
        cap = min(_MAX_CELLS_PER_DIM, int((2.0**61 / max(num, 1)) ** (1 / 3)) - 2 * MAX_REACH - 1)
        emax = ext.amax(1)
        h = torch.maximum(h, emax / cap)
        # A cell larger than the cloud makes it one cell (exact by construction); keep h finite so
        # relative coordinates stay finite, and positive for single-point clouds.
        h = torch.minimum(h, torch.where(emax > 0, emax * 1.001, torch.ones_like(emax)))
        h = torch.where(h > 0, h, torch.ones_like(h))
        self.lo = lo
        self.h = h
        n = torch.floor(ext / h[:, None]).long() + 1
        self.covered = (n == 1).all(1)  # the whole cloud lies in one cell: any stencil sees all of it
        self.g = n + 2 * MAX_REACH
        cells = self.g.prod(1)
        self.base = torch.cumsum(cells, 0) - cells
        self.skey = self.sperm = self.ss = None

    def cell_coords(self, p64: Tensor, cloud: Tensor) -> Tensor:
        """Integer cell coordinates [n,3], offset by MAX_REACH so stencils never leave the padded grid."""
        return torch.floor((p64 - self.lo[cloud]) / self.h[cloud, None]).long() + MAX_REACH

    def keys(self, cc: Tensor, cloud: Tensor) -> Tensor:
        """One int64 key per cell coordinate row, with the cloud folded in."""
        g = self.g[cloud]
        return self.base[cloud] + (cc[:, 0] * g[:, 1] + cc[:, 1]) * g[:, 2] + cc[:, 2]

    def sort_support(self, s: Tensor, s64: Tensor, scl: Tensor) -> None:
        """Sort the support by cell key once; every stencil search on this grid reuses it."""
        self.skey, sperm = torch.sort(self.keys(self.cell_coords(s64, scl), scl))
        # One extra row at the end: an infinitely far sentinel that padded candidate slots point to.
        self.sperm = torch.cat([sperm, sperm.new_full((1,), -1)])
        self.ss = torch.cat([s.index_select(0, sperm), s.new_full((1, 3), math.inf)])


def cloud_bounds(q64: Tensor, s64: Tensor, qcl: Tensor, scl: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """Per-cloud bounding box [B,3] of queries and support together (float64); empty clouds get 0."""
    lo = torch.full((num, 3), math.inf, dtype=torch.float64, device=q64.device)
    hi = torch.full((num, 3), -math.inf, dtype=torch.float64, device=q64.device)
    for p, c in ((q64, qcl), (s64, scl)):
        if p.shape[0]:
            idx = c[:, None].expand(-1, 3)
            lo.scatter_reduce_(0, idx, p, "amin")
            hi.scatter_reduce_(0, idx, p, "amax")
    empty = ~torch.isfinite(lo).all(1, keepdim=True)
    zero = lo.new_zeros(())
    return torch.where(empty, zero, lo), torch.where(empty, zero, hi)  # no boolean-mask write: no host sync


def unit_scale(lo: Tensor, hi: Tensor, always: bool = False) -> Tensor | None:
    """Per-cloud power-of-two factors [B] (float64) for clouds at extreme scales, or None when none is.

    Selection runs on float32 distances (``cdist`` squares the differences), which overflow to inf for
    differences beyond ~1.8e19 and lose all precision below ~1e-19: a cloud at 1e20 would get ``-1``
    neighbours and one at 1e-20 arbitrary ones. A cloud whose largest |coordinate| ``m`` lies outside
    [2^-32, 2^32] is multiplied by ``2^-e`` (``m = f 2^e``, 0.5 <= f < 1), which brings ``m`` into [0.5, 1):
    multiplying by a power of two is exact, so every distance is the original one times ``4^-e`` with the
    same rounding, and the selection is that of the original points. Inside the band the squares of
    all differences the input dtype can resolve stay normal floats, so nothing is rescaled there.
    ``always=True`` returns the factors (1 where none is needed) without asking the host whether any is: the
    GPU path's choice, one multiply by an exact 1 instead of a device sync.
    """
    m = torch.maximum(lo.abs(), hi.abs()).amax(1).double()
    # frexp's exponent read from the float64 bits (biased exponent - 1022; m >= 0, so no sign bit): inductor's
    # vectorised C++ for torch.frexp does not compile (torch 2.13, CPU). 0 keeps exponent 0 (scale 1), as
    # frexp(0) does; the clamp keeps 2^-e finite for subnormals (whose bits give -1022, frexp's value clamped alike).
    e = torch.where(m == 0, 0, (m.view(torch.int64) >> 52) - 1022).to(torch.float64).clamp(-1000.0, 1000.0)
    need = e.abs() > _SAFE_EXP
    if not always and not bool(need.any()):
        return None
    return torch.where(need, torch.pow(2.0, -e), torch.ones_like(m))


def stencil_search(
    q: Tensor,
    q64: Tensor,
    qcl: Tensor,
    qsel: Tensor,
    grid: Grid,
    k: int,
    reach: int = 1,
    ball: tuple[float, torch.dtype] | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest support points of each query in ``qsel`` among its cell's stencil.

    With ``ball = (radius2, dtype)`` the selection is by index instead: the ``k`` lowest support rows
    (ascending) among the stencil points whose float64 squared distance, rounded to ``dtype``, is
    ``< radius2``; -1 where fewer qualify. That test is exact, so no caller check is needed when the
    stencil holds the whole ball.

    The stencil is the (2 reach + 1)^3 block of cells around the query's cell. ``q`` holds the
    query coordinates in the compute dtype, ``q64`` in float64 (cell arithmetic), ``qcl`` cloud ids;
    ``grid.sort_support`` must have run. Returns, in the order of ``qsel``: support rows
    ``idx [F,k]`` (nearest first by float32/64 approximate distance; -1 where the stencil holds fewer
    than k points) and ``bdist [F]`` (float64), the distance from each query to the outside of its
    block (inf for clouds that lie in one cell). Support points outside the block are at least
    ``bdist`` away, which is what makes the caller's exactness check sound.
    """
    dev = q.device
    nq = qsel.shape[0]
    out_idx = torch.full((nq, k), -1, dtype=torch.long, device=dev)
    if nq == 0:
        return out_idx, torch.zeros(0, dtype=torch.float64, device=dev)

    qq64 = q64.index_select(0, qsel)
    qc = qcl.index_select(0, qsel)
    qcc = grid.cell_coords(qq64, qc)
    qkey, qperm = torch.sort(grid.keys(qcc, qc))
    ukey, ucount = torch.unique_consecutive(qkey, return_counts=True)
    ustart = torch.cumsum(ucount, 0) - ucount
    first = qperm[ustart]
    ucl = qc[first]
    ucc = qcc[first]
    h = grid.h[ucl]
    centre64 = grid.lo[ucl] + (ucc - MAX_REACH + 0.5).double() * h[:, None]

    # bdist: distance from the query to the faces of its block ((reach + 1/2) h from the cell centre).
    rel64 = qq64[qperm] - centre64.repeat_interleave(ucount, 0, output_size=nq)
    bdist = torch.empty(nq, dtype=torch.float64, device=dev)
    bdist[qperm] = (reach + 0.5) * h.repeat_interleave(ucount, 0, output_size=nq) - rel64.abs().amax(1)
    bdist = torch.where(grid.covered[qc], torch.full_like(bdist, math.inf), bdist)

    # (2r+1)^2 runs of 2r+1 consecutive z-cells cover the stencil.
    g = grid.g[ucl]
    d = torch.arange(-reach, reach + 1, device=dev)
    nr = (2 * reach + 1) ** 2
    delta = d[:, None, None] * (g[:, 1] * g[:, 2])[None, None, :] + d[None, :, None] * g[None, None, :, 2]
    mid = (ukey[None, :] + delta.reshape(nr, -1)).t().contiguous()  # [U, runs]
    starts = torch.searchsorted(grid.skey, mid - reach)
    ends = torch.searchsorted(grid.skey, mid + reach, right=True)
    lens = ends - starts
    cum = torch.cumsum(lens, 1)
    tot = cum[:, -1]
    excl = cum - lens

    # Units: at most _UNIT_QUERIES queries of one cell each, grouped by query count (no padding
    # along queries) and sorted by candidate count (little padding along candidates).
    nunit = (ucount + _UNIT_QUERIES - 1) // _UNIT_QUERIES
    ucell = torch.repeat_interleave(torch.arange(ukey.shape[0], device=dev), nunit)
    within = torch.arange(ucell.shape[0], device=dev) - (torch.cumsum(nunit, 0) - nunit)[ucell]
    unit_start = ustart[ucell] + within * _UNIT_QUERIES
    unit_count = torch.clamp(ucount[ucell] - within * _UNIT_QUERIES, max=_UNIT_QUERIES)
    unit_tot = tot[ucell]
    order = torch.argsort(unit_count * (int(tot.max()) + 1) + unit_tot)
    ucell, unit_start, unit_count, unit_tot = ucell[order], unit_start[order], unit_count[order], unit_tot[order]
    counts_val, counts_n = torch.unique_consecutive(unit_count, return_counts=True)
    tot_list = unit_tot.tolist()

    a = 0
    for qn_, gn in zip(counts_val.tolist(), counts_n.tolist(), strict=True):
        b_end = a + gn
        c0 = a
        while c0 < b_end:
            c1 = _chunk_end(tot_list, c0, b_end, qn_)
            cmax = tot_list[c1 - 1]
            if cmax > 0:
                rows = unit_start[c0:c1, None] + torch.arange(qn_, device=dev)  # [Uc, Q] cell-order positions
                qpos = qperm[rows]  # positions in qsel
                _block(q, grid, qsel, qpos, ucell[c0:c1], starts, lens, excl, tot, cmax, k, out_idx, ball)
            c0 = c1
        a = b_end
    return out_idx, bdist


def _chunk_end(tot: list[int], c0: int, end: int, nq: int) -> int:
    """End of the chunk of units starting at ``c0`` (units sorted by ascending candidate count).

    A chunk is padded to its largest candidate count, so it stops where that count would exceed
    the first one by _PAD_GROWTH, unless it is still too small to be worth a separate set of
    kernel launches; it never exceeds _BLOCK_ELEMS distance entries.
    """
    first = max(tot[c0], 1)
    c1 = bisect.bisect_right(tot, int(first * _PAD_GROWTH), c0, end)
    c1 = max(c1, min(end, c0 + _MIN_BLOCK_ELEMS // (nq * first) + 1))
    cap = max(1, _BLOCK_ELEMS // (nq * max(tot[c1 - 1], 1)))
    return min(c1, c0 + cap)


def _block(
    q: Tensor,
    grid: Grid,
    qsel: Tensor,
    qpos: Tensor,
    cells: Tensor,
    starts: Tensor,
    lens: Tensor,
    excl: Tensor,
    tot: Tensor,
    cmax: int,
    k: int,
    out_idx: Tensor,
    ball: tuple[float, torch.dtype] | None = None,
) -> None:
    """Distances of one chunk of units [Uc, Q] against their stencil candidates [Uc, C]; top-k into out_idx."""
    dev = q.device
    nu, nq = qpos.shape
    j = torch.arange(cmax, device=dev)
    # Candidate positions in the sorted support: the runs laid end to end. A running sum of the
    # jumps between consecutive runs avoids a per-entry search for the run.
    st = starts.index_select(0, cells)
    ln = lens.index_select(0, cells)
    jump = torch.zeros((nu, cmax + 1), dtype=torch.long, device=dev)
    jump.scatter_add_(1, excl.index_select(0, cells)[:, 1:], st[:, 1:] - st[:, :-1] - ln[:, :-1])
    pos = torch.cumsum(jump[:, :cmax], 1).add_(st[:, :1]).add_(j)
    pos.masked_fill_(j >= tot.index_select(0, cells)[:, None], grid.ss.shape[0] - 1)  # -> the inf sentinel
    # Direct differences (not |q|^2 - 2 q.s + |s|^2): relative accuracy even for near-duplicate
    # points far below the cell size. cdist returns distances, which order like their squares.
    sp = grid.ss.index_select(0, pos.view(-1)).view(nu, cmax, 3)
    qp = q.index_select(0, qsel.index_select(0, qpos.view(-1))).view(nu, nq, 3)
    if ball is not None:
        _first_within(grid, pos, sp, qp, qpos, k, out_idx, *ball)
        return
    dist = torch.cdist(qp, sp, compute_mode="donot_use_mm_for_euclid_dist").view(nu * nq, cmax)
    flat = qpos.view(-1)
    kk = min(k, cmax)
    # Non-negative floats order like their bit patterns, and integer topk is faster. No pre-filter
    # by the guaranteed radius: it would not shorten the rows, and the caller's check rejects
    # answers that reach beyond it anyway.
    ibits = torch.int32 if dist.dtype == torch.float32 else torch.int64
    _, arg = torch.topk(dist.view(ibits), kk, dim=1, largest=False, sorted=True)
    if nq > 1:
        unit = torch.div(torch.arange(nu * nq, device=dev), nq, rounding_mode="floor")
        arg = arg + (unit * cmax)[:, None]
    else:
        arg = arg + (torch.arange(nu, device=dev) * cmax)[:, None]
    # padded slots point at the sentinel row, whose permutation entry is -1
    res = grid.sperm.index_select(0, pos.view(-1).index_select(0, arg.view(-1))).view(nu * nq, kk)
    out_idx[:, :kk].index_copy_(0, flat, res)


def _first_within(
    grid: Grid,
    pos: Tensor,
    sp: Tensor,
    qp: Tensor,
    qpos: Tensor,
    k: int,
    out_idx: Tensor,
    radius2: float,
    dtype: torch.dtype,
) -> None:
    """Index-order selection of one chunk: the ``k`` lowest support rows inside the ball, ascending.

    ``sp [Uc, C, 3]`` and ``qp [Uc, Q, 3]`` hold the candidates and queries in the compute dtype. The
    rule (``_reference.ball_query_reference``): the float64 squared distance, summed x, y, z and rounded
    to the input ``dtype``, is ``< radius2``. The compute dtype decides every entry clearly inside or
    outside; the few within rounding distance of the boundary are recomputed in float64.
    """
    nu, cmax = pos.shape
    nq = qp.shape[1]
    d2 = None
    for a in range(3):  # x, y, z in turn: the summation order of the reference
        diff = qp[:, :, None, a] - sp[:, None, :, a]
        sq = diff.mul_(diff)  # a separate multiply and add: no fused rounding, as in the reference
        d2 = sq if d2 is None else d2.add_(sq)
    inside = d2 < radius2  # [Uc, Q, C]; padded slots hold inf and never qualify
    if not (d2.dtype == torch.float64 and dtype == torch.float64):  # float64 sums are the reference's own
        # float32 sums lie within ~1e-6 (relative) of the float64 ones; rounding to float16 moves them 1e-3
        tol = 4e-3 if dtype == torch.float16 else 1e-5
        near = torch.nonzero((d2 - radius2).abs_() <= tol * radius2)
        if near.numel():
            u, i, c = near.unbind(1)
            diff = qp[u, i].double() - sp[u, c].double()
            sq = diff * diff
            exact = (sq[:, 0] + sq[:, 1]) + sq[:, 2]
            inside[u, i, c] = exact.to(dtype).double() < radius2
    rows = grid.sperm.index_select(0, pos.view(-1)).view(nu, 1, cmax)
    big = torch.iinfo(torch.int64).max
    key = torch.where(inside, rows, big).view(nu * nq, cmax)
    kk = min(k, cmax)
    first, _ = torch.topk(key, kk, dim=1, largest=False, sorted=True)
    res = torch.where(first == big, -1, first)
    out_idx[:, :kk].index_copy_(0, qpos.view(-1), res)
