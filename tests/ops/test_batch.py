import pytest
import torch

from pcbench.ops.batch import (
    PointBatch,
    batch2offset,
    check_offset,
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


@pytest.mark.parametrize(
    ("offset", "match"),
    [
        (torch.tensor([3, 2, 5]), "non-decreasing"),
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
