"""The gathered-GEMM peer of benchmarks/bm_sparse.py computes the same convolution as pcbench's sparse conv."""

import torch

from benchmarks.bm_sparse import _GatheredGemm, _neighbour_table
from pcbench.models.sparse import SparseConv3d, SparseTensor


def test_gathered_gemm_peer_equals_sparse_conv(gen: torch.Generator) -> None:
    occ = torch.rand(2, 7, 7, 7, generator=gen) < 0.35
    coords = occ.nonzero()
    x = SparseTensor(coords, torch.randn(coords.shape[0], 3, generator=gen, dtype=torch.float64, requires_grad=True),
                     1, 2)
    conv = SparseConv3d(3, 4, 3).double()
    y = conv(x).feats
    table = _neighbour_table(x.cache.kernel_map(1, 1, 3, 1), x.num_voxels)
    z = _GatheredGemm.apply(x.feats, conv.weight, table)
    torch.testing.assert_close(z, y, rtol=1e-12, atol=1e-12)
    r = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((y * r).sum(), (x.feats, conv.weight)),
                    torch.autograd.grad((z * r).sum(), (x.feats, conv.weight)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
