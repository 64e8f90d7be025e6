"""MinkUNet34C (Res16UNet34C, MinkowskiEngine weights) converted onto pcbench's minkunet34c_seg: key and shape
mapping only. MinkowskiEngine has no CPU build to run as a reference here, so the forward is not compared; the
source state dict is generated from Res16UNet34C's definition (chrischoy/SpatioTemporalSegmentation
models/res16unet.py: INIT_DIM 32, PLANES, LAYERS, BasicBlock with conv1 / norm1 / conv2 / norm2 / downsample,
MinkowskiBatchNorm holding ``bn``, ``final`` a kernel-1 convolution with bias), not from pcbench's model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pcbench.models.convert import ConversionError, convert_checkpoint

PLANES, LAYERS, INIT = (32, 64, 128, 256, 256, 128, 96, 96), (2, 3, 4, 6, 2, 2, 2, 2), 32
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _res16unet34c(in_channels: int, classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, k: int, cin: int, cout: int) -> None:
        sd[f"{name}.kernel"] = torch.randn(k ** 3, cin, cout, generator=gen)

    def bn(name: str, c: int) -> None:
        for key in BN:
            sd[f"{name}.bn.{key}"] = (torch.tensor(7) if key == "num_batches_tracked"
                                      else torch.rand(c, generator=gen) + 0.5)

    def blocks(i: int, cin: int, planes: int, n: int) -> None:
        for j in range(n):
            c = cin if j == 0 else planes
            conv(f"block{i}.{j}.conv1", 3, c, planes)
            bn(f"block{i}.{j}.norm1", planes)
            conv(f"block{i}.{j}.conv2", 3, planes, planes)
            bn(f"block{i}.{j}.norm2", planes)
            if c != planes:
                conv(f"block{i}.{j}.downsample.0", 1, c, planes)
                bn(f"block{i}.{j}.downsample.1", planes)

    conv("conv0p1s1", 5, in_channels, INIT)
    bn("bn0", INIT)
    inplanes, skips = INIT, [INIT]
    for i in range(4):
        conv(f"conv{i + 1}p{1 << i}s2", 2, inplanes, inplanes)
        bn(f"bn{i + 1}", inplanes)
        blocks(i + 1, inplanes, PLANES[i], LAYERS[i])
        inplanes = PLANES[i]
        skips.append(inplanes)
    for i in range(4):
        conv(f"convtr{4 + i}p{16 >> i}s2", 2, inplanes, PLANES[4 + i])
        bn(f"bntr{4 + i}", PLANES[4 + i])
        blocks(5 + i, PLANES[4 + i] + skips[3 - i], PLANES[4 + i], LAYERS[4 + i])
        inplanes = PLANES[4 + i]
    sd["final.kernel"] = torch.randn(1, inplanes, classes, generator=gen)
    sd["final.bias"] = torch.randn(classes, generator=gen)
    return sd


@pytest.mark.parametrize("source", ["minkowski", "pointcept"])
def test_res16unet34c_maps_key_by_key(tmp_path: Path, source: str) -> None:
    sd = _res16unet34c(3, 20, torch.Generator().manual_seed(0))
    n_src = sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    assert n_src == 37_856_052  # the parameter count of conf/model/minkunet34c_seg.yaml (37.9M)
    if source == "pointcept":  # DefaultSegmentor backbone under DDP
        sd = {f"module.backbone.{k}": v for k, v in sd.items()}
    torch.save({"epoch": 1, "state_dict": sd}, tmp_path / "weights.pth")
    state = convert_checkpoint(tmp_path / "weights.pth", source, "minkunet34c_seg")
    assert (state["in_channels"], state["num_classes"]) == (3, 20)
    src = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    m = state["model"]
    # odd kernels: MinkowskiEngine offset (dx, dy, dz) at (dz * k + dy) * k + dx, pcbench at (dx * k + dy) * k + dz
    assert torch.equal(m["stem.conv.weight"][(1 * 5 + 2) * 5 + 3], src["conv0p1s1.kernel"][(3 * 5 + 2) * 5 + 1])
    assert torch.equal(m["enc.3.5.conv2.weight"][(0 * 3 + 1) * 3 + 2], src["block4.5.conv2.kernel"][(2 * 3 + 1) * 3 + 0])
    # even (stride-2) kernels keep their order; BN statistics and the head arrive unchanged
    assert torch.equal(m["up.1.conv.weight"], src["convtr5p8s2.kernel"])
    assert torch.equal(m["dec.2.0.shortcut.1.module.running_var"], src["block7.0.downsample.1.bn.running_var"])
    assert torch.equal(m["head.weight"], src["final.kernel"][0].T)
    assert torch.equal(m["head.bias"], src["final.bias"])


def test_a_res16unet_with_another_depth_is_refused_naming_the_key(tmp_path: Path) -> None:
    sd = _res16unet34c(3, 20, torch.Generator().manual_seed(0))
    sd["block4.6.conv1.kernel"] = torch.zeros(27, 256, 256)  # a 7th block in stage 4 (Res16UNet50-like depth)
    torch.save({"state_dict": sd}, tmp_path / "deeper.pth")
    with pytest.raises(ConversionError, match=r"block4\.6\.conv1\.kernel"):
        convert_checkpoint(tmp_path / "deeper.pth", "minkowski", "minkunet34c_seg")
