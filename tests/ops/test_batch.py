import pytest
import torch

from pcbench.ops.batch import (
    NonFiniteError,
    PointBatch,
    all_finite,
    batch2offset,
    check_offset,
    find_nonfinite,
    lengths2offset,
    offset2batch,
    offset2lengths,
    offset2start,
)


def test_offset_roundtrip_with_empty_clouds():
    lengths = torch.tensor([3, 0, 2, 0])
    off = lengths2offset(lengths)
    assert off.tolist() == [3, 3, 5, 5]
    assert offset2lengths(off).tolist() == lengths.tolist()
    assert offset2start(off).tolist() == [0, 3, 3, 5]
    b = offset2batch(off)
    assert b.tolist() == [0, 0, 0, 2, 2]
    assert batch2offset(b, num_clouds=4).tolist() == off.tolist()


def test_a_built_batch_knows_its_cloud_size_bounds_and_moving_it_reads_nothing_back():
    from torch.utils._python_dispatch import TorchDispatchMode

    from pcbench.ops.batch import length_bounds

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in {"_local_scalar_dense", "nonzero", "equal", "is_nonzero"}:
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    pb = PointBatch(coord=torch.rand(7, 3), feat=torch.rand(7, 2), offset=torch.tensor([3, 7]),
                    label=torch.tensor([1, 0]), inverse=torch.arange(7))
    ragged = PointBatch(coord=torch.rand(9, 3), feat=torch.rand(9, 2), offset=torch.tensor([3, 3, 9, 9]))
    with Reads() as reads:
        # the validation's single host read at construction also gave the bounds (the loader builds batches on
        # the CPU, so on a GPU the model's first level needs no read)
        assert length_bounds(pb.offset, ragged.offset) == [(3, 4), (0, 6)]
        moved = pb.to("cpu", non_blocking=True).pin_memory() if torch.cuda.is_available() else pb.to("cpu")
        assert length_bounds(moved.offset) == [(3, 4)]  # carried over, not read again
    assert reads.names == []  # validation ran when the batch was built; a move does not repeat its host reads
    for name in ("coord", "feat", "offset", "label", "inverse"):
        assert torch.equal(getattr(moved, name), getattr(pb, name))
    assert moved.instance is None and moved.inverse_offset is None
    moved.offset[0] = 2  # an in-place edit of the moved offset invalidates what was carried
    assert length_bounds(moved.offset) == [(2, 5)]


@pytest.mark.parametrize(
    ("offset", "match"),
    [
        (torch.tensor([3, 2, 5]), "non-decreasing"),
        (torch.tensor([-1, 5]), "non-decreasing"),
        (torch.tensor([2, 4]), "must equal the number of points 5"),
        (torch.tensor([2.0, 5.0]), "integer"),
        (torch.tensor([[5]]), "1-D"),
    ],
)
def test_bad_offsets_are_named(offset, match):
    with pytest.raises(ValueError, match=match):
        check_offset("offset", offset, 5)


def test_point_batch_validates_and_moves():
    pb = PointBatch(coord=torch.rand(5, 3), feat=torch.rand(5, 2), offset=torch.tensor([2, 5]))
    assert pb.num_clouds == 2 and pb.num_points == 5
    assert pb.to("cpu").coord.shape == (5, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        PointBatch(coord=torch.tensor([[0.0, float("nan"), 0.0]]), feat=torch.zeros(1, 1), offset=torch.tensor([1]))
    with pytest.raises(ValueError, match="feat must be"):
        PointBatch(coord=torch.rand(5, 3), feat=torch.rand(4, 2), offset=torch.tensor([5]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_point_batch_refuses_non_finite_features_naming_the_clouds(bad, dtype):
    coord = torch.rand(9, 3, dtype=dtype)
    feat = torch.rand(9, 2, dtype=dtype)
    offset = torch.tensor([3, 3, 6, 9])  # cloud 1 is empty
    PointBatch(coord, feat, offset)
    feat[4, 1] = bad
    feat[8, 0] = bad
    with pytest.raises(NonFiniteError, match=r"PointBatch.feat contains NaN or inf in cloud\(s\) \[2, 3\].*row 4, column 1"):
        PointBatch(coord, feat, offset)
    with pytest.raises(ValueError, match="feat must be a floating tensor"):
        PointBatch(coord, torch.ones(9, 2, dtype=torch.long), offset)


def test_finite_check_handles_sums_that_overflow():
    # Finite entries whose sum overflows: the cheap sum test must fall back to the exact one.
    big = torch.full((4, 3), 3e38)
    assert all_finite(big) and not bool(torch.isfinite(big.sum()))
    PointBatch(big, big.clone(), torch.tensor([4]))
    half = torch.full((10, 2), 6e4, dtype=torch.float16)
    assert all_finite(half)
    big[3, 2] = float("nan")
    assert not all_finite(big)
    assert find_nonfinite(big, torch.tensor([1, 4])) == ([1], 3, 2)
    assert all_finite(torch.zeros(0, 3))
