"""Packed point batches: coordinates of all clouds concatenated, with cumulative end offsets.

A batch of B clouds with n_0, ..., n_{B-1} points is stored as ``coord [N, 3]`` (N = sum n_b) and
``offset [B]`` with ``offset[b] = n_0 + ... + n_b`` (int64, non-decreasing, ``offset[-1] == N``).
Cloud b owns rows ``offset[b-1]:offset[b]`` (with offset[-1] read as 0). Empty clouds are allowed.
Every op takes ``offset=None`` to mean "one cloud holding all rows".
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "PointBatch",
    "all_finite",
    "batch2offset",
    "check_coords",
    "check_offset",
    "check_same_device",
    "find_nonfinite",
    "known_length_bounds",
    "length_bounds",
    "lengths2offset",
    "offset2batch",
    "offset2lengths",
    "offset2start",
    "resolve_offset",
]


def check_coords(name: str, x: Tensor, dim: int | None = 3, finite: bool = True) -> None:
    """Raise ValueError unless ``x`` is a floating tensor of shape [N, dim], finite unless ``finite=False``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or (dim is not None and x.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, C]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}; reshape or pack the clouds first")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}; convert with .float()")
    if finite and not all_finite(x):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf in {bad} rows; drop or repair those points first")


def all_finite(x: Tensor) -> bool:
    """Whether every entry of the floating tensor ``x`` is finite.

    A sum is finite only if every term is (NaN and inf propagate through addition), and summing is
    ~20x cheaper than materialising ``isfinite(x)``; only a sum that overflows pays for the exact test.
    """
    if x.numel() == 0:
        return True
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(x.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(x).all())


def find_nonfinite(x: Tensor, offset: Tensor) -> tuple[list[int], int, int]:
    """(clouds holding a NaN/inf row of ``x`` [N, C], first such row, its first bad column); ([], -1, -1) if none."""
    bad_rows = torch.nonzero(~torch.isfinite(x).all(dim=1)).squeeze(1)
    if bad_rows.numel() == 0:
        return [], -1, -1
    clouds = torch.unique(torch.searchsorted(offset.long(), bad_rows, right=True)).tolist()
    row = int(bad_rows[0])
    col = int(torch.nonzero(~torch.isfinite(x[row]))[0, 0])
    return clouds, row, col


class NonFiniteError(ValueError):
    """A PointBatch field holds NaN or inf; ``clouds`` lists the affected cloud indices (batch positions)."""

    def __init__(self, message: str, field: str, clouds: list[int]) -> None:
        super().__init__(message)
        self.field = field
        self.clouds = clouds


def check_offset(name: str, offset: Tensor, n: int, values: bool = True) -> None:
    """Raise ValueError unless ``offset`` is a 1-D integer tensor, non-decreasing, ending at ``n``.

    ``values=False`` checks only type and shape: the value checks read the tensor on the host (a device sync).
    """
    if not isinstance(offset, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of cumulative end indices, got {type(offset).__name__}")
    if offset.dim() != 1 or offset.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [B], got shape {list(offset.shape)}")
    if offset.dtype.is_floating_point or offset.dtype == torch.bool or offset.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {offset.dtype}; use .long()")
    if not values:
        return
    o = offset.long()
    # One host read for all value checks: the offset is non-decreasing from 0 exactly when no cloud size (first
    # differences, the first from 0) is negative. The sizes read are remembered for ``length_bounds``, so a
    # checked batch (a PointBatch, built by the loader on the CPU) reaches the model with known bounds.
    lengths = offset2lengths(o)
    lo, hi, last = torch.stack([lengths.min(), lengths.max(), o[-1]]).tolist()
    if lo < 0:
        raise ValueError(
            f"{name} must be non-decreasing cumulative end indices (e.g. [n0, n0+n1, ...]), got {o.tolist()[:8]}"
        )
    if last != n:
        raise ValueError(f"{name}[-1] must equal the number of points {n}, got {last}")
    remember_length_bounds(offset, lo, hi)


def check_same_device(**tensors: Tensor | None) -> None:
    """Raise ValueError when the given tensors live on different devices."""
    devs = {k: v.device for k, v in tensors.items() if isinstance(v, Tensor)}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"tensors must be on one device, got {desc}; move them with .to(device)")


