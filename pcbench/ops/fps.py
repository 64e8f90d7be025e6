"""Exact farthest point sampling on packed batches, vectorised over all clouds at once.

The result is identical to the sequential reference (`_reference.fps_reference`): same start, same
squared distances ``((p - p_cur) ** 2).sum(-1)`` in the input dtype, ties to the lowest index. Two
engines produce it, both looping over samples once for the whole batch (never over clouds):

* dense: one padded ``[B, L]`` min-distance array, every step touches every point. Best for object
  clouds (and on GPUs, where a step is a handful of kernels).
* leaves (`_fps_cells`): points bucketed into k-d leaves with bounding boxes; a new sample can only lower
  the min-distance of leaves whose box lies within the leaf's current maximum, so an iteration touches a
  few leaves instead of the whole scene, and it tries the top 8 leaf maxima at once, keeping the prefix
  that the sequential rule would have chosen (about 7 samples per iteration on scenes).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator

import torch
from torch import Tensor

from ._dispatch import on_gpu_path
from ._fps_cells import fps_cells, fps_cells_speculative
from ._grid import unit_scale
from .batch import (
    check_coords,
    known_length_bounds,
    length_bounds,
    lengths2offset,
    offset2batch,
    offset2lengths,
    offset2start,
    remember_length_bounds,
    resolve_offset,
)

__all__ = ["farthest_point_sample", "sample_counts", "sample_offset"]

# Clouds up to this many points use the dense engine on CPU: measured crossover with the leaf engine
# (1 thread: 16k -> 4k dense 178 ms vs leaves 208 ms; 65k -> 16k dense ~3 s vs leaves 0.8 s).
DENSE_MAX_POINTS = 12288


@contextlib.contextmanager
def _one_intraop_thread(device: torch.device) -> Iterator[None]:
    """Run the sample loop with one CPU thread, restoring the setting afterwards.

    Each step is a chain of small ops; an OpenMP fork/join per op costs more than it saves and, on a
    busy machine, a descheduled worker stalls every step (measured 32 x 1024 -> 256 on a loaded 2-core
    box: 1158 ms with 2 threads vs ~20 ms of CPU time with 1).
    """
    # Traced code leaves threading to the compiled kernels (and dynamo cannot trace the thread-count calls).
    if device.type != "cpu" or torch.compiler.is_compiling() or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_n_ratio(n: int | None, ratio: float | None) -> None:
    if (n is None) == (ratio is None):
        raise ValueError(
            f"give exactly one of n (samples per cloud) or ratio (fraction of each cloud), got n={n!r}, "
            f"ratio={ratio!r}; e.g. n=1024 or ratio=0.25"
        )
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise ValueError(f"n must be an int number of samples per cloud, got {n!r}; pass e.g. n=1024")
        if n <= 0:
            raise ValueError(f"n must be a positive number of samples per cloud, got {n}; pass n >= 1")
    else:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or ratio != ratio:  # NaN; traceable
            raise ValueError(f"ratio must be a float in (0, 1], got {ratio!r}; pass e.g. ratio=0.25")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1] (fraction of each cloud to keep), got {ratio}")


def sample_counts(lengths: Tensor, n: int | None = None, ratio: float | None = None) -> Tensor:
    """Samples per cloud for FPS: ``min(n, len)`` or ``min(len, ceil(ratio * len))``; 0 for empty clouds."""
    lengths = lengths.long()
    if (n is None) == (ratio is None):
        raise ValueError("give exactly one of n (samples per cloud) or ratio (fraction of each cloud)")
    if n is not None:
        if n <= 0:
            raise ValueError(f"n must be a positive number of samples per cloud, got {n}")
        return torch.clamp(lengths, max=n)
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return torch.minimum(lengths, torch.ceil(lengths.double() * ratio).long())


def sample_offset(offset: Tensor, n: int | None = None, ratio: float | None = None, *, validate: bool = True
                  ) -> Tensor:
    """Offsets [B] of the packed FPS result for the same ``n`` / ``ratio`` (per cloud ``min(n, len)``).

    ``validate=False`` skips the offset value checks (host syncs) for an offset already checked.
    """
    _check_n_ratio(n, ratio)
    if not isinstance(offset, Tensor):
        raise ValueError(f"offset must be a torch.Tensor of cumulative end indices, got {type(offset).__name__}")
    total = (int(offset[-1]) if offset.numel() else 0) if validate else 0
    off = resolve_offset("offset", offset, total, offset.device, validate)
    out = lengths2offset(sample_counts(offset2lengths(off), n, ratio))
    memo = known_length_bounds(offset)
    if memo is not None:  # counts are monotone in the length: bounds carry over
        remember_length_bounds(out, *(_samples(v, n, ratio) for v in memo))
    return out


def _samples(length: int, n: int | None, ratio: float | None) -> int:
    """``sample_counts`` for one cloud length, on the host (the same float64 arithmetic)."""
    return min(length, n) if n is not None else min(length, math.ceil(length * float(ratio)))


def farthest_point_sample(
    xyz: Tensor, offset: Tensor | None = None, n: int | None = None, ratio: float | None = None, start: int = 0,
    *, validate: bool = True,
) -> Tensor:
    """Exact farthest point sampling of every cloud of a packed batch.

    xyz: [N, 3] float points; offset: [B] cumulative end indices (None = one cloud).
    Exactly one of ``n`` (samples per cloud, capped at the cloud size) or ``ratio`` (``ceil(ratio * len)``).
    ``start``: index inside each cloud of its first sample.
    Returns idx [S] int64 global rows, packed per cloud (counts as in ``sample_offset``): if
    ``idx[sample_offset(offset)[b-1] + j] = m`` then ``xyz[m]`` is the j-th sample of cloud b. Identical to
    the sequential reference: the next sample maximises the min squared distance to the chosen ones,
    ties go to the lowest index (so clouds with fewer distinct points than samples repeat points).
    On CPU the sample loop runs on one intra-op thread (the previous setting is restored afterwards).
    ``validate=False`` skips the finiteness and offset value checks (host syncs) for inputs already checked
    (e.g. a ``PointBatch``'s). The cloud sizes are read once per offset (``batch.length_bounds``), plus the
    sample total for ragged batches.
    """
    device = xyz.device if isinstance(xyz, Tensor) else torch.device("cpu")
    with _one_intraop_thread(device):  # validation included: its ops on [N, 3] would fork threads too
        return _farthest_point_sample(xyz, offset, n, ratio, start, validate)


def _farthest_point_sample(
    xyz: Tensor, offset: Tensor | None, n: int | None, ratio: float | None, start: int, validate: bool
) -> Tensor:
    check_coords("xyz", xyz, finite=validate)
    _check_n_ratio(n, ratio)
    off = resolve_offset("offset", offset, xyz.shape[0], xyz.device, validate)
    if isinstance(start, bool) or not isinstance(start, numbers.Integral):
        raise ValueError(f"start must be an int index inside each cloud, got {start!r}")
    lengths = offset2lengths(off)
    counts = sample_counts(lengths, n, ratio)
    # The largest cloud and the number of samples size everything below: known from the offset's bounds
    # when its clouds are all equal (object batches), else read from the device once.
    smallest, width = length_bounds(off)[0]
    if smallest == width:
        total = _samples(width, n, ratio) * off.numel()
    else:
        total = int(counts.sum())
    if width == 0:
        return torch.zeros(0, dtype=torch.long, device=xyz.device)
    if start != 0:  # start 0 lies inside every non-empty cloud: only other starts need the smallest one
        smallest = int(torch.where(lengths > 0, lengths, width).min())
        if not 0 <= start < smallest:
            raise ValueError(
                f"start must be in [0, {smallest - 1}] (an index inside every non-empty cloud; the "
                f"smallest has {smallest} points), got {start}; use start=0"
            )
    p = _at_unit_scale(xyz.detach(), off)
    starts = offset2start(off)
    if on_gpu_path(p) or width <= DENSE_MAX_POINTS:
        # sample_counts is monotone in the cloud length, so the largest cloud has the most samples
        steps = _samples(width, n, ratio)
        sel = _fps_dense(p, starts, lengths, counts, start, width, steps)
    elif p.dtype == torch.float64 or p.shape[0] >= 1 << 32:  # keys pack float32 bits and a 32-bit row
        sel = fps_cells(p, starts, lengths, counts, start)
    else:
        sel = fps_cells_speculative(p, starts, lengths, counts, start)
    return _pack(sel, counts, total)



def _at_unit_scale(p: Tensor, off: Tensor) -> Tensor:
    """``p`` with each cloud at an extreme scale multiplied by an exact power of two (``_grid.unit_scale``).

    FPS compares squared distances in the input dtype: a float32 cloud at 1e20 would see every distance as
    inf (and one at 1e-20 as 0), so every choice would become a tie won by the lowest index. Scaling a cloud
    by 2^-e multiplies all its squared distances by the same 4^-e without rounding, so the samples are those
    of the original cloud.
    """
    if not p.shape[0]:
        return p
    cloud = offset2batch(off, p.shape[0])
    m = p.new_zeros(off.numel(), 3, dtype=torch.float64).scatter_reduce_(
        0, cloud[:, None].expand(-1, 3), p.abs().to(torch.float64), "amax")
    scale = unit_scale(m, m, always=on_gpu_path(p))
    return p if scale is None else (p.to(torch.float64) * scale[cloud, None]).to(p.dtype)


def _pack(sel: Tensor, counts: Tensor, total: int) -> Tensor:
    """[B, max_count] samples -> packed [total = sum counts] (row b keeps its first counts[b] entries)."""
    counts = counts.to(sel.device)
    if total == sel.numel():  # every cloud filled its row (equal clouds): nothing to drop
        return sel.reshape(-1)
    # Flat positions b * max_count + j of the kept samples, sized on the host: no boolean-mask gather.
    end = lengths2offset(counts)
    cloud = offset2batch(end, total)
    pos = torch.arange(total, device=sel.device) - (end - counts)[cloud] + cloud * sel.shape[1]
    return sel.reshape(-1).index_select(0, pos)


def _fps_dense(p: Tensor, starts: Tensor, lengths: Tensor, counts: Tensor, start: int, width: int | None = None,
               steps: int | None = None) -> Tensor:
    """Padded engine: min-distance of every point updated every step (padding held at -inf).

    Coordinates are stored planar ``[3, B, L]`` so each step is a few long vectorised passes; the sum
    over the leading axis rounds exactly like the reference's ``.sum(-1)`` over ``[N, 3]``.
    """
    num = lengths.numel()
    width = int(lengths.max()) if width is None else width  # the callers that know them pass both (no host read)
    steps = int(counts.max()) if steps is None else steps
    dev = p.device
    col = torch.arange(width, device=dev)
    valid = col < lengths[:, None]
    rows = (starts[:, None] + col).clamp_max(max(p.shape[0] - 1, 0))
    pts = p.index_select(0, rows.view(-1)).view(num, width, 3).permute(2, 0, 1).contiguous()  # [3, B, L]
    flat = pts.view(3, -1)
    base = torch.arange(num, device=dev) * width
    mind = torch.full((num, width), math.inf, dtype=p.dtype, device=dev)
    mind.masked_fill_(~valid, -math.inf)
    cur = torch.full((num,), start, dtype=torch.long, device=dev)
    out = [cur]
    diff = torch.empty_like(pts)
    d = torch.empty(num, width, dtype=p.dtype, device=dev)
    for _ in range(1, steps):
        c = flat.index_select(1, cur + base)  # [3, B]
        torch.sub(pts, c[:, :, None], out=diff)
        diff.mul_(diff)
        torch.sum(diff, 0, out=d)
        torch.minimum(mind, d, out=mind)
        cur = torch.argmax(mind, dim=1)  # first maximum = lowest index, as in the reference
        out.append(cur)
    return torch.stack(out, 1) + starts[:, None]
