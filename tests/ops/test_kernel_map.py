"""kernel_map against the dict-based kernel_map_reference (as sets of pairs per kernel offset)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pcbench.ops import kernel_map
from pcbench.ops._reference import kernel_map_reference, kernel_offsets
from pcbench.ops.sparse import kernel_offsets as fast_offsets


def _coords(gen: torch.Generator, lengths: list[int], extent: int, lo: int = 0) -> torch.Tensor:
    """Unique random grid coordinates for clouds of (at most) the given sizes, sorted like voxelize output."""
    rows = []
    for b, n in enumerate(lengths):
        xyz = torch.randint(lo, lo + extent, (n, 3), generator=gen)
        rows.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    c = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.long)
    return torch.unique(c, dim=0)


def _coarsen(c: torch.Tensor, s: int) -> torch.Tensor:
    return torch.unique(torch.cat([c[:, :1], torch.div(c[:, 1:], s, rounding_mode="floor")], 1), dim=0)


def _assert_same(fast: list, ref: list) -> None:
    assert len(fast) == len(ref)
    for (fi, fj), (ri, rj) in zip(fast, ref, strict=True):
        assert fi.dtype == torch.long and fj.dtype == torch.long
        assert fi.shape == fj.shape
        assert set(zip(fi.tolist(), fj.tolist(), strict=True)) == set(zip(ri.tolist(), rj.tolist(), strict=True))
        assert len(set(zip(fi.tolist(), fj.tolist(), strict=True))) == fi.numel()  # no duplicate pairs
        if fj.numel() > 1:
            assert bool((fj[1:] >= fj[:-1]).all())  # pairs sorted by output row, as documented


@pytest.mark.parametrize(("k", "s", "d"), list(itertools.product((1, 2, 3), (1, 2), (1, 2))))
def test_matches_reference_ragged_batch(gen: torch.Generator, k: int, s: int, d: int) -> None:
    # Ragged: clouds of very different sizes, one empty (cloud 2), negative coordinates included.
    c = _coords(gen, [150, 20, 0, 90], extent=9, lo=-4)
    out = _coarsen(c, s) if s > 1 else c
    _assert_same(kernel_map(c, out, k, s, d), kernel_map_reference(c, out, k, s, d))


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_offsets_order_matches_reference(k: int) -> None:
    assert fast_offsets(k).tolist() == [list(t) for t in kernel_offsets(k)]


def test_unrelated_out_coords_and_unsorted_input(gen: torch.Generator) -> None:
    # out_coords need not be derived from in_coords; in_coords need not be sorted.
    c = _coords(gen, [200, 200], extent=7)
    c = c[torch.randperm(c.shape[0], generator=gen)]
    out = _coords(gen, [30, 60], extent=4)
    for k, s in ((3, 2), (2, 1), (5, 1)):
        _assert_same(kernel_map(c, out, k, s, 1), kernel_map_reference(c, out, k, s, 1))


def test_duplicate_inputs_map_to_last_row() -> None:
    c = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2], [0, 1, 1, 1]])
    out = torch.tensor([[0, 1, 1, 1]])
    _assert_same(kernel_map(c, out, 3), kernel_map_reference(c, out, 3))


def test_large_and_far_coordinates(gen: torch.Generator) -> None:
    # Huge coordinate values (e.g. millimetre grids or un-centred scans): the key box is relative, no overflow.
    c = _coords(gen, [100, 100], extent=6, lo=10**9)
    out = _coarsen(c, 2)
    _assert_same(kernel_map(c, out, 3, 2, 1), kernel_map_reference(c, out, 3, 2, 1))
    far = torch.tensor([[0, -(2**40), 0, 0], [0, 2**40, 2**40, 2**40]])
    with pytest.raises(ValueError, match="too large for int64"):
        kernel_map(far, far, 3)


def test_empty_inputs() -> None:
    e = torch.zeros(0, 4, dtype=torch.long)
    c = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    for a, b in ((e, c), (c, e), (e, e)):
        res = kernel_map(a, b, 3)
        assert len(res) == 27
        assert all(i.numel() == 0 and j.numel() == 0 and i.dtype == torch.long for i, j in res)


def test_int32_coords(gen: torch.Generator) -> None:
    c = _coords(gen, [80], extent=6)
    _assert_same(kernel_map(c.int(), c.int(), 3), kernel_map_reference(c, c, 3))


def test_errors() -> None:
    c = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"in_coords must have shape \[\*, 4\].*prepend the cloud index"):
        kernel_map(c[:, :3], c, 3)
    with pytest.raises(ValueError, match="out_coords must be an integer tensor.*long"):
        kernel_map(c, c.float(), 3)
    with pytest.raises(ValueError, match="kernel_size must be a positive int, got 0"):
        kernel_map(c, c, 0)
    with pytest.raises(ValueError, match="stride must be a positive int, got 1.5"):
        kernel_map(c, c, 3, stride=1.5)
    with pytest.raises(ValueError, match="dilation must be a positive int, got -1"):
        kernel_map(c, c, 3, dilation=-1)
    with pytest.raises(ValueError, match=r"cloud index\) must be >= 0"):
        kernel_map(torch.tensor([[-1, 0, 0, 0]]), c, 3)
    with pytest.raises(ValueError, match="in_coords must be a torch.Tensor"):
        kernel_map([[0, 0, 0, 0]], c, 3)
