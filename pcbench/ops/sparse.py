"""Kernel maps for pure-torch sparse convolution.

A kernel map lists, for every kernel offset, which input voxel feeds which output voxel. Coordinates
are integer ``[*, 4]`` rows ``(cloud, x, y, z)``, each on its own level's grid. Lookups fold the cloud
index and the three axes into one int64 key (a mixed-radix number over the joint bounding box), sort
the input keys once and answer every offset's shifted queries with one ``searchsorted``: no hashing
library, no Python loop over points or clouds.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from ._dispatch import on_gpu_path

__all__ = ["coords_key", "kernel_map", "kernel_maps", "kernel_offsets"]

# Queries per searchsorted call: bounds the [chunk] int64 temporaries to ~32 MiB each.
_CHUNK = 1 << 22
# Keys must stay below 2**62 so that adding one offset delta can never overflow int64.
_KEY_LIMIT = 1 << 62


def kernel_offsets(kernel_size: int, device: torch.device | str | None = None) -> Tensor:
    """Kernel offsets [K, 3] int64 in conv3d weight order (dx slowest): -(k//2)..k//2 (odd k) or 0..k-1 (even k)."""
    r = range(-(kernel_size // 2), kernel_size // 2 + 1) if kernel_size % 2 else range(kernel_size)
    return torch.tensor(list(itertools.product(r, r, r)), dtype=torch.long, device=device).reshape(-1, 3)


def _check_int(name: str, value: object, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}; {fix}")
    return value


def _check_grid(name: str, c: Tensor, values: bool = True) -> None:
    if not isinstance(c, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [*, 4] (cloud, x, y, z), got {type(c).__name__}")
    if c.dim() != 2 or c.shape[1] != 4:
        raise ValueError(
            f"{name} must have shape [*, 4] (cloud, x, y, z), got {list(c.shape)}; "
            "prepend the cloud index as column 0 (e.g. the output of pcbench.ops.voxelize)"
        )
    if c.dtype.is_floating_point or c.dtype == torch.bool or c.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {c.dtype}; use integer grid coordinates (.long())")
    if values and c.numel() and bool((c[:, 0] < 0).any()):
        raise ValueError(f"{name}[:, 0] (cloud index) must be >= 0, got min {int(c[:, 0].min())}")


def coords_key(coords: Tensor, lo: Tensor, size: Tensor) -> Tensor:
    """Mixed-radix int64 key [V] of (cloud, x, y, z) rows: ((b * Sx + x') * Sy + y') * Sz + z', x' = x - lo.

    Keys sort like the rows (lexicographically), so sorted ``voxelize`` output gives sorted keys.
    """
    c = coords.long()
    k = c[:, 0] * size[0] + (c[:, 1] - lo[0])
    k = k * size[1] + (c[:, 2] - lo[1])
    return k * size[2] + (c[:, 3] - lo[2])


def kernel_map(
    in_coords: Tensor, out_coords: Tensor, kernel_size: int, stride: int = 1, dilation: int = 1, *,
    validate: bool = True,
) -> list[tuple[Tensor, Tensor]]:
    """Per kernel offset ``(in_idx, out_idx)`` pairs for a sparse convolution, in conv3d weight order.

    in_coords: [N, 4] int (cloud, x, y, z) on the input level's grid (rows unique within the cloud).
    out_coords: [M, 4] int on the output level's grid (``stride`` times coarser).
    Returns a list of K = kernel_size**3 tuples of int64 [P_k] tensors, pairs sorted by ``out_idx``.
    If ``(in_idx[p], out_idx[p]) = (i, j)`` for offset d, then ``in_coords[i] == (b_j, out_coords[j].xyz *
    stride + d * dilation)``, where d runs over -(k//2)..k//2 (odd k) or 0..k-1 (even k), dx slowest.
    Output voxels with no input at an offset simply have no pair there (no -1 padding). Duplicate input
    rows map to the last one, as a dict would. ``validate=False`` skips the cloud-index check (a host sync) for
    coordinates already checked (e.g. built by ``voxelize``). All offsets are searched at once: the device is
    read once per call (pair counts per offset, with the key-range check), not once per offset;
    ``kernel_maps`` builds several maps with one read for all.
    """
    return kernel_maps([(in_coords, out_coords, kernel_size, stride, dilation)], validate=validate)[0]


def kernel_maps(
    specs: Sequence[tuple[Tensor, Tensor, int, int, int]], *, validate: bool = True,
) -> list[list[tuple[Tensor, Tensor]]]:
    """``kernel_map(in_coords, out_coords, kernel_size, stride, dilation)`` for every spec, one host read in all.

    Each map's searches run on the device first; the pair counts of every offset of every map (and the
    key-range checks) then reach the host in one ``tolist``, which sizes every ``nonzero_static``. A model that
    knows its convolutions (e.g. all the maps of a level, or of a whole pyramid) reads the device once.
    """
    jobs = []
    for in_coords, out_coords, kernel_size, stride, dilation in specs:
        _check_grid("in_coords", in_coords, validate)
        _check_grid("out_coords", out_coords, validate)
        _check_int("kernel_size", kernel_size,
                   "use e.g. 3 (odd: centred) or 2 (even: 0..k-1, for down/up-sampling)")
        _check_int("stride", stride, "use 1 (same grid) or the coarsening factor between the two levels, e.g. 2")
        _check_int("dilation", dilation, "use 1 for a dense kernel footprint")
        if in_coords.device != out_coords.device:
            raise ValueError(
                f"in_coords is on {in_coords.device} but out_coords is on {out_coords.device}; move them with "
                ".to(device)"
            )
        jobs.append(_search(in_coords, out_coords, kernel_size, stride, dilation))
    reads = [t for job in jobs if job["counts"] for t in (job["span"], *job["counts"])]
    host = torch.cat([t.double().reshape(-1) for t in reads]).tolist() if reads else []  # the one host read
    pos, result = 0, []
    for job in jobs:
        K = job["K"]
        if not job["counts"]:
            empty = torch.zeros(0, dtype=torch.long, device=job["device"])
            result.append([(empty, empty) for _ in range(K)])
            continue
        span = host[pos:pos + 4]
        pos += 4
        if span[0] * span[1] * span[2] * span[3] >= _KEY_LIMIT:
            raise ValueError(
                f"in_coords/out_coords span a grid of {[int(x) for x in span[:3]]} cells x {int(span[3])} clouds, "
                "too large for int64 keys; use a coarser voxel size or re-centre each cloud's coordinates"
            )
        parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(K)]
        for (a, pos_t, hit) in job["chunks"]:
            counts = [int(c) for c in host[pos:pos + K]]
            pos += K
            # Row-major: offset by offset, output rows ascending within each. Sized by the counts read above,
            # so no further host read (nonzero would wait for the device to size its output).
            k_j = torch.nonzero_static(hit, size=sum(counts))
            i_all = pos_t[k_j[:, 0], k_j[:, 1]]
            if job["perm"] is not None:
                i_all = job["perm"][i_all]
            j_all = k_j[:, 1] + a
            for k, (i_k, j_k) in enumerate(zip(i_all.split(counts), j_all.split(counts), strict=True)):
                parts[k].append((i_k, j_k))
        maps: list[tuple[Tensor, Tensor]] = []
        for chunks in parts:
            if len(chunks) == 1:
                maps.append(chunks[0])
            else:
                maps.append((torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])))
        result.append(maps)
    return result


def _search(in_coords: Tensor, out_coords: Tensor, kernel_size: int, stride: int, dilation: int) -> dict:
    """Device half of one kernel map: every offset's query keys searched in the sorted input keys."""
    device = in_coords.device
    offs = kernel_offsets(kernel_size, device) * dilation
    K = offs.shape[0]
    n, m = in_coords.shape[0], out_coords.shape[0]
    job = {"K": K, "device": device, "counts": [], "chunks": [], "perm": None, "span": None}
    if n == 0 or m == 0:
        return job
    ic = in_coords.long()
    base = out_coords.long().clone()
    base[:, 1:] *= stride
    # Joint bounding box of the inputs and of every possible query so that key(query + d) = key(query) + delta(d).
    # It stays on the device (the keys need no host radix); its span is checked after the one read.
    dmin, dmax = offs.min(0).values, offs.max(0).values
    lo = torch.minimum(ic[:, 1:].min(0).values, base[:, 1:].min(0).values + dmin)
    hi = torch.maximum(ic[:, 1:].max(0).values, base[:, 1:].max(0).values + dmax)
    size = hi - lo + 1
    job["span"] = torch.cat([size, torch.maximum(ic[:, 0].max(), base[:, 0].max())[None] + 1])
    in_key = coords_key(ic, lo, size)
    # Keys from voxelize are sorted already. The CPU path asks (a cheap read there); the GPU path sorts anyway
    # (a stable sort is the identity on sorted keys) rather than stall on the answer.
    if on_gpu_path(in_key) or (n > 1 and bool((in_key[1:] < in_key[:-1]).any())):
        in_key, job["perm"] = torch.sort(in_key, stable=True)
    q_key = coords_key(base, lo, size)
    delta = (offs[:, 0] * size[1] + offs[:, 1]) * size[2] + offs[:, 2]
    step = max(1, _CHUNK // K)
    for a in range(0, m, step):
        q = q_key[a:a + step][None, :] + delta[:, None]  # [K, c]: every offset of the chunk at once
        # right=True then -1 lands on the LAST equal key: with a stable sort that is the last duplicate row.
        pos = torch.searchsorted(in_key, q, right=True).sub_(1).clamp_(min=0)
        hit = in_key[pos] == q
        job["counts"].append(hit.sum(1))
        job["chunks"].append((a, pos, hit))
    return job