def resolve_offset(name: str, offset: Tensor | None, n: int, device: torch.device, validate: bool = True) -> Tensor:
    """Validate ``offset`` (or build the single-cloud ``[n]``) and return it as int64 on ``device``.

    ``validate=False`` skips the value checks (no host sync): for offsets already checked, e.g. a
    ``PointBatch``'s or one an op derived from it.
    """
    if offset is None:
        return torch.tensor([n], dtype=torch.long, device=device)
    check_offset(name, offset, n, values=validate)
    if offset.device != device:
        raise ValueError(f"{name} is on {offset.device} but the points are on {device}; move it with .to(device)")
    # the same tensor when already int64 (``.long()`` is then a no-op in eager mode, but a new tensor under
    # dynamo, which would lose the remembered length bounds)
    return offset if offset.dtype == torch.long else offset.long()


_BOUNDS = "_pcbench_length_bounds"


def length_bounds(*offsets: Tensor) -> list[tuple[int, int]]:
    """(smallest, largest) cloud size of each offset [B]: at most one host read for all, none for known ones.

    The pair is remembered on the offset tensor with its version counter (every in-place write bumps it, so a
    modified offset is read again): the searches, samplings and poolings of one resolution level read its
    sizes once. ``remember_length_bounds`` records bounds an op derived without reading the device.
    """
    known: dict[int, tuple[int, int]] = {}
    missing: list[Tensor] = []
    for o in offsets:
        memo = known_length_bounds(o)
        if memo is not None:
            known[id(o)] = memo
        elif id(o) not in known and all(m is not o for m in missing):
            missing.append(o)
    if missing:
        stats = torch.stack([torch.stack(list(torch.aminmax(offset2lengths(o)))) for o in missing]).tolist()
        for o, (lo, hi) in zip(missing, stats, strict=True):
            remember_length_bounds(o, int(lo), int(hi))
            known[id(o)] = (int(lo), int(hi))
    return [known[id(o)] for o in offsets]


def known_length_bounds(offset: Tensor) -> tuple[int, int] | None:
    """The (smallest, largest) cloud size remembered on ``offset``, or None when unknown or written since."""
    memo = getattr(offset, _BOUNDS, None)
    if memo is None:
        return None
    # dynamo cannot read version counters (reading one breaks the graph): traced code trusts the memo, which is
    # sound because pcbench never writes to an offset in place; eager code compares versions, and a memo recorded
    # while tracing (version None) is read again there.
    if torch.compiler.is_compiling() or memo[0] == offset._version:
        return memo[1]
    return None


def remember_length_bounds(offset: Tensor, lo: int, hi: int) -> None:
    """Record the (smallest, largest) cloud size of ``offset`` (known without a host read) for ``length_bounds``."""
    version = None if torch.compiler.is_compiling() else offset._version
    setattr(offset, _BOUNDS, (version, (int(lo), int(hi))))


def offset2lengths(offset: Tensor) -> Tensor:
    """Per-cloud point counts [B] from cumulative end offsets [B]."""
    return torch.diff(offset.long(), prepend=offset.new_zeros(1, dtype=torch.long))


def offset2start(offset: Tensor) -> Tensor:
    """Per-cloud start index [B] (``offset`` shifted right by one, starting at 0)."""
    o = offset.long()
    return torch.cat([o.new_zeros(1), o[:-1]])


def lengths2offset(lengths: Tensor) -> Tensor:
    """Cumulative end offsets [B] from per-cloud counts [B]."""
    return torch.cumsum(lengths.long(), dim=0)


def offset2batch(offset: Tensor, num_points: int | None = None) -> Tensor:
    """Cloud index of every point [N] (int64) from offsets [B]; if ``batch[i] = b`` then row i is in cloud b.

    ``num_points`` (N, when the caller knows it, e.g. from a tensor's shape) sizes the result without
    reading ``offset[-1]`` on the host (a device sync); it must equal ``offset[-1]``.
    """
    lengths = offset2lengths(offset)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offset.device), lengths,
                                   output_size=num_points)


