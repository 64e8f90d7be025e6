"""Pointcept checkpoint layouts (PointTransformer-Seg50, PT-v2m2, PT-v3m1) converted onto pcbench's ptv1_seg /
ptv2_seg / ptv3_seg.

Pointcept saves ``{"state_dict": {"module.backbone....", "module.seg_head...."}}`` (DDP, DefaultSegmentor /
DefaultSegmentorV2; pointcept/engines/hooks/misc.py). The source names below are written from Pointcept's module
tree (point_transformer_seg.py, point_transformer_v2m2_base.py,
point_transformer_v3m1_base.py) as regular-expression substitutions,
independently of the converter's per-key functions; the check is that every tensor arrives at its pcbench key
unchanged (or, for spconv kernels, in pcbench's layout), and that a missing or extra key is an error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pcbench.models import create_model
from pcbench.models.convert import ConversionError, convert_checkpoint

PTV2 = [  # pcbench key pattern -> Pointcept key (PointBatchNorm wraps every BatchNorm as .norm)
    (r"^embed_proj\.0\.", "patch_embed.proj.0."), (r"^embed_proj\.1\.", "patch_embed.proj.1.norm."),
    (r"^embed_blocks\.blocks\.", "patch_embed.blocks.blocks."),
    (r"^down\.(\d+)\.proj\.0\.", r"enc_stages.\1.down.fc."), (r"^down\.(\d+)\.proj\.1\.", r"enc_stages.\1.down.norm.norm."),
    (r"^enc\.(\d+)\.blocks\.", r"enc_stages.\1.blocks.blocks."), (r"^dec\.(\d+)\.blocks\.", r"dec_stages.\1.blocks.blocks."),
    (r"^up\.(\d+)\.(proj|proj_skip)\.0\.", r"dec_stages.\1.up.\2.0."),
    (r"^up\.(\d+)\.(proj|proj_skip)\.1\.", r"dec_stages.\1.up.\2.1.norm."),
    (r"^head\.0\.0\.", "seg_head.0."), (r"^head\.0\.1\.", "seg_head.1.norm."), (r"^head\.1\.", "seg_head.3."),
    (r"\.norm([123])\.", r".norm\1.norm."),
    (r"\.(linear_[qk])\.1\.", r".\1.1.norm."),
    (r"\.pe_bias\.0\.0\.", ".linear_p_bias.0."), (r"\.pe_bias\.0\.1\.", ".linear_p_bias.1.norm."),
    (r"\.pe_bias\.1\.", ".linear_p_bias.3."),
    (r"\.weight_encoding\.1\.", ".weight_encoding.3."),  # before 0.1 -> 1 below
    (r"\.weight_encoding\.0\.0\.", ".weight_encoding.0."), (r"\.weight_encoding\.0\.1\.", ".weight_encoding.1.norm."),
]

PTV3 = [
    (r"^embed_conv\.", "embedding.stem.conv."), (r"^embed_norm\.", "embedding.stem.norm."),
    (r"^down\.(\d+)\.proj\.", lambda m: f"enc.enc{int(m[1]) + 1}.down.proj."),
    (r"^down\.(\d+)\.norm\.", lambda m: f"enc.enc{int(m[1]) + 1}.down.norm.0."),
    (r"^enc\.(\d+)\.(\d+)\.", r"enc.enc\1.block\2."), (r"^dec\.(\d+)\.(\d+)\.", r"dec.dec\1.block\2."),
    (r"^up\.(\d+)\.", r"dec.dec\1.up."),
    (r"\.cpe_conv\.", ".cpe.0."), (r"\.cpe_linear\.", ".cpe.1."), (r"\.cpe_norm\.", ".cpe.2."),
    (r"\.norm([12])\.", r".norm\1.0."), (r"\.mlp\.0\.", ".mlp.0.fc1."), (r"\.mlp\.3\.", ".mlp.0.fc2."),
]


PTV1 = [  # Sequential(TransitionDown / TransitionUp, Bottleneck...) per level; decoder dec5 (coarsest) first
    (r"^encoder\.stages\.(\d+)\.down\.", lambda m: f"enc{int(m[1]) + 1}.0."),
    (r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"enc{int(m[1]) + 1}.{int(m[2]) + 1}."),
    (r"^up\.(\d+)\.", lambda m: f"dec{5 - int(m[1])}.0."),
    (r"^dec_blocks\.(\d+)\.(\d+)\.", lambda m: f"dec{5 - int(m[1])}.{int(m[2]) + 1}."),
    (r"^head\.mlp\.", "cls."),
]


def _pointcept_key(key: str, table: list) -> str:
    if key.startswith("head."):
        return "module.seg_head." + key[len("head."):] if table is PTV3 else "module.backbone." + _sub(key, table)
    return "module.backbone." + _sub(key, table)


def _sub(key: str, table: list) -> str:
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def _spconv_layout(value: torch.Tensor) -> torch.Tensor:
    """pcbench [K, in, out] (K = k^3) -> spconv [out, k, k, k, in]."""
    k = round(value.shape[0] ** (1 / 3))
    return value.reshape(k, k, k, value.shape[1], value.shape[2]).permute(4, 0, 1, 2, 3).contiguous()


CASES: list = [("ptv1_seg", PTV1, {}, 7_768_056), ("ptv2_seg", PTV2, {}, 11_323_804),  # convert_checkpoint builds the config's (paper) widths
         pytest.param("ptv3_seg", PTV3, {}, 46_167_572, marks=pytest.mark.slow)]  # 46M parameters: ~13 s


@pytest.mark.parametrize(("config", "table", "overrides", "n_params"), CASES, ids=["ptv1", "ptv2", "ptv3"])
def test_a_pointcept_checkpoint_converts_every_tensor_to_its_pcbench_key(tmp_path: Path, config, table,
                                                                       overrides, n_params) -> None:
    torch.manual_seed(0)
    ours = create_model(config, 6, 20, **overrides)
    own = {k: torch.randn(v.shape) if v.is_floating_point() else v + 3 for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == n_params
    src = {_pointcept_key(k, table): (_spconv_layout(v) if v.dim() == 3 else v) for k, v in own.items()}
    assert len(src) == len(own)  # the renaming is one to one
    torch.save({"epoch": 100, "state_dict": src}, tmp_path / "model_best.pth")
    state = convert_checkpoint(tmp_path / "model_best.pth", "pointcept", config)
    # Pointcept's PTv1 takes xyz among its 9 input features; pcbench prepends xyz to the 6 it is given
    assert (state["in_channels"], state["num_classes"]) == (6, 20)
    assert state["model"].keys() == own.keys()
    assert all(torch.equal(state["model"][k], v) for k, v in own.items())
    if config == "ptv3_seg":  # the stem in spconv's layout: [out, kx, ky, kz, in] -> [K, in, out]
        stem = src["module.backbone.embedding.stem.conv.weight"]
        torch.testing.assert_close(state["model"]["embed_conv.weight"][1 * 25 + 2 * 5 + 3], stem[:, 1, 2, 3, :].T)

    extra = dict(src)
    extra["module.backbone.enc_stages.9.down.fc.weight"] = torch.zeros(1)
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match=r"enc_stages\.9\.down\.fc\.weight"):
        convert_checkpoint(tmp_path / "extra.pth", "pointcept", config)
    missing = dict(src)
    gone = sorted(missing)[len(missing) // 2]
    del missing[gone]
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(ConversionError, match=re.escape(gone[len("module."):])):
        convert_checkpoint(tmp_path / "missing.pth", "pointcept", config)
