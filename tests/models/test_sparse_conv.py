"""Sparse convolution layers against torch's dense conv3d / conv_transpose3d on the same grid.

A sparse convolution is a dense convolution of the zero-filled grid, read at the output voxels. Every
case runs in float64 and compares outputs and the gradients of the input features and the weights.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pcbench.models.sparse import (
    SparseAvgPool3d,
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseGlobalPool,
    SparseMaxPool3d,
    SparseReLU,
    SparseTensor,
    devoxelize,
    downsample_coords,
    sparse_cat,
    sparse_from_points,
)

CONFIGS = [(k, s, d) for k, s, d in itertools.product((1, 2, 3), (1, 2), (1, 2)) if not (k == 1 and d == 2)]


def _grid_tensor(gen: torch.Generator, b: int, g: int, cin: int, density: float) -> tuple[SparseTensor, torch.Tensor]:
    """A random occupancy of a [b, g, g, g] grid: (SparseTensor, dense zero-filled [b, cin, g, g, g])."""
    occ = torch.rand(b, g, g, g, generator=gen) < density
    coords = occ.nonzero()  # row-major = lexicographic (cloud, x, y, z)
    feats = torch.randn(coords.shape[0], cin, generator=gen, dtype=torch.float64)
    dense = torch.zeros(b, g, g, g, cin, dtype=torch.float64)
    dense[coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]] = feats
    return SparseTensor(coords, feats, 1, b), dense.permute(0, 4, 1, 2, 3)


def _dense_conv(dense: torch.Tensor, conv: SparseConv3d) -> torch.Tensor:
    """conv3d with ME/conv3d offset conventions; padded at the far side so every sparse output has a window."""
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    lo = d * (k // 2) if k % 2 else 0
    hi = lo + d * (k - 1) + s
    w = conv.weight.reshape(k, k, k, conv.in_channels, conv.out_channels).permute(4, 3, 0, 1, 2)
    x = F.pad(dense, (lo, hi) * 3)
    return F.conv3d(x, w, conv.bias, stride=s, dilation=d)


def _read(dense_out: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    return dense_out[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]]


@pytest.mark.parametrize(("k", "s", "d"), CONFIGS)
def test_conv_matches_masked_dense_conv(gen: torch.Generator, k: int, s: int, d: int) -> None:
    x, dense = _grid_tensor(gen, b=2, g=7, cin=3, density=0.3)
    x.feats.requires_grad_(True)
    dense.requires_grad_(True)
    conv = SparseConv3d(3, 4, k, stride=s, dilation=d, bias=True).double()
    y = conv(x)
    # Output voxels: MinkowskiEngine's rule, floor(coords / stride) deduplicated.
    want_coords = torch.unique(torch.cat([x.coords[:, :1], torch.div(x.coords[:, 1:], s, rounding_mode="floor")], 1), dim=0)
    assert torch.equal(y.coords, want_coords)
    assert y.stride == s
    ref = _read(_dense_conv(dense, conv), y.coords)
    torch.testing.assert_close(y.feats, ref, rtol=1e-10, atol=1e-10)

    r = torch.randn(y.feats.shape, generator=gen, dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad((y.feats * r).sum(), (x.feats, conv.weight, conv.bias))
    ref_out = _dense_conv(dense, conv)
    upstream = torch.zeros_like(ref_out)
    upstream[y.coords[:, 0], :, y.coords[:, 1], y.coords[:, 2], y.coords[:, 3]] = r
    gd, gw_ref, gb_ref = torch.autograd.grad((ref_out * upstream).sum(), (dense, conv.weight, conv.bias))
    torch.testing.assert_close(gx, _read(gd, x.coords), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("k", "s", "d"), CONFIGS)
def test_conv_equals_conv3d_on_fully_occupied_grid(gen: torch.Generator, k: int, s: int, d: int) -> None:
    g = 6
    x, dense = _grid_tensor(gen, b=1, g=g, cin=2, density=1.1)
    assert x.num_voxels == g ** 3
    conv = SparseConv3d(2, 3, k, stride=s, dilation=d).double()
    y = conv(x)
    pad = d * (k // 2) if k % 2 else 0
    w = conv.weight.reshape(k, k, k, 2, 3).permute(4, 3, 0, 1, 2)
    ref = F.conv3d(dense, w, stride=s, padding=pad, dilation=d)  # torch's own conv, no extra padding
    n = ref.shape[-1]
    inside = (y.coords[:, 1:] < n).all(1)
    assert int(inside.sum()) == n ** 3  # every dense output position is a sparse output voxel
    torch.testing.assert_close(y.feats[inside], _read(ref, y.coords[inside]), rtol=1e-10, atol=1e-10)


def _dense_conv_transpose(dense_coarse: torch.Tensor, up: SparseConvTranspose3d, g_fine: int) -> torch.Tensor:
    k, s, d = up.kernel_size, up.stride, up.dilation
    lo = d * (k // 2) if k % 2 else 0
    w = up.weight.reshape(k, k, k, up.in_channels, up.out_channels).permute(3, 4, 0, 1, 2)
    # Extra zero cells on the far side so the un-padded output reaches every fine voxel.
    x = F.pad(dense_coarse, (0, 2) * 3)
    out = F.conv_transpose3d(x, w, up.bias, stride=s, dilation=d)
    return out[:, :, lo:lo + g_fine, lo:lo + g_fine, lo:lo + g_fine]


@pytest.mark.parametrize(("k", "s", "d"), CONFIGS)
def test_transposed_conv_matches_conv_transpose3d(gen: torch.Generator, k: int, s: int, d: int) -> None:
    g = 7
    fine, _ = _grid_tensor(gen, b=2, g=g, cin=1, density=0.35)
    coarse_coords = fine.cache.coarser(1, s) if s > 1 else fine.coords
    feats = torch.randn(coarse_coords.shape[0], 3, generator=gen, dtype=torch.float64, requires_grad=True)
    coarse = SparseTensor(coarse_coords, feats, s, 2, fine.cache)
    up = SparseConvTranspose3d(3, 2, k, stride=s, dilation=d, bias=True).double()
    y = up(coarse)
    assert y.coords is fine.coords and y.stride == 1  # exactly back onto the cached finer voxels

    gc = (g - 1) // s + 1
    dc = torch.zeros(2, gc, gc, gc, 3, dtype=torch.float64)
    dc = dc.index_put((coarse_coords[:, 0], coarse_coords[:, 1], coarse_coords[:, 2], coarse_coords[:, 3]), feats)
    dense_coarse = dc.permute(0, 4, 1, 2, 3)
    ref_out = _dense_conv_transpose(dense_coarse, up, g)
    torch.testing.assert_close(y.feats, _read(ref_out, y.coords), rtol=1e-10, atol=1e-10)

    r = torch.randn(y.feats.shape, generator=gen, dtype=torch.float64)
    gx, gw = torch.autograd.grad((y.feats * r).sum(), (feats, up.weight))
    upstream = torch.zeros_like(ref_out)
    upstream[y.coords[:, 0], :, y.coords[:, 1], y.coords[:, 2], y.coords[:, 3]] = r
    gx_ref, gw_ref = torch.autograd.grad((ref_out * upstream).sum(), (feats, up.weight))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)


def test_down_up_round_trip_shares_one_kernel_map(gen: torch.Generator) -> None:
    x, _ = _grid_tensor(gen, b=3, g=9, cin=4, density=0.2)
    down = SparseConv3d(4, 8, 2, stride=2)
    up = SparseConvTranspose3d(8, 4, 2, stride=2)
    y = down(x.replace(x.feats.float()))
    z = up(y)
    assert z.coords is x.coords and z.stride == 1 and y.stride == 2
    assert list(x.cache.kernel_maps) == [(1, 2, 2, 1)]  # the up-sampling reused the down-sampling map
    # A second stride-2 layer lands on the very same coarse voxels.
    assert SparseMaxPool3d(2, 2)(x).coords is y.coords


def test_kernel_size_one_is_linear(gen: torch.Generator) -> None:
    x, _ = _grid_tensor(gen, b=2, g=5, cin=3, density=0.4)
    conv = SparseConv3d(3, 5, 1, bias=True).double()
    lin = torch.nn.Linear(3, 5).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight[0].T)
        lin.bias.copy_(conv.bias)
    torch.testing.assert_close(conv(x).feats, lin(x.feats))
    assert not x.cache.kernel_maps  # no kernel map was needed


def test_weight_init_bound() -> None:
    conv = SparseConv3d(16, 32, 3)
    bound = 1 / (16 * 27) ** 0.5
    assert conv.weight.shape == (27, 16, 32)
    assert float(conv.weight.detach().abs().max()) <= bound
    assert float(conv.weight.detach().abs().max()) > 0.9 * bound
    up = SparseConvTranspose3d(16, 32, 2, 2)
    assert float(up.weight.detach().abs().max()) <= 1 / (32 * 8) ** 0.5


def test_pooling_against_dense(gen: torch.Generator) -> None:
    x, dense = _grid_tensor(gen, b=2, g=6, cin=3, density=0.3)
    occ = (dense != 0).any(1, keepdim=True).double()
    mx = SparseMaxPool3d(2, 2)(x)
    av = SparseAvgPool3d(2, 2)(x)
    # Dense references over occupied cells only: max with -inf at empty cells, sum / count.
    neg = torch.where(occ.bool(), dense, torch.full_like(dense, -torch.inf))
    ref_max = F.max_pool3d(neg, 2, 2)
    ref_avg = F.avg_pool3d(dense, 2, 2) / F.avg_pool3d(occ, 2, 2).clamp_min(1e-12)
    torch.testing.assert_close(mx.feats, _read(ref_max, mx.coords))
    torch.testing.assert_close(av.feats, _read(ref_avg, av.coords))


def test_global_pool_per_cloud_with_empty_cloud(gen: torch.Generator) -> None:
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [2, 5, 5, 5]])
    feats = torch.randn(3, 2, generator=gen)
    x = SparseTensor(coords, feats, 1, batch_size=4)
    mx, mean = SparseGlobalPool("max")(x), SparseGlobalPool("mean")(x)
    assert mx.shape == (4, 2)
    torch.testing.assert_close(mx[0], feats[:2].max(0).values)
    torch.testing.assert_close(mean[0], feats[:2].mean(0))
    torch.testing.assert_close(mx[2], feats[2])
    assert torch.equal(mx[1], torch.zeros(2)) and torch.equal(mean[3], torch.zeros(2))
    with pytest.raises(ValueError, match="reduce must be"):
        SparseGlobalPool("sum")


def test_feature_modules_and_cat(gen: torch.Generator) -> None:
    x, _ = _grid_tensor(gen, b=2, g=5, cin=4, density=0.5)
    x = x.replace(x.feats.float())
    bn = SparseBatchNorm(4).train()
    y = SparseReLU()(bn(x))
    ref = torch.relu(torch.nn.functional.batch_norm(x.feats, None, None, training=True, eps=1e-5))
    torch.testing.assert_close(y.feats, ref)
    assert y.coords is x.coords and y.cache is x.cache
    assert sparse_cat(x, y).feats.shape == (x.num_voxels, 8)
    coarse = SparseConv3d(4, 4, 2, 2)(x)
    with pytest.raises(ValueError, match="same voxels"):
        sparse_cat(x, coarse)


def test_voxelize_devoxelize_round_trip(gen: torch.Generator) -> None:
    # Two clouds; several points share voxels, and cloud 1 reuses cloud 0's coordinates.
    base = torch.rand(50, 3, generator=gen, dtype=torch.float64) * 0.3 - 0.15
    coord = torch.cat([base, base[:20], base[:30] + 1e-4]).float()
    offset = torch.tensor([70, 100])
    feat = torch.randn(100, 5, generator=gen)
    vs = 0.05
    x, inverse = sparse_from_points(coord, feat, vs, offset)
    cloud = torch.repeat_interleave(torch.arange(2), torch.tensor([70, 30]))
    # Every point lies inside its voxel, in its own cloud.
    c = x.coords[inverse]
    assert torch.equal(c[:, 0], cloud)
    assert torch.equal(c[:, 1:], torch.floor(coord.double() / vs).long())
    # Features: each point reads back the mean over exactly the points sharing its voxel.
    back = devoxelize(x, inverse)
    same = (inverse[:, None] == inverse[None, :]).float()
    want = same @ feat / same.sum(1, keepdim=True)
    torch.testing.assert_close(back, want, rtol=1e-5, atol=1e-6)
    assert x.num_voxels < 100  # duplicates really merged
    with pytest.raises(ValueError, match="voxel_size must be a positive"):
        sparse_from_points(coord, feat, 0.0, offset)


def test_downsample_coords_negative_and_sorted() -> None:
    c = torch.tensor([[0, -1, -1, -1], [0, -2, 0, 3], [1, 3, 3, 3], [0, 1, 1, 1], [0, 0, 0, 0]])
    want = torch.tensor([[0, -1, -1, -1], [0, -1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(downsample_coords(c, 2), want)


def test_errors(gen: torch.Generator) -> None:
    x, _ = _grid_tensor(gen, b=1, g=4, cin=3, density=0.5)
    with pytest.raises(ValueError, match="expects 2 input channels"):
        SparseConv3d(2, 4)(x)
    with pytest.raises(ValueError, match="kernel_size must be a positive int"):
        SparseConv3d(2, 4, 0)
    with pytest.raises(ValueError, match="no cached coordinates at stride 1"):
        SparseConvTranspose3d(3, 3, 2, 2)(SparseTensor(x.coords, x.feats, 2, 1))
    with pytest.raises(ValueError, match="feats must be"):
        SparseTensor(x.coords, x.feats[:-1])
    with pytest.raises(ValueError, match="coords must be"):
        SparseTensor(x.coords[:, :3], x.feats)


@pytest.mark.parametrize(("k", "s", "transpose"), [(3, 1, False), (2, 2, False), (2, 2, True), (3, 2, True)])
def test_recompute_backward_equals_plain_autograd(gen: torch.Generator, k: int, s: int, transpose: bool) -> None:
    from pcbench.models.sparse import sparse_conv  # noqa: PLC0415

    x, _ = _grid_tensor(gen, b=2, g=8, cin=5, density=0.3)
    coarse = x.cache.coarser(1, s) if s > 1 else x.coords
    km = x.cache.kernel_map(1, s, k, 1)
    n_in, n_out = (coarse.shape[0], x.num_voxels) if transpose else (x.num_voxels, coarse.shape[0])
    f = torch.randn(n_in, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(k ** 3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    center = (k ** 3) // 2 if (s == 1 and k % 2) else None
    r = torch.randn(n_out, 4, generator=gen, dtype=torch.float64)
    grads = []
    for recompute in (True, False):
        y = sparse_conv(f, w, km, n_out, transpose=transpose, identity_center=center, recompute=recompute)
        grads.append((y, *torch.autograd.grad((y * r).sum(), (f, w))))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Only the weight needs a gradient (frozen input features): still exact.
    y = sparse_conv(f.detach(), w, km, n_out, transpose=transpose, identity_center=center)
    torch.testing.assert_close(torch.autograd.grad((y * r).sum(), w)[0], grads[1][2])


def test_from_grid_keeps_row_order_and_matches_sorted(gen: torch.Generator) -> None:
    # Serialized (unsorted) rows, two clouds sharing coordinates: a stride-1 conv must give row n to point n.
    x, _ = _grid_tensor(gen, b=2, g=6, cin=4, density=0.4)
    perm = torch.randperm(x.num_voxels, generator=gen)
    lengths = torch.bincount(x.coords[:, 0], minlength=2)
    shuffled = torch.cat([perm[perm < lengths[0]], perm[perm >= lengths[0]]])  # keep clouds contiguous
    y = SparseTensor.from_grid(x.coords[shuffled, 1:], x.feats[shuffled], lengths.cumsum(0))
    assert torch.equal(y.coords, x.coords[shuffled]) and y.batch_size == 2
    conv = SparseConv3d(4, 3, 3, bias=True).double()
    torch.testing.assert_close(conv(y).feats, conv(x).feats[shuffled])
    with pytest.raises(ValueError, match="grid_coord must be an integer tensor"):
        SparseTensor.from_grid(x.coords[:, 1:].double(), x.feats)
    with pytest.raises(ValueError, match="offset"):
        SparseTensor.from_grid(x.coords[:, 1:], x.feats, torch.tensor([3, 4]))


def test_empty_tensor_through_every_layer() -> None:
    x = SparseTensor(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 3), 1, batch_size=2)
    for layer in (SparseConv3d(3, 4, 3), SparseConv3d(3, 4, 2, 2), SparseConv3d(3, 4, 1), SparseMaxPool3d(2, 2),
                  SparseAvgPool3d(2, 2)):
        y = layer(x)
        assert y.num_voxels == 0 and y.feats.shape[1] in (3, 4)
    up = SparseConvTranspose3d(4, 3, 2, 2)(SparseConv3d(3, 4, 2, 2)(x))
    assert up.feats.shape == (0, 3) and up.coords is x.coords
    assert torch.equal(SparseGlobalPool("max")(x), torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("k", "s", "transpose"), [(3, 1, False), (2, 2, False), (2, 2, True)])
def test_training_step_under_autocast(gen: torch.Generator, dtype: torch.dtype, k: int, s: int,
                                      transpose: bool) -> None:
    # The hand-written backward runs in the dtype the forward multiplied in and hands back gradients in the
    # dtypes of the input and the weight, close to the float32 ones.
    x, _ = _grid_tensor(gen, b=2, g=8, cin=6, density=0.4)
    x = x.replace(x.feats.float().requires_grad_(True))
    conv = SparseConv3d(6, 5, k, stride=s)
    if transpose:
        x = SparseConv3d(6, 6, k, stride=s)(x)
        conv = SparseConvTranspose3d(6, 5, k, stride=s)
    grads = []
    for amp in (False, True):
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            y = conv(x)
        assert y.feats.dtype == (dtype if amp else torch.float32)
        gx, gw = torch.autograd.grad(y.feats.float().square().sum(), (x.feats, conv.weight))
        assert gx.dtype == gw.dtype == torch.float32
        grads.append((gx, gw))
    for ref, got in zip(*grads, strict=True):
        assert (got - ref).norm() / ref.norm() < 0.05