def batch2offset(batch: Tensor, num_clouds: int | None = None) -> Tensor:
    """Offsets [B] from a sorted cloud index per point [N]; ``num_clouds`` keeps trailing empty clouds."""
    if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted (points of one cloud contiguous); sort the points by cloud first")
    b = num_clouds if num_clouds is not None else (int(batch.max()) + 1 if batch.numel() else 1)
    return lengths2offset(torch.bincount(batch.long(), minlength=b))


@dataclass
class PointBatch:
    """A packed batch of point clouds: the one representation shared by data, models and the trainer.

    coord: [N, 3] float point coordinates.
    feat: [N, C] float per-point input features (colour, normals, coordinates, ...).
    offset: [B] int64 cumulative end indices (see module docstring).
    label: [N] per-point labels (segmentation, ignore index -1) or [B] per-cloud labels (classification).
    instance: optional [N] per-point instance ids (-1 = none).
    inverse: optional [M] index into the N points for each of the M original full-resolution points,
        so that per-point predictions can be scattered back (``pred_full = pred[inverse]``).
    inverse_offset: optional [B] offsets of the full-resolution points matching ``inverse``.
    """

    coord: Tensor
    feat: Tensor
    offset: Tensor
    label: Tensor | None = None
    instance: Tensor | None = None
    inverse: Tensor | None = None
    inverse_offset: Tensor | None = None

    def __post_init__(self) -> None:
        check_coords("PointBatch.coord", self.coord, finite=False)
        if not isinstance(self.feat, Tensor) or self.feat.dim() != 2 or self.feat.shape[0] != self.coord.shape[0]:
            got = list(self.feat.shape) if isinstance(self.feat, Tensor) else type(self.feat).__name__
            raise ValueError(f"PointBatch.feat must be [N, C] with N={self.coord.shape[0]}, got {got}")
        if not self.feat.is_floating_point():
            raise ValueError(f"PointBatch.feat must be a floating tensor, got {self.feat.dtype}; convert with .float()")
        check_offset("PointBatch.offset", self.offset, self.coord.shape[0])
        # One NaN in a training batch reaches every cloud through BatchNorm and stays in its running
        # statistics, so later clean batches give NaN too: refuse it here, naming the clouds.
        for name in ("coord", "feat"):
            x = getattr(self, name)
            if not all_finite(x):
                clouds, row, col = find_nonfinite(x, self.offset)
                raise NonFiniteError(
                    f"PointBatch.{name} contains NaN or inf in cloud(s) {clouds[:8]} (batch positions; first at "
                    f"row {row}, column {col}: {x[row, col].item()}); drop or repair those samples before batching",
                    name, clouds)

    @property
    def num_clouds(self) -> int:
        """Number of clouds B."""
        return int(self.offset.numel())

    @property
    def num_points(self) -> int:
        """Total number of points N."""
        return int(self.coord.shape[0])

    def lengths(self) -> Tensor:
        """Per-cloud point counts [B]."""
        return offset2lengths(self.offset)

    def batch_index(self) -> Tensor:
        """Cloud index per point [N]."""
        return offset2batch(self.offset, self.num_points)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PointBatch:
        """Copy every tensor field to ``device``.

        The fields were validated when this batch was built; moving them changes no value, so they are not
        checked again (the checks read the device: host syncs at every training step on a GPU). The offset's
        known cloud-size bounds (``length_bounds``) travel with it.
        """
        return self._moved(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PointBatch:
        """Pin every tensor field (DataLoader ``pin_memory=True`` calls this)."""
        return self._moved(lambda v: v.pin_memory())

    def _moved(self, move: Callable[[Tensor], Tensor]) -> PointBatch:
        out = copy.copy(self)  # a shallow copy: __post_init__ (the validation) does not run again
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                setattr(out, f.name, move(v))
        memo = known_length_bounds(self.offset)
        if memo is not None and out.offset is not self.offset:
            remember_length_bounds(out.offset, *memo)
        return out
