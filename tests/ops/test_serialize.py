"""serialize: z-order / Hilbert codes against per-point references and curve properties."""

from __future__ import annotations

import pytest
import torch

from pcbench.ops import serialize
from pcbench.ops._reference import serialize_reference
from pcbench.ops.serialize import ORDERS


def _cube(k: int) -> torch.Tensor:
    ax = torch.arange(1 << k)
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("depth", [1, 5, 16, 20])
def test_matches_reference_ragged(order: str, depth: int, gen: torch.Generator) -> None:
    lengths = [300, 0, 1, 450, 0]
    g = torch.randint(0, 1 << depth, (sum(lengths), 3), generator=gen)
    g[:5] = 0  # the origin and duplicates
    g[5] = (1 << depth) - 1  # the far corner
    g[6] = g[7]
    off = torch.tensor(lengths).cumsum(0)
    got = serialize(g, off, order, depth=depth)
    assert got.dtype == torch.int64 and got.shape == (sum(lengths),)
    assert torch.equal(got, serialize_reference(g, off, order, depth))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
def test_integer_dtypes(dtype: torch.dtype, gen: torch.Generator) -> None:
    g = torch.randint(0, 200, (100, 3), generator=gen)
    for order in ORDERS:
        assert torch.equal(serialize(g.to(dtype), order=order), serialize_reference(g, order=order))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("depth_extra", [0, 3])
def test_hilbert_is_a_continuous_bijection_on_a_cube(k: int, depth_extra: int) -> None:
    g = _cube(k)
    code = serialize(g, order="hilbert", depth=k + depth_extra)
    # bijection onto 0 .. 8**k - 1: the curve's first 8**k cells are exactly the sub-cube at the origin
    assert torch.equal(torch.sort(code).values, torch.arange(8**k))
    walk = g[torch.argsort(code)]
    step = (walk[1:] - walk[:-1]).abs()
    assert bool((step.sum(1) == 1).all()), "consecutive Hilbert codes must be face-adjacent cells"
    assert torch.equal(walk[0], torch.zeros(3, dtype=torch.long))


def test_hilbert_trans_is_hilbert_of_swapped_axes(gen: torch.Generator) -> None:
    g = torch.randint(0, 1000, (500, 3), generator=gen)
    assert torch.equal(serialize(g, order="hilbert-trans"), serialize(g[:, [1, 0, 2]], order="hilbert"))
    assert torch.equal(serialize(g, order="z-trans"), serialize(g[:, [1, 0, 2]], order="z"))


def test_z_order_bits_and_monotonicity() -> None:
    # a single set bit b on axis a lands on bit 3b + (2 - a)
    for axis in range(3):
        for b in range(16):
            g = torch.zeros(1, 3, dtype=torch.long)
            g[0, axis] = 1 << b
            assert int(serialize(g, order="z")) == 1 << (3 * b + 2 - axis)
    # monotone in each coordinate with the others fixed
    g = _cube(3)
    code = serialize(g, order="z").reshape(8, 8, 8)
    for dim in range(3):
        assert bool((code.diff(dim=dim) > 0).all())
    assert torch.equal(torch.sort(code.flatten()).values, torch.arange(512))


def test_cloud_index_in_high_bits_groups_clouds(gen: torch.Generator) -> None:
    lengths = torch.tensor([40, 0, 25, 60])
    off = lengths.cumsum(0)
    g = torch.randint(0, 1 << 16, (int(off[-1]), 3), generator=gen)
    for order in ORDERS:
        code = serialize(g, off, order)
        cloud = torch.repeat_interleave(torch.arange(4), lengths)
        assert torch.equal(code >> 48, cloud)
        # sorting by code keeps every cloud contiguous and in offset order
        assert bool((cloud[torch.argsort(code)].diff() >= 0).all())
        # each cloud's curve part equals serializing that cloud alone
        start = 0
        for b, n in enumerate(lengths.tolist()):
            alone = serialize(g[start : start + n], order=order)
            assert torch.equal(code[start : start + n] - (b << 48), alone)
            start += n


def test_empty_and_single() -> None:
    assert serialize(torch.zeros(0, 3, dtype=torch.long)).shape == (0,)
    assert serialize(torch.zeros(0, 3, dtype=torch.long), torch.tensor([0, 0]), "hilbert").shape == (0,)
    assert int(serialize(torch.zeros(1, 3, dtype=torch.long), order="hilbert")) == 0


def test_bad_inputs() -> None:
    g = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="order must be one of"):
        serialize(g, order="peano")
    with pytest.raises(ValueError, match="non-negative, got minimum -1"):
        serialize(torch.tensor([[0, -1, 2]]))
    with pytest.raises(ValueError, match="< 2\\*\\*depth = 65536"):
        serialize(torch.tensor([[0, 65536, 2]]))
    with pytest.raises(ValueError, match="< 2\\*\\*depth = 16"):
        serialize(torch.tensor([[0, 16, 2]]), depth=4)
    with pytest.raises(ValueError, match="integer tensor"):
        serialize(g.float())
    with pytest.raises(ValueError, match="shape \\[N, 3\\]"):
        serialize(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="depth must be an int in \\[1, 20\\]"):
        serialize(g, depth=21)
    with pytest.raises(ValueError, match="offset\\[-1\\] must equal"):
        serialize(g, torch.tensor([3]))
    with pytest.raises(ValueError, match="room for 8"):
        serialize(torch.zeros(9, 3, dtype=torch.long), torch.arange(1, 10), depth=20)
