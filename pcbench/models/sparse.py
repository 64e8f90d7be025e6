"""Sparse 3-D convolution in plain torch: a small SparseTensor type and the layers voxel backbones need.

Data layout
    A :class:`SparseTensor` holds integer grid coordinates ``coords [V, 4]`` rows ``(cloud, x, y, z)`` on
    its own level's grid (a level with ``stride`` s is s times coarser than the finest grid, and its
    coordinates are ``floor(finest / s)``; rows unique, in any order), features ``feats [V, C]`` and a
    shared :class:`CoordinateCache`.
    The cache keeps the coordinates of every level and every kernel map computed between levels, so
    the 20 convolutions of one level share one map and a transposed convolution returns exactly to the
    coordinates its strided counterpart came from.

Convolution
    ``out[j] = sum_k sum_{(i, j) in map_k} feats[i] @ W[k]`` with ``W`` of shape ``[K, C_in, C_out]``,
    ``K = kernel_size**3`` in ``torch.nn.functional.conv3d`` weight order (dx slowest), i.e.
    ``W == conv3d_weight.permute(2, 3, 4, 1, 0).reshape(K, C_in, C_out)``; for the transposed layer
    ``W == conv_transpose3d_weight.permute(2, 3, 4, 0, 1).reshape(K, C_in, C_out)``. Odd kernels are centred
    (offsets -(k//2)..k//2), even kernels span 0..k-1, as with conv3d padding ``dilation * (k // 2)``
    resp. 0. A strided convolution outputs the voxels ``unique(floor(coords / stride))`` (MinkowskiEngine's
    rule), whatever the kernel size. Each offset is one gather -> matmul -> ``index_add_``: this is the one
    sparse convolution of the project (MinkUNet, SpUNet, the sparse ResNet and PTv3's stem and xCPE all
    use it). The alternative gathered-GEMM method (one GEMM over a [V, K * C_in] block of gathered
    neighbourhoods, zeros for missing neighbours) multiplies every missing neighbour too; on real scenes,
    where 10-40% of a k=3 neighbourhood is occupied, it is several times slower on CPU
    (``benchmarks/bm_sparse.py`` times both side by side). The backward is
    the same three torch ops run in reverse by a small ``autograd.Function`` that re-gathers inputs instead
    of storing K gathered copies (2.7x less memory for a k=3 layer on a real scene; ``recompute=False`` in
    :func:`sparse_conv` runs plain autograd instead, and the tests hold both to identical results). Under
    autocast the products run in autocast's dtype, forward and backward alike.
    Weights are initialised like ``nn.Conv3d``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = C_in * K
    (C_out * K for the transposed layer, whose fan-in is per output).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pcbench.ops import offset2batch, voxel_pool
from pcbench.ops.batch import check_offset
from pcbench.ops.sparse import kernel_maps
from pcbench.ops.voxel import coarsen_levels, voxel_levels

__all__ = [
    "CoordinateCache",
    "SparseAvgPool3d",
    "SparseBasicBlock",
    "SparseBatchNorm",
    "SparseConv3d",
    "SparseConvBNReLU",
    "SparseConvTranspose3d",
    "SparseDropout",
    "SparseFeatureModule",
    "SparseGELU",
    "SparseGlobalPool",
    "SparseLeakyReLU",
    "SparseMaxPool3d",
    "SparseReLU",
    "SparseTensor",
    "devoxelize",
    "downsample_coords",
    "sparse_cat",
    "sparse_conv",
    "sparse_from_points",
    "sparse_plan",
    "sparse_unet",
    "unet_plan",
    "unet_strides",
]

KernelMap = list[tuple[Tensor, Tensor]]


class CoordinateCache:
    """Coordinates per stride level and kernel maps between levels, shared by every tensor of one batch."""

    def __init__(self, num_clouds: int | None = None) -> None:
        self.coords: dict[int, Tensor] = {}
        self.kernel_maps: dict[tuple[int, int, int, int], KernelMap] = {}
        self.num_clouds = num_clouds

    def level(self, stride: int) -> Tensor | None:
        """Coordinates [V, 4] of the level at ``stride``, or None when no layer has produced it yet."""
        return self.coords.get(stride)

    def coarser(self, stride: int, factor: int) -> Tensor:
        """Coordinates at ``stride * factor``, built as ``unique(floor(coords / factor))`` on first use."""
        target = stride * factor
        if target not in self.coords:
            self.coords[target] = downsample_coords(self.coords[stride], factor, self.num_clouds)
        return self.coords[target]

    def kernel_map(self, in_stride: int, out_stride: int, kernel_size: int, dilation: int) -> KernelMap:
        """The map from level ``in_stride`` to the coarser-or-equal level ``out_stride``, computed once."""
        key = (in_stride, out_stride, kernel_size, dilation)
        if key not in self.kernel_maps:
            self.prepare([key])
        return self.kernel_maps[key]

    def prepare(self, keys: Sequence[tuple[int, int, int, int]]) -> None:
        """Build every missing map ``(in_stride, out_stride, kernel_size, dilation)`` with one host read.

        A network that knows its convolutions (``sparse_plan``) prepares them all before its first layer, so
        the whole forward reads the device once for its maps instead of once per map.
        """
        todo = []
        for key in dict.fromkeys(keys):
            if key in self.kernel_maps:
                continue
            in_stride, out_stride = key[0], key[1]
            if out_stride not in self.coords:
                self.coarser(in_stride, out_stride // in_stride)
            todo.append(key)
        if not todo:
            return
        # coordinates built by voxelize / voxel_levels: no cloud-index check needed
        maps = kernel_maps([(self.coords[a], self.coords[b], k, b // a, d) for a, b, k, d in todo], validate=False)
        self.kernel_maps.update(zip(todo, maps, strict=True))


def downsample_coords(coords: Tensor, factor: int, num_clouds: int | None = None) -> Tensor:
    """Unique coarse coordinates [V', 4] (cloud, floor(xyz / factor)), sorted lexicographically.

    ``num_clouds`` (B, when known) spares the read of the largest cloud index; the cells are counted with
    one host read either way (``ops.voxel.coarsen_levels``).
    """
    c = coords.long()
    if c.shape[0] == 0:
        c = c.clone()
        c[:, 1:] = torch.div(c[:, 1:], factor, rounding_mode="floor")
        return c
    b = int(c[:, 0].max()) + 1 if num_clouds is None else num_clouds
    return coarsen_levels(c, [factor], b)[0].cells


def sparse_plan(modules: Sequence[nn.Module], stride: int = 1) -> tuple[list[tuple[int, int, int, int]], int]:
    """(kernel-map keys, output stride) of sparse layers applied one after the other from level ``stride``.

    Knows the layers of this module (convolutions, poolings, basic blocks, ``nn.Sequential``), so a network can
    ``cache.prepare`` every map of its forward at once.
    """
    keys: list[tuple[int, int, int, int]] = []
    for m in modules:
        if isinstance(m, nn.Sequential):
            sub, stride = sparse_plan(list(m), stride)
            keys += sub
        elif isinstance(m, SparseConvBNReLU):
            sub, stride = sparse_plan([m.conv], stride)
            keys += sub
        elif isinstance(m, SparseBasicBlock):
            sub, out = sparse_plan([m.conv1, m.conv2], stride)
            keys += sub
            if m.shortcut is not None:
                keys += sparse_plan(list(m.shortcut), stride)[0]
            stride = out
        elif isinstance(m, SparseConvTranspose3d):
            keys.append((stride // m.stride, stride, m.kernel_size, m.dilation))
            stride //= m.stride
        elif isinstance(m, (SparseConv3d, _SparsePool3d)):
            if not (isinstance(m, SparseConv3d) and m.kernel_size == 1 and m.stride == 1):
                keys.append((stride, stride * m.stride, m.kernel_size, m.dilation))
            stride *= m.stride
    return keys, stride


@dataclass(eq=False)
class SparseTensor:
    """Features on the occupied voxels of one grid level of a batch of clouds.

    coords: [V, 4] int64 (cloud, x, y, z) on this level's grid, unique rows.
    feats: [V, C] float features, row v belongs to ``coords[v]``.
    stride: how many finest-grid cells one cell of this level spans.
    batch_size: number of clouds B (some may have no voxels).
    cache: coordinate levels and kernel maps shared with every tensor derived from the same input.
    """

    coords: Tensor
    feats: Tensor
    stride: int = 1
    batch_size: int = 1
    cache: CoordinateCache = field(default_factory=CoordinateCache)

    def __post_init__(self) -> None:
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"coords must be [V, 4] (cloud, x, y, z), got {list(self.coords.shape)}")
        if self.feats.dim() != 2 or self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"feats must be [V, C] with V={self.coords.shape[0]} rows (one per voxel), got {list(self.feats.shape)}"
            )
        if self.cache.num_clouds is None:
            self.cache.num_clouds = self.batch_size
        cached = self.cache.coords.setdefault(self.stride, self.coords)
        if cached is not self.coords and cached.shape != self.coords.shape:
            raise ValueError(
                f"the cache already holds {cached.shape[0]} voxels at stride {self.stride} but coords has "
                f"{self.coords.shape[0]}; build a new SparseTensor (fresh cache) for new coordinates"
            )

    @classmethod
    def from_grid(cls, grid_coord: Tensor, feats: Tensor, offset: Tensor | None = None, validate: bool = True
                  ) -> SparseTensor:
        """Wrap a packed batch already on a grid: integer ``grid_coord [N, 3]`` (unique within each cloud),
        ``feats [N, C]``, cloud offsets [B]. Rows keep their order (no sorting), so row n of every output of
        a stride-1 layer belongs to point n (e.g. a convolutional positional encoding on serialized points).
        ``validate=False`` skips the offset value checks (host syncs) for an offset already checked.
        """
        if grid_coord.dim() != 2 or grid_coord.shape[1] != 3 or grid_coord.is_floating_point():
            raise ValueError(
                f"grid_coord must be an integer tensor [N, 3], got {grid_coord.dtype} {list(grid_coord.shape)}; "
                "quantise coordinates first (e.g. torch.floor(coord / grid_size).long())"
            )
        n = grid_coord.shape[0]
        if offset is None:
            cloud = grid_coord.new_zeros(n, dtype=torch.long)
            b = 1
        else:
            check_offset("offset", offset, n, values=validate)
            cloud = offset2batch(offset.to(grid_coord.device), n)
            b = int(offset.numel())
        return cls(torch.cat([cloud.unsqueeze(1), grid_coord.long()], 1), feats, 1, b)

    @property
    def num_voxels(self) -> int:
        """Number of occupied voxels V."""
        return int(self.coords.shape[0])

    def replace(self, feats: Tensor) -> SparseTensor:
        """The same voxels (and cache) carrying new features [V, C']."""
        return SparseTensor(self.coords, feats, self.stride, self.batch_size, self.cache)


def sparse_from_points(
    coord: Tensor, feat: Tensor, voxel_size: float, offset: Tensor | None = None, reduce: str = "mean",
    validate: bool = True, strides: Sequence[int] = (),
) -> tuple[SparseTensor, Tensor]:
    """Voxelize a packed batch: (SparseTensor with per-voxel pooled features, inverse [N] point -> voxel).

    ``validate=False`` skips ``voxelize``'s input checks (host syncs), for a ``PointBatch``'s fields.
    ``strides`` (ascending, each a multiple of the previous, e.g. ``(2, 4, 8)``): coarser levels the network
    will use, built into the cache in the same single host read as the voxels (``ops.voxel_levels``).
    """
    if not (isinstance(voxel_size, (int, float)) and voxel_size > 0 and math.isfinite(voxel_size)):
        raise ValueError(f"voxel_size must be a positive finite float (metres per cell), got {voxel_size!r}")
    chain = [1, *strides]
    if any(b <= a or b % a for a, b in zip(chain, chain[1:], strict=False)):
        raise ValueError(f"strides must ascend from 1, each a multiple of the previous (e.g. (2, 4, 8)), got "
                         f"{list(strides)}")
    levels = voxel_levels(coord, voxel_size, offset, [b // a for a, b in zip(chain, chain[1:], strict=False)], validate=validate)
    inverse = levels[0].inverse
    feats = voxel_pool(feat, inverse, levels[0].num_cells, reduce=reduce, validate=False)  # inverse from voxelize
    b = 1 if offset is None else int(offset.numel())
    x = SparseTensor(levels[0].cells, feats, 1, b)
    for s, level in zip(strides, levels[1:], strict=True):
        x.cache.coords[s] = level.cells
    return x, inverse


def devoxelize(x: SparseTensor, inverse: Tensor) -> Tensor:
    """Per-point features [N, C]: each point takes its voxel's row (``out[p] = x.feats[inverse[p]]``)."""
    return x.feats.index_select(0, inverse)


def _matmul_dtype(feats: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of ``feats @ weight`` here: autocast's lower precision where autocast applies, else promotion."""
    dev = feats.device.type
    if torch.is_autocast_enabled(dev) and torch.float64 not in (feats.dtype, weight.dtype):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(feats.dtype, weight.dtype)


def _gather_mm_scatter(feats: Tensor, weight: Tensor, pairs: list[tuple[int, Tensor, Tensor]], num_out: int,
                       center: int | None) -> Tensor:
    dtype = _matmul_dtype(feats, weight)
    out = (feats @ weight[center]).to(dtype) if center is not None else feats.new_zeros(
        num_out, weight.shape[2], dtype=dtype)
    for k, src, dst in pairs:
        # In place: one output buffer instead of K fresh [num_out, C_out] temporaries (autograd allows it,
        # no op here needs `out` itself for its backward).
        out.index_add_(0, dst, (feats.index_select(0, src) @ weight[k]).to(dtype))
    return out


class _SparseConvFunction(torch.autograd.Function):
    """Gather -> matmul -> scatter-add whose backward re-gathers instead of keeping K gathered copies.

    Plain autograd would save every ``feats[src_k]`` ([P_k, C_in], K of them) for the weight gradient and
    build a zero-filled [N, C_in] gradient per offset; this saves only ``feats`` and the index lists.
    The backward runs in the dtype the forward multiplied in (autocast's, under autocast), so a bfloat16
    forward gets a bfloat16 backward; the gradients come back in the dtypes of ``feats`` and ``weight``.
    """

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, pairs: list, num_out: int, center: int | None) -> Tensor:
        out = _gather_mm_scatter(feats, weight, pairs, num_out, center)
        ctx.save_for_backward(feats, weight)
        ctx.pairs, ctx.center, ctx.dtype = pairs, center, out.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        feats_in, weight_in = ctx.saved_tensors
        dtype, center = ctx.dtype, ctx.center
        feats, weight = feats_in.to(dtype), weight_in.to(dtype)
        grad_out = grad_out.to(dtype).contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = None
        if need_x:
            gx = grad_out @ weight[center].T if center is not None else feats.new_zeros(feats.shape)
        if need_w:
            gw = torch.zeros_like(weight)
            if center is not None:
                torch.mm(feats.T, grad_out, out=gw[center])
        for k, src, dst in ctx.pairs:
            go = grad_out.index_select(0, dst)
            if need_x:
                gx.index_add_(0, src, go @ weight[k].T)
            if need_w:
                torch.mm(feats.index_select(0, src).T, go, out=gw[k])
        return (None if gx is None else gx.to(feats_in.dtype), None if gw is None else gw.to(weight_in.dtype),
                None, None, None)


def sparse_conv(
    feats: Tensor, weight: Tensor, kmap: KernelMap, num_out: int, transpose: bool = False,
    identity_center: int | None = None, recompute: bool = True,
) -> Tensor:
    """Gather -> matmul -> scatter-add over kernel offsets: [N, C_in] -> [num_out, C_out].

    ``kmap[k] = (in_idx, out_idx)``; with ``transpose`` the pairs run backwards (out -> in), so the
    result has one row per ``in_idx`` target. ``identity_center`` names an offset whose map is the identity
    (submanifold convolution), computed as one dense matmul without gather or scatter. ``recompute``
    (default) uses a hand-written backward that re-gathers the inputs instead of storing them (far less
    memory, no double backward); ``recompute=False`` runs plain autograd through the same torch ops.
    """
    pairs = [(k, j, i) if transpose else (k, i, j) for k, (i, j) in enumerate(kmap)
             if k != identity_center and i.numel()]
    if recompute and torch.is_grad_enabled() and (feats.requires_grad or weight.requires_grad):
        return _SparseConvFunction.apply(feats, weight, pairs, num_out, identity_center)
    return _gather_mm_scatter(feats, weight, pairs, num_out, identity_center)


class _SparseConvBase(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, dilation: int,
                 bias: bool, transpose: bool) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("kernel_size", kernel_size),
                        ("stride", stride), ("dilation", dilation)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.transpose = transpose
        self.weight = nn.Parameter(torch.empty(kernel_size ** 3, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv3d's default: U(-b, b), b = 1 / sqrt(fan_in) for weight and bias."""
        fan_in = (self.out_channels if self.transpose else self.in_channels) * self.weight.shape[0]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _check_input(self, x: SparseTensor) -> None:
        if x.feats.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got feats {list(x.feats.shape)}"
            )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, bias={self.bias is not None}")


class SparseConv3d(_SparseConvBase):
    """Sparse 3-D convolution: submanifold (same voxels) for stride 1, ``unique(floor(x / stride))`` otherwise.

    Weight [K, C_in, C_out] (see the module docstring for the conv3d correspondence). Kernel size 1 with
    stride 1 is exactly a Linear layer on the features and is computed as one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, bias, transpose=False)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """[V, C_in] at stride s -> [V', C_out] at stride s * self.stride."""
        self._check_input(x)
        if self.kernel_size == 1 and self.stride == 1:
            out = x.feats @ self.weight[0]
            return x.replace(out + self.bias if self.bias is not None else out)
        out_stride = x.stride * self.stride
        out_coords = x.cache.coarser(x.stride, self.stride) if self.stride > 1 else x.coords
        km = x.cache.kernel_map(x.stride, out_stride, self.kernel_size, self.dilation)
        center = (self.weight.shape[0] // 2) if (self.stride == 1 and self.kernel_size % 2) else None
        out = sparse_conv(x.feats, self.weight, km, out_coords.shape[0], identity_center=center)
        if self.bias is not None:
            out = out + self.bias
        return SparseTensor(out_coords, out, out_stride, x.batch_size, x.cache)


class SparseConvTranspose3d(_SparseConvBase):
    """Transposed sparse convolution back to the cached finer level (stride s -> s / self.stride).

    Generative up-sampling onto exactly the voxels the matching strided convolution (or pooling) came
    from; the map is the strided one read backwards, so both share one cache entry when kernels match.
    Weight [K, C_in, C_out] (conv_transpose3d weight permuted, see the module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2,
                 dilation: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, bias, transpose=True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """[V, C_in] at stride s -> [V_fine, C_out] at stride s / self.stride (must be cached)."""
        self._check_input(x)
        if x.stride % self.stride:
            raise ValueError(
                f"cannot up-sample a tensor at stride {x.stride} by {self.stride}: the strides must divide"
            )
        fine_stride = x.stride // self.stride
        fine = x.cache.level(fine_stride)
        if fine is None:
            raise ValueError(
                f"no cached coordinates at stride {fine_stride}; a transposed convolution only returns to a level "
                "that a strided convolution or pooling on this tensor's lineage came from"
            )
        km = x.cache.kernel_map(fine_stride, x.stride, self.kernel_size, self.dilation)
        center = (self.weight.shape[0] // 2) if (self.stride == 1 and self.kernel_size % 2) else None
        out = sparse_conv(x.feats, self.weight, km, fine.shape[0], transpose=True, identity_center=center)
        if self.bias is not None:
            out = out + self.bias
        return SparseTensor(fine, out, fine_stride, x.batch_size, x.cache)


class _SparsePool3d(nn.Module):
    def __init__(self, kernel_size: int = 2, stride: int = 2, dilation: int = 1) -> None:
        super().__init__()
        for name, v in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def _pairs(self, x: SparseTensor) -> tuple[Tensor, Tensor, Tensor, int]:
        out_stride = x.stride * self.stride
        out_coords = x.cache.coarser(x.stride, self.stride) if self.stride > 1 else x.coords
        km = x.cache.kernel_map(x.stride, out_stride, self.kernel_size, self.dilation)
        i = torch.cat([p[0] for p in km])
        j = torch.cat([p[1] for p in km])
        return out_coords, i, j, out_stride

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


class SparseAvgPool3d(_SparsePool3d):
    """Mean over the occupied inputs inside each output's kernel window (empty cells are not counted)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        """[V, C] at stride s -> [V', C] at stride s * self.stride."""
        out_coords, i, j, out_stride = self._pairs(x)
        v = out_coords.shape[0]
        total = x.feats.new_zeros(v, x.feats.shape[1]).index_add(0, j, x.feats.index_select(0, i))
        # index_add_, not bincount: bincount sizes its output by the data's maximum (a host read)
        count = torch.zeros(v, dtype=torch.long, device=j.device).index_add_(0, j, torch.ones_like(j))
        count = count.clamp_min(1).to(x.feats.dtype)
        return SparseTensor(out_coords, total / count.unsqueeze(1), out_stride, x.batch_size, x.cache)


class SparseMaxPool3d(_SparsePool3d):
    """Channel-wise max over the occupied inputs inside each output's kernel window."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        """[V, C] at stride s -> [V', C] at stride s * self.stride."""
        out_coords, i, j, out_stride = self._pairs(x)
        f = x.feats.index_select(0, i)
        out = f.new_zeros(out_coords.shape[0], f.shape[1]).scatter_reduce(
            0, j.unsqueeze(1).expand_as(f), f, reduce="amax", include_self=False)
        return SparseTensor(out_coords, out, out_stride, x.batch_size, x.cache)


class SparseFeatureModule(nn.Module):
    """Apply any row-wise module (Linear, LayerNorm, Dropout, activation) to the features only."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Same voxels, ``module(feats)``."""
        return x.replace(self.module(x.feats))


class SparseBatchNorm(SparseFeatureModule):
    """BatchNorm1d over all voxels of the batch (statistics per channel across voxels, as in ME/spconv)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(nn.BatchNorm1d(num_features, eps=eps, momentum=momentum))


class SparseReLU(SparseFeatureModule):
    """ReLU on the features."""

    def __init__(self) -> None:
        super().__init__(nn.ReLU())


class SparseLeakyReLU(SparseFeatureModule):
    """LeakyReLU on the features."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__(nn.LeakyReLU(negative_slope))


class SparseGELU(SparseFeatureModule):
    """GELU on the features."""

    def __init__(self) -> None:
        super().__init__(nn.GELU())


class SparseDropout(SparseFeatureModule):
    """Dropout on the features."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(nn.Dropout(p))


class SparseGlobalPool(nn.Module):
    """Per-cloud mean or max of the features: SparseTensor -> [B, C] (zeros for a cloud with no voxels)."""

    def __init__(self, reduce: str = "max") -> None:
        super().__init__()
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        self.reduce = reduce

    def forward(self, x: SparseTensor) -> Tensor:
        """[V, C] -> [B, C]."""
        f = x.feats
        idx = x.coords[:, 0].unsqueeze(1).expand_as(f)
        out = f.new_zeros(x.batch_size, f.shape[1])
        return out.scatter_reduce(0, idx, f, reduce="amax" if self.reduce == "max" else "mean", include_self=False)

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}"


def sparse_cat(*xs: SparseTensor) -> SparseTensor:
    """Concatenate the features of tensors on the same voxels (U-Net skip connections)."""
    first = xs[0]
    for x in xs[1:]:
        if x.stride != first.stride or x.coords.shape != first.coords.shape:
            raise ValueError(
                f"sparse_cat needs tensors on the same voxels, got strides {[t.stride for t in xs]} with "
                f"{[t.num_voxels for t in xs]} voxels; up-sample to the skip's level first"
            )
    return first.replace(torch.cat([x.feats for x in xs], dim=1))


class SparseConvBNReLU(nn.Module):
    """conv -> SparseBatchNorm -> ReLU, the unit of the U-Net stems, strided and transposed stages."""

    def __init__(self, conv: nn.Module, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.conv = conv
        self.norm = SparseBatchNorm(channels, eps, momentum)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Convolve, normalise and rectify the features of ``x``."""
        y = self.norm(self.conv(x))
        return y.replace(torch.relu(y.feats))


def unet_plan(stem: nn.Module, down: Sequence[nn.Module], enc: Sequence[nn.Module], up: Sequence[nn.Module],
              dec: Sequence[nn.Module], stride: int = 1) -> list[tuple[int, int, int, int]]:
    """The kernel-map keys of ``sparse_unet``'s walk from level ``stride`` (see ``sparse_plan``)."""
    walk = [stem, *(m for pair in zip(down, enc, strict=True) for m in pair),
            *(m for pair in zip(up, dec, strict=True) for m in pair)]
    return sparse_plan(walk, stride)[0]


def unet_strides(keys: Sequence[tuple[int, int, int, int]]) -> list[int]:
    """The coarser levels (strides > 1, ascending) that map keys reach: ``sparse_from_points(strides=...)``."""
    return sorted({k[1] for k in keys} - {1})


def sparse_unet(x: SparseTensor, stem: nn.Module, down: Sequence[nn.Module], enc: Sequence[nn.Module],
                up: Sequence[nn.Module], dec: Sequence[nn.Module]) -> SparseTensor:
    """U-Net walk: stem, (down -> enc) per level keeping skips, then (up -> concat skip -> dec) per level.

    Every kernel map of the walk is built first, with one host read (``unet_plan``, ``CoordinateCache.prepare``).
    """
    x.cache.prepare(unet_plan(stem, down, enc, up, dec, x.stride))
    x = stem(x)
    skips = [x]
    for d, e in zip(down, enc, strict=True):
        x = e(d(x))
        skips.append(x)
    skips.pop()
    for u, c in zip(up, dec, strict=True):
        x = c(sparse_cat(u(x), skips.pop()))
    return x


class SparseBasicBlock(nn.Module):
    """ResNet basic block on sparse voxels: relu(bn(conv3(relu(bn(conv3(x))))) + shortcut(x)).

    The shortcut is the identity, or a kernel-1 convolution + BatchNorm when the width or the stride
    changes (MinkowskiEngine's ``downsample``, Pointcept SpUNet's ``proj``). With ``stride`` > 1 the first
    3x3x3 convolution is strided and the output lands on ``unique(floor(coords / stride))``.
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = SparseConv3d(in_channels, out_channels, 3, stride=stride, dilation=dilation)
        self.norm1 = SparseBatchNorm(out_channels, bn_eps, bn_momentum)
        self.conv2 = SparseConv3d(out_channels, out_channels, 3, dilation=dilation)
        self.norm2 = SparseBatchNorm(out_channels, bn_eps, bn_momentum)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Sequential(SparseConv3d(in_channels, out_channels, 1, stride=stride),
                                          SparseBatchNorm(out_channels, bn_eps, bn_momentum))

    def forward(self, x: SparseTensor) -> SparseTensor:
        """[V, C_in] -> [V', C_out] (V' = V unless strided)."""
        out = self.norm1(self.conv1(x))
        out = self.norm2(self.conv2(out.replace(torch.relu(out.feats))))
        res = x if self.shortcut is None else self.shortcut(x)
        return out.replace(torch.relu(out.feats + res.feats))
