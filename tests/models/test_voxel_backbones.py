"""MinkUNet / SpUNet / sparse ResNet: published sizes, the model contract, batch and order invariance,
and training on the real ScanNet sample scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pcbench.models.minkunet import MinkUNet
from pcbench.models.sparse_resnet import SparseResNet
from pcbench.models.spunet import SpUNet
from pcbench.ops import PointBatch
from pcbench.testing.clouds import load_modelnet_txt, load_scannet_scene, object_batch, scan_like_scene
from tests.models._helpers import build_from_yaml

SCENE = Path("scannet/scans/scene0000_00/scene0000_00_vh_clean_2.ply")
NPY = Path("scannet/preprocessed/votenet_mmdet3d_npy")


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- sizes --------------------------------------------------------------------------------------------

def _unet_count(cin: int, ncls: int, stem_k: int, init: int, planes: list[int], layers: list[int],
                down_keeps_width: bool) -> int:
    """Parameter count of a Res16UNet / SpUNet-v1m1 written out layer by layer from the reference code."""
    conv = lambda k, a, b: k ** 3 * a * b  # noqa: E731 - bias-free sparse conv
    bn = lambda c: 2 * c  # noqa: E731

    def block(a: int, b: int) -> int:
        return conv(3, a, b) + bn(b) + conv(3, b, b) + bn(b) + (conv(1, a, b) + bn(b) if a != b else 0)

    total = conv(stem_k, cin, init) + bn(init)
    width = init
    for i in range(4):
        out = width if down_keeps_width else planes[i]
        total += conv(2, width, out) + bn(out)
        total += block(out, planes[i]) + sum(block(planes[i], planes[i]) for _ in range(layers[i] - 1))
        width = planes[i]
    skips = [init, *planes[:3]]
    for i in range(4):
        c = planes[4 + i]
        total += conv(2, width, c) + bn(c) + block(c + skips[3 - i], c)
        total += sum(block(c, c) for _ in range(layers[4 + i] - 1))
        width = c
    return total + width * ncls + ncls


def test_minkunet34c_size_matches_publication() -> None:
    with torch.device("meta"):
        m = build_from_yaml("minkunet34c_seg", 3, 20)
    n = _n_params(m)
    # Layer-by-layer count of chrischoy/SpatioTemporalSegmentation models/res16unet.py (Res16UNet34C).
    assert n == _unet_count(3, 20, 5, 32, [32, 64, 128, 256, 256, 128, 96, 96], [2, 3, 4, 6, 2, 2, 2, 2], True)
    # Published: MinkUNet 37.9M parameters (Wu et al., "Point Transformer V3", CVPR 2024, arXiv:2312.10035,
    # model-efficiency table on ScanNet; the Pointcept MinkUNet34C baseline).
    assert abs(n / 37.9e6 - 1) < 0.02, n


def test_spunet_base_size_matches_publication() -> None:
    with torch.device("meta"):
        m = build_from_yaml("spunet_base_seg", 6, 20)
    n = _n_params(m)
    # Layer-by-layer count of Pointcept/Pointcept pointcept/models/sparse_unet/spconv_unet_v1m1_base.py.
    assert n == _unet_count(6, 20, 5, 32, [32, 64, 128, 256, 256, 128, 96, 96], [2, 3, 4, 6, 2, 2, 2, 2], False)
    # 39.2M for SpUNet-v1m1 base on ScanNet (colour + normal input, 20 classes; Pointcept
    # configs/scannet/semseg-spunet-v1m1-0-base.py, checkpoint huggingface.co/torch-pointcloud/
    # spunet-v1m1.scannet20.pointcept). The figure comes from Pointcept's model-zoo tables as quoted in the
    # project issue; the exact count above (layer by layer from the reference code) is the stronger check.
    assert abs(n / 39.2e6 - 1) < 0.02, n


def test_variant_widths() -> None:
    with torch.device("meta"):
        assert _n_params(build_from_yaml("minkunet14a_seg", 3, 20)) == _unet_count(
            3, 20, 5, 32, [32, 64, 128, 256, 128, 128, 96, 96], [1] * 8, True)
        assert _n_params(build_from_yaml("minkunet18a_seg", 3, 20)) == _unet_count(
            3, 20, 5, 32, [32, 64, 128, 256, 128, 128, 96, 96], [2] * 8, True)
        assert _n_params(build_from_yaml("sparse_resnet_cls", 3, 40, layers=[2, 2, 2, 2])) > \
            _n_params(build_from_yaml("sparse_resnet_cls", 3, 40))


# --- contract on small synthetic scenes ----------------------------------------------------------------

def _scene_batch(sizes: list[int], cin: int = 3, seed: int = 0) -> tuple[PointBatch, list[PointBatch]]:
    clouds = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(seed + i)
        c = scan_like_scene(n, seed=seed + i) * 0.25 if n else torch.zeros(0, 3)  # 2 x 2 x 0.75 m rooms
        clouds.append(PointBatch(c, torch.rand(n, cin, generator=g), torch.tensor([n])))
    coord = torch.cat([c.coord for c in clouds])
    feat = torch.cat([c.feat for c in clouds])
    return PointBatch(coord, feat, torch.tensor(sizes).cumsum(0)), clouds


SEG_MODELS = {
    "minkunet14a": lambda: build_from_yaml("minkunet14a_seg", 3, 7, voxel_size=0.05),
    "spunet_small": lambda: SpUNet(3, 7, 0.05, base_channels=8, channels=(8, 16, 16, 16, 16, 16, 8, 8),
                                   layers=(1,) * 8),
    "minkunet_small": lambda: MinkUNet(3, 7, 0.05, layers=(1, 1, 1, 1, 1, 1, 1, 1), planes=(8, 16, 16, 16, 16, 16, 8, 8),
                                       init_dim=8, conv1_kernel_size=3),
}


@pytest.mark.parametrize("name", sorted(SEG_MODELS))
def test_segmentation_batch_consistency(name: str) -> None:
    torch.manual_seed(0)
    model = SEG_MODELS[name]().eval()
    batch, clouds = _scene_batch([1500, 0, 700, 1100])
    with torch.no_grad():
        out = model(batch)
        assert out.shape == (3300, 7)
        alone = [model(c) for c in clouds if c.num_points]
    torch.testing.assert_close(out, torch.cat(alone), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SEG_MODELS))
def test_segmentation_permutation_equivariance(name: str) -> None:
    torch.manual_seed(0)
    model = SEG_MODELS[name]().eval()
    batch, _ = _scene_batch([900, 600], seed=3)
    lengths = [900, 600]
    perm = torch.cat([torch.randperm(lengths[0]), torch.randperm(lengths[1]) + lengths[0]])
    shuffled = PointBatch(batch.coord[perm], batch.feat[perm], batch.offset)
    with torch.no_grad():
        torch.testing.assert_close(model(shuffled), model(batch)[perm], rtol=1e-4, atol=1e-4)


def test_points_in_one_voxel_share_logits() -> None:
    model = build_from_yaml("minkunet14a_seg", 3, 5, voxel_size=0.05).eval()
    batch, _ = _scene_batch([800])
    with torch.no_grad():
        out = model(batch)
    key = torch.floor(batch.coord / 0.05).long()
    _, inv = torch.unique(key, dim=0, return_inverse=True)
    first = torch.zeros(int(inv.max()) + 1, dtype=torch.long).scatter_(0, inv.flip(0), torch.arange(800).flip(0))
    torch.testing.assert_close(out, out[first[inv]])


def test_forward_features_and_head_split() -> None:
    model = build_from_yaml("minkunet14a_seg", 3, 5, voxel_size=0.05).eval()
    batch, _ = _scene_batch([600, 400])
    with torch.no_grad():
        feats = model.forward_features(batch)
        assert feats.shape == (1000, model.out_channels)
        torch.testing.assert_close(model.head(feats), model(batch))


def test_errors() -> None:
    batch, _ = _scene_batch([300], cin=4)
    with pytest.raises(ValueError, match="in_channels=3"):
        build_from_yaml("minkunet14a_seg", 3, 5)(batch)
    with pytest.raises(ValueError, match="in_channels=3"):
        SpUNet(3, 5)(batch)
    with pytest.raises(ValueError, match="voxel_size must be a positive"):
        MinkUNet(3, 5, voxel_size=0.0)
    with pytest.raises(ValueError, match="8 entries"):
        MinkUNet(3, 5, layers=(1, 1, 1))
    with pytest.raises(ValueError, match="8 entries"):
        SpUNet(3, 5, channels=(8, 8))
    with pytest.raises(ValueError, match="one entry per stage"):
        SparseResNet(3, 5, layers=(1, 1), planes=(8,))


# --- classifier ---------------------------------------------------------------------------------------

def test_classifier_contract_and_batch_consistency() -> None:
    torch.manual_seed(0)
    model = build_from_yaml("sparse_resnet_cls", 3, 10, voxel_size=0.05).eval()
    coord, offset = object_batch(4, 512, seed=1)
    # A ragged batch: drop half of cloud 1 and put an empty cloud at the end.
    keep = torch.ones(coord.shape[0], dtype=torch.bool)
    keep[512:768] = False
    coord = coord[keep]
    lengths = torch.tensor([512, 256, 512, 512, 0])
    batch = PointBatch(coord, coord.clone(), lengths.cumsum(0))
    with torch.no_grad():
        out = model(batch)
        assert out.shape == (5, 10)
        starts = [0, *lengths.cumsum(0).tolist()]
        for b in range(4):
            c = coord[starts[b]:starts[b + 1]]
            alone = model(PointBatch(c, c.clone(), torch.tensor([c.shape[0]])))
            torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-4, atol=1e-4)
        # An empty cloud pools to zeros: its logits are the head's bias.
        torch.testing.assert_close(out[4], model.head[1].bias)


def test_classifier_on_real_modelnet_objects(shared_data: Path) -> None:
    root = shared_data / "modelnet40" / "modelnet40_normal_resampled"
    files = [root / "airplane" / "airplane_0126.txt", root / "chair" / "chair_0391.txt"]
    coords, normals = zip(*(load_modelnet_txt(f) for f in files), strict=True)
    coord, feat = torch.cat(coords), torch.cat(normals)
    batch = PointBatch(coord, feat, torch.tensor([10000, 20000]))
    model = build_from_yaml("sparse_resnet_cls", 3, 40)
    out = model(batch)
    assert out.shape == (2, 40) and bool(torch.isfinite(out).all())
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 8])).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


# --- the real ScanNet scene ---------------------------------------------------------------------------

def _real_scene(shared_data: Path, crop: tuple[float, float] | None = None) -> PointBatch:
    coord, color = load_scannet_scene(shared_data / SCENE)
    if crop is not None:
        lo = coord.min(0).values
        keep = ((coord[:, 0] - lo[0]) < crop[0]) & ((coord[:, 1] - lo[1]) < crop[1])
        coord, color = coord[keep], color[keep]
    return PointBatch(coord, color.float() / 255.0, torch.tensor([coord.shape[0]]))


def _check_grads(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.grad).all())]
    assert not bad, bad
    zero = [n for n, p in model.named_parameters() if float(p.grad.abs().sum()) == 0.0]
    assert not zero, zero


def test_real_scene_crop_forward_backward_2cm(shared_data: Path) -> None:
    torch.manual_seed(0)
    batch = _real_scene(shared_data, crop=(2.5, 2.5))
    assert 5000 < batch.num_points < 40000
    model = build_from_yaml("minkunet14a_seg", 3, 20, voxel_size=0.02)
    out = model(batch)
    assert out.shape == (batch.num_points, 20)
    assert bool(torch.isfinite(out).all())
    torch.nn.functional.cross_entropy(out, torch.randint(0, 20, (batch.num_points,))).backward()
    _check_grads(model)


@pytest.mark.slow
@pytest.mark.parametrize("build", [lambda: build_from_yaml("minkunet34c_seg", 3, 20), lambda: SpUNet(3, 20)],
                         ids=["minkunet34c", "spunet"])
def test_real_scene_full_forward_backward_2cm(shared_data: Path, build) -> None:
    torch.manual_seed(0)
    batch = _real_scene(shared_data)
    model = build()
    out = model(batch)
    assert out.shape == (81369, 20) and bool(torch.isfinite(out).all())
    torch.nn.functional.cross_entropy(out, torch.randint(0, 20, (81369,))).backward()
    _check_grads(model)


@pytest.mark.slow
def test_overfit_real_scene(shared_data: Path) -> None:
    """Fit the real v2 labels of a crop of scene0000_00: the loss must fall by 90%+."""
    vert = np.load(shared_data / NPY / "scene0000_00_vert_all.npy")
    label = np.load(shared_data / NPY / "scene0000_00_sem_label_all.npy").astype(np.int64)
    coord = torch.from_numpy(vert[:, :3].copy())
    keep = (coord[:, 0] < coord[:, 0].min() + 1.5) & (coord[:, 1] < coord[:, 1].min() + 2.0)  # ~6.7k points, 9 classes
    coord = coord[keep]
    color = torch.from_numpy(vert[keep.numpy(), 3:6] / 255.0).float()
    _, target = np.unique(label[keep.numpy()], return_inverse=True)
    target = torch.from_numpy(target.reshape(-1))
    ncls = int(target.max()) + 1
    assert ncls >= 3
    batch = PointBatch(coord, color, torch.tensor([coord.shape[0]]))
    torch.manual_seed(0)
    model = build_from_yaml("minkunet14a_seg", 3, ncls, voxel_size=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0], losses


def test_empty_batch_in_eval_mode() -> None:
    batch = PointBatch(torch.zeros(0, 3), torch.zeros(0, 3), torch.tensor([0, 0]))
    with torch.no_grad():
        assert SEG_MODELS["minkunet_small"]().eval()(batch).shape == (0, 7)
        assert build_from_yaml("sparse_resnet_cls", 3, 4, voxel_size=0.05).eval()(batch).shape == (2, 4)
