"""Turn a checkpoint of a reference implementation into a pcbench checkpoint (same weights, pcbench key names).

A conversion is a list of rules ``(source key, pcbench key, transform)`` built from the source's module layout
(read from its code, see each ``_map_*`` function) and checked against the state dict of the pcbench model it
targets: every pcbench key must be written exactly once, every source key must be used (or be a named duplicate),
and every tensor must arrive with the shape pcbench expects. Anything else is a ``ConversionError`` naming the
key, never a partial load. The result holds the state dict under ``model`` and records where it came from
(the source file's sha256 and the full key mapping), and loads with ``torch.load(..., weights_only=True)``.

Supported (source, model config) pairs are the keys of :data:`CONVERTERS`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

__all__ = ["CONVERTERS", "FORMAT", "SOURCES", "ConversionError", "convert_checkpoint", "convert_state_dict",
           "file_sha256", "load_source_checkpoint"]

#: Version of the converted-checkpoint layout (the ``format`` entry; training checkpoints use the same key).
FORMAT = 1

#: Where a checkpoint comes from: the repository whose module names its keys follow.
SOURCES = {
    "yanx27": "yanx27/Pointnet_Pointnet2_pytorch (models/pointnet2_cls_ssg.py, pointnet2_cls_msg.py)",
    "pct_pytorch": "Strawberry-Eat-Mango/PCT_Pytorch (model.py: Pct)",
    "torch-pointcloud": "torch-pointcloud 0.0.18 on PyPI (models/spunet.py: SpUNet; models/point_transformer_v3.py: "
                        "PointTransformerV3Segmentation; spconv weights)",
    "minkowski": "chrischoy/SpatioTemporalSegmentation (models/res16unet.py: Res16UNet34C, MinkowskiEngine weights)",
    "pointcept": "Pointcept/Pointcept (pointcept/models/sparse_unet/spconv_unet_v1m1_base.py: SpUNet-v1m1; "
                 "pointcept/models/sparse_unet/mink_unet.py: MinkUNet34C; "
                 "pointcept/models/point_transformer/point_transformer_seg.py: PointTransformer-Seg50; "
                 "pointcept/models/point_transformer_v2/point_transformer_v2m2_base.py: PT-v2m2; "
                 "pointcept/models/point_transformer_v3/point_transformer_v3m1_base.py: PT-v3m1)",
}


class ConversionError(ValueError):
    """A source checkpoint that does not map onto the pcbench model; the message names the key and the fix."""


@dataclass(frozen=True)
class Rule:
    """``pcbench[dst] = transform(source[src])``; ``transform`` names one of :data:`_TRANSFORMS`."""

    src: str
    dst: str
    transform: str = "copy"


def _squeeze(t: Tensor, _: Rule) -> Tensor:
    # 1x1 Conv1d / Conv2d weights [out, in, 1(, 1)] are Linear weights [out, in]
    return t.reshape(t.shape[0], t.shape[1]) if t.dim() > 2 and all(s == 1 for s in t.shape[2:]) else t


def _feat_xyz_to_xyz_feat(t: Tensor, _: Rule) -> Tensor:
    # yanx27's MSG branches concatenate [features, relative xyz]; pcbench's branches take [relative xyz, features]
    w = _squeeze(t, _)
    d = w.shape[1] - 3
    return torch.cat([w[:, d:], w[:, :d]], 1)


def _spconv_1x1(t: Tensor) -> Tensor:
    """The [in, out] matrix spconv 2.x multiplies by in a kernel-1 convolution with weight ``t`` [out, 1, 1, 1, in].

    spconv's kernel-1 path (``conv1x1`` in spconv/pytorch/conv.py, 2.3.8, any device) computes
    ``features @ weight.view(in, out)``: it reads the [out, in] memory as [in, out], not as the transpose. The
    networks trained with it (Pointcept's SpUNet ``proj`` shortcuts and ``final`` head) learnt that matrix, so
    the conversion reproduces it (checked against spconv in tests/models/test_convert_reference.py).
    """
    return t.reshape(t.shape[-1], t.shape[0])


def _spconv(t: Tensor, _: Rule) -> Tensor:
    # spconv 2.x keeps [out, kx, ky, kz, in]; pcbench's sparse convolutions keep [K, in, out] with the kernel
    # offsets in conv3d order (dx slowest), which is the row-major order of (kx, ky, kz)
    if t.dim() != 5:
        return t
    if t.shape[1:4] == (1, 1, 1):
        return _spconv_1x1(t).unsqueeze(0)
    return t.permute(1, 2, 3, 4, 0).reshape(-1, t.shape[4], t.shape[0])


def _spconv_linear(t: Tensor, _: Rule) -> Tensor:
    # a 1x1x1 spconv head [out, 1, 1, 1, in] is a Linear [out, in] of spconv's kernel-1 matrix
    return _spconv_1x1(t).T if t.dim() == 5 else t


def _minkowski(t: Tensor, _: Rule) -> Tensor:
    # MinkowskiEngine kernels are [K, in, out] ([in, out] for kernel 1 in some versions). Odd kernels list their
    # offsets with x fastest, even (2x2x2) ones with x slowest, as torchsparse's MinkowskiEngine-compatible
    # kernel region spells out (torchsparse/nn/utils/kernel.py); pcbench lists x slowest in both. Not checked
    # numerically here: MinkowskiEngine has no CPU wheel to run against.
    if t.dim() == 2:
        return t.unsqueeze(0)
    k = round(t.shape[0] ** (1 / 3))
    if t.dim() != 3 or k ** 3 != t.shape[0] or k % 2 == 0:
        return t
    return t.reshape(k, k, k, t.shape[1], t.shape[2]).permute(2, 1, 0, 3, 4).reshape(t.shape)


def _minkowski_linear(t: Tensor, _: Rule) -> Tensor:
    # a kernel-1 MinkowskiConvolution head [1, in, out] or [in, out] is a Linear [out, in]
    return t.reshape(t.shape[-2], t.shape[-1]).T


_TRANSFORMS: dict[str, Callable[[Tensor, Rule], Tensor]] = {
    "minkowski": _minkowski,
    "minkowski_linear": _minkowski_linear,
    "copy": lambda t, _: t,
    "squeeze": _squeeze,
    "feat_xyz_to_xyz_feat": _feat_xyz_to_xyz_feat,
    "spconv": _spconv,
    "spconv_linear": _spconv_linear,
}

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.{k}", f"{dst}.{k}") for k in _BN_KEYS]


def _lin(src: str, dst: str, bias: bool = True, transform: str = "squeeze") -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.weight", transform)] + ([Rule(f"{src}.bias", f"{dst}.bias")] if bias else [])


def _names(module: nn.Module, kind: type[nn.Module], prefix: str) -> list[str]:
    """Dotted names (under ``prefix``) of the ``kind`` submodules of ``module``, in registration order."""
    return [f"{prefix}.{n}" if n else prefix for n, m in module.named_modules() if isinstance(m, kind)]


def _head_rules(model: nn.Module, linears: list[str], norms: list[str], biases: list[bool]) -> list[Rule]:
    """The classifier head: source linears / BNs in order onto pcbench's ``head`` linears / BNs."""
    dst_lin = _names(model.head, nn.Linear, "head")
    dst_bn = _names(model.head, nn.BatchNorm1d, "head")
    if len(dst_lin) != len(linears) or len(dst_bn) != len(norms):
        raise ConversionError(f"the source head has {len(linears)} linear / {len(norms)} BN layers, pcbench's "
                              f"{type(model).__name__}.head has {len(dst_lin)} / {len(dst_bn)}: check head_hidden "
                              "of the model config")
    rules = [r for s, d, b in zip(linears, dst_lin, biases, strict=True) for r in _lin(s, d, b, "copy")]
    return rules + [r for s, d in zip(norms, dst_bn, strict=True) for r in _bn(s, d)]


# --------------------------------------------------------------------------------------------- PointNet++
def _map_yanx27_pointnet2(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
    """yanx27 ``get_model`` (SSG or MSG classifier) onto :class:`pcbench.models.pointnet2.PointNet2Cls`.

    SSG levels are ``sa{i}.mlp_convs.{k}`` / ``mlp_bns.{k}``; MSG levels ``sa{i}.conv_blocks.{b}.{k}`` /
    ``bn_blocks.{b}.{k}``, whose first conv sees ``[features, xyz]`` (columns reordered here); the group-all
    level ``sa{L+1}`` and the head ``fc1 bn1 fc2 bn2 fc3``.
    """
    rules: list[Rule] = []
    n_levels = len(model.levels)
    for i, level in enumerate(model.levels):
        src = f"sa{i + 1}"
        msg = any(k.startswith(f"{src}.conv_blocks.") for k in sd)
        for b, branch in enumerate(level.branches):
            for k in range(len(branch.linears)):
                conv = f"{src}.conv_blocks.{b}.{k}" if msg else f"{src}.mlp_convs.{k}"
                bn = f"{src}.bn_blocks.{b}.{k}" if msg else f"{src}.mlp_bns.{k}"
                dst = f"levels.{i}.branches.{b}"
                first_msg = msg and k == 0 and (i > 0 or model.in_channels > 0)  # level 0 without features: xyz only
                rules += _lin(conv, f"{dst}.linears.{k}", True, "feat_xyz_to_xyz_feat" if first_msg else "squeeze")
                rules += _bn(bn, f"{dst}.norms.{k}")
    g = f"sa{n_levels + 1}"
    mlp = _names(model.global_sa.mlp, nn.Linear, "global_sa.mlp")
    mlp_bn = _names(model.global_sa.mlp, nn.BatchNorm1d, "global_sa.mlp")
    for k, (lin, bn) in enumerate(zip(mlp, mlp_bn, strict=True)):
        rules += _lin(f"{g}.mlp_convs.{k}", lin) + _bn(f"{g}.mlp_bns.{k}", bn)
    k = len(mlp)
    rules += _lin(f"{g}.mlp_convs.{k}", "global_sa.last") + _bn(f"{g}.mlp_bns.{k}", "global_sa.last_norm")
    n_hidden = len(_names(model.head, nn.Linear, "head")) - 1
    rules += _head_rules(model, [f"fc{j + 1}" for j in range(n_hidden + 1)], [f"bn{j + 1}" for j in range(n_hidden)],
                         [True] * (n_hidden + 1))
    return rules


def _shape_yanx27_pointnet2(sd: Mapping[str, Tensor]) -> tuple[int, int]:
    """(in_channels, num_classes) of a yanx27 classifier: first conv sees 3 + features, last fc gives classes."""
    first = sd.get("sa1.mlp_convs.0.weight", sd.get("sa1.conv_blocks.0.0.weight"))
    last = max((k for k in sd if k.startswith("fc") and k.endswith(".weight")), key=lambda k: int(k[2:-7]),
               default=None)
    if first is None or last is None:
        raise ConversionError("not a yanx27 PointNet++ classifier: no sa1.mlp_convs.0.weight / "
                              "sa1.conv_blocks.0.0.weight or fc*.weight key")
    return int(first.shape[1]) - 3, int(sd[last].shape[0])


# --------------------------------------------------------------------------------------------- PCT
def _map_pct_pytorch(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
    """PCT_Pytorch ``Pct`` onto :class:`pcbench.models.pct.PCTCls`.

    ``conv1 bn1 conv2 bn2`` (point embedding), ``gather_local_{0,1}`` (neighbour embeddings), ``pt_last``
    (two conv-BN, then ``sa1..sa4`` offset-attention layers whose ``q_conv`` shares ``k_conv``'s weight),
    ``conv_fuse``, and the head ``linear1 bn6 linear2 bn7 linear3``.
    """
    rules = _lin("conv1", "embed.0", False) + _bn("bn1", "embed.1") + _lin("conv2", "embed.3", False)
    rules += _bn("bn2", "embed.4")
    for i, dst in enumerate(("group1", "group2")):
        src = f"gather_local_{i}"
        rules += _lin(f"{src}.conv1", f"{dst}.linear1", False) + _bn(f"{src}.bn1", f"{dst}.bn1")
        rules += _lin(f"{src}.conv2", f"{dst}.linear2", False) + _bn(f"{src}.bn2", f"{dst}.bn2")
    rules += _lin("pt_last.conv1", "attention.pre.0", False) + _bn("pt_last.bn1", "attention.pre.1")
    rules += _lin("pt_last.conv2", "attention.pre.3", False) + _bn("pt_last.bn2", "attention.pre.4")
    for j in range(len(model.attention.layers)):
        src, dst = f"pt_last.sa{j + 1}", f"attention.layers.{j}"
        rules += _lin(f"{src}.k_conv", f"{dst}.qk", False) + _lin(f"{src}.v_conv", f"{dst}.v")
        rules += _lin(f"{src}.trans_conv", f"{dst}.trans") + _bn(f"{src}.after_norm", f"{dst}.norm")
    rules += _lin("conv_fuse.0", "fuse.0", False) + _bn("conv_fuse.1", "fuse.1")
    rules += _head_rules(model, ["linear1", "linear2", "linear3"], ["bn6", "bn7"], [False, True, True])
    return rules


def _shape_pct_pytorch(sd: Mapping[str, Tensor]) -> tuple[int, int]:
    """(in_channels, num_classes) of a PCT_Pytorch ``Pct``: conv1 sees xyz (+ features), linear3 gives classes."""
    if "conv1.weight" not in sd or "linear3.weight" not in sd:
        raise ConversionError("not a PCT_Pytorch Pct checkpoint: no conv1.weight / linear3.weight key")
    return int(sd["conv1.weight"].shape[1]) - 3, int(sd["linear3.weight"].shape[0])


def _pct_duplicates(sd: Mapping[str, Tensor]) -> dict[str, str]:
    """``q_conv.weight`` is ``k_conv.weight`` (one parameter registered twice); both keys are saved."""
    return {k: k.replace(".q_conv.", ".k_conv.") for k in sd if ".q_conv." in k}


# --------------------------------------------------------------------------------------------- SpUNet
def _map_tpc_spunet(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
    """torch-pointcloud ``SpUNet`` (Pointcept SpUNet-v1m1's layout) onto :class:`pcbench.models.spunet.SpUNet`.

    ``encoder.conv_input`` / ``encoder.down.{i}`` / ``encoder.enc.{i}.block{j}``, then ``decoder.up.{i}`` and
    ``decoder.dec.{i}.block{j}`` numbered from the finest level (pcbench numbers the decoder from the coarsest)
    with the residual projection ``proj`` (pcbench: ``shortcut``), and the 1x1x1 ``head``.
    """
    n_up = len(model.up)
    rules: list[Rule] = []
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "stem":
            src = ["encoder", "conv_input", {"conv": "0", "norm": "1"}[parts[1]], *parts[2:]]
        elif parts[0] == "down":
            src = ["encoder", "down", parts[1], {"conv": "0", "norm": "1"}[parts[2]], *parts[3:]]
        elif parts[0] == "enc":
            src = ["encoder", "enc", parts[1], f"block{parts[2]}", *parts[3:]]
        elif parts[0] == "up":
            src = ["decoder", "up", str(n_up - 1 - int(parts[1])), {"conv": "0", "norm": "1"}[parts[2]], *parts[3:]]
        elif parts[0] == "dec":
            rest = ["proj", *parts[4:]] if parts[3] == "shortcut" else parts[3:]
            src = ["decoder", "dec", str(n_up - 1 - int(parts[1])), f"block{parts[2]}", *rest]
        else:
            src = parts
        how = "copy"
        if key == "head.weight":
            how = "spconv_linear"
        elif parts[-1] == "weight" and value.dim() == 3:
            how = "spconv"
        rules.append(Rule(".".join(src), key, how))
    return rules


def _shape_tpc_spunet(sd: Mapping[str, Tensor]) -> tuple[int, int]:
    """(in_channels, num_classes): the input convolution's last axis, the head's rows."""
    if "encoder.conv_input.0.weight" not in sd or "head.weight" not in sd:
        raise ConversionError("not a torch-pointcloud SpUNet checkpoint: no encoder.conv_input.0.weight / "
                              "head.weight key")
    return int(sd["encoder.conv_input.0.weight"].shape[-1]), int(sd["head.weight"].shape[0])


def _pointcept_name(tpc: str) -> str:
    """torch-pointcloud's SpUNet key -> Pointcept's: one ``backbone`` module, BatchNorms unwrapped and named
    ``bn1`` / ``bn2`` inside blocks, the head called ``final``."""
    parts = [p for p in tpc.split(".") if p != "module"]
    if parts[0] in ("encoder", "decoder"):
        parts[0] = "backbone"
    elif parts[0] == "head":
        parts = ["backbone", "final", *parts[1:]]
    return ".".join({"norm1": "bn1", "norm2": "bn2"}.get(p, p) for p in parts)


def _map_pointcept_spunet(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
    """Pointcept ``SpUNet-v1m1`` (a ``DefaultSegmentor``'s ``backbone``) onto pcbench's SpUNet: the
    torch-pointcloud layout under Pointcept's names (see :func:`_pointcept_name`)."""
    return [Rule(_pointcept_name(r.src), r.dst, r.transform) for r in _map_tpc_spunet(sd, model)]


def _shape_pointcept_spunet(sd: Mapping[str, Tensor]) -> tuple[int, int]:
    """(in_channels, num_classes) of a Pointcept SpUNet: input convolution's last axis, ``final``'s rows."""
    if "backbone.conv_input.0.weight" not in sd or "backbone.final.weight" not in sd:
        raise ConversionError("not a Pointcept SpUNet checkpoint: no backbone.conv_input.0.weight / "
                              "backbone.final.weight key")
    return int(sd["backbone.conv_input.0.weight"].shape[-1]), int(sd["backbone.final.weight"].shape[0])


# --------------------------------------------------------------------------------------------- PTv3
def _ptv3_block_src(rest: list[str], layout: str) -> list[str]:
    """Key inside one PTv3 block: pcbench ``cpe_conv cpe_linear cpe_norm norm1 attn norm2 mlp.{0,3}``."""
    head, tail = rest[0], rest[1:]
    if layout == "tpc":
        return [{"cpe_linear": "cpe_proj"}.get(head, head), *tail]
    if head == "mlp":  # Pointcept's MLP module inside a PointSequential: mlp.0.fc1 / mlp.0.fc2
        return ["mlp", "0", {"0": "fc1", "3": "fc2"}[tail[0]], *tail[1:]]
    if head in ("norm1", "norm2"):  # PointSequential(LayerNorm)
        return [head, "0", *tail]
    cpe = {"cpe_conv": "0", "cpe_linear": "1", "cpe_norm": "2"}
    return ["cpe", cpe[head], *tail] if head in cpe else rest


def _ptv3_src(key: str, n_up: int, layout: str) -> str:
    """The source key of pcbench PTv3 key ``key`` in torch-pointcloud's (``tpc``) or Pointcept's layout."""
    p = key.split(".")
    tpc = layout == "tpc"
    if p[0] in ("embed_conv", "embed_norm"):
        if tpc:
            return ".".join(["encoder", "stem", "stem" if p[0] == "embed_conv" else "norm.module", *p[1:]])
        return ".".join(["backbone", "embedding", "stem", "conv" if p[0] == "embed_conv" else "norm", *p[1:]])
    if p[0] == "down":  # pooling into encoder stage i + 1
        i = int(p[1]) + 1
        if tpc:
            return ".".join(["encoder", "blocks", str(i), "downsample", "norm.module" if p[2] == "norm" else p[2], *p[3:]])
        return ".".join(["backbone", "enc", f"enc{i}", "down", "norm.0" if p[2] == "norm" else p[2], *p[3:]])
    if p[0] == "enc":
        if tpc:
            return ".".join(["encoder", "blocks", p[1], "blocks", p[2], *_ptv3_block_src(p[3:], layout)])
        return ".".join(["backbone", "enc", f"enc{p[1]}", f"block{p[2]}", *_ptv3_block_src(p[3:], layout)])
    if p[0] == "up":  # pcbench up.{s}.proj(_skip).{0 linear, 1 BN}
        if tpc:
            name = {("proj", "0"): "proj", ("proj", "1"): "norm.module", ("proj_skip", "0"): "proj_skip",
                    ("proj_skip", "1"): "norm_skip.module"}[(p[2], p[3])]
            return ".".join(["decoder", "blocks", str(n_up - 1 - int(p[1])), "upsample", name, *p[4:]])
        return ".".join(["backbone", "dec", f"dec{p[1]}", "up", *p[2:]])
    if p[0] == "dec":  # torch-pointcloud numbers decoder stages coarsest first, Pointcept and pcbench by level
        if tpc:
            return ".".join(["decoder", "blocks", str(n_up - 1 - int(p[1])), "blocks", p[2],
                             *_ptv3_block_src(p[3:], layout)])
        return ".".join(["backbone", "dec", f"dec{p[1]}", f"block{p[2]}", *_ptv3_block_src(p[3:], layout)])
    if p[0] == "head":
        return key if tpc else ".".join(["seg_head", *p[1:]])
    return key


def _ptv3_rules(model: nn.Module, layout: str) -> list[Rule]:
    # The released PT-v3m1 weights were trained with Pointcept v1.5.1's block chaining: the key mapping is the same,
    # the converted network must be built with ptv3_seg's xcpe_legacy=true (see pcbench/models/zoo_registry.py)
    if getattr(model, "cls_mode", False):
        raise ConversionError("PTv3 converters cover the segmentation network (ptv3_seg); the published PTv3 "
                              "checkpoints are segmentation models")
    rules = []
    for key, value in model.state_dict().items():
        # sparse conv weights: pcbench [K, in, out] (3 dims) from spconv [out, kx, ky, kz, in]
        how = "spconv" if key.endswith("weight") and value.dim() == 3 else "copy"
        rules.append(Rule(_ptv3_src(key, len(model.up), layout), key, how))
    return rules


def _map_tpc_ptv3(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
    """torch-pointcloud ``PointTransformerV3Segmentation`` onto :class:`pcbench.models.ptv3.PointTransformerV3`.

    ``encoder.stem.{stem, norm.module}``, ``encoder.blocks.{s}.downsample.{proj, norm.module}`` (pooling into
    stage s), ``encoder.blocks.{s}.blocks.{j}`` (``cpe_proj`` is pcbench's ``cpe_linear``), the decoder
    ``decoder.blocks.{d}.upsample.{proj, norm, proj_skip, norm_skip}`` / ``.blocks.{j}`` numbered from the
    coarsest stage (pcbench numbers it by level), and ``head``.
    """
    return _ptv3_rules(model, "tpc")


def _map_pointcept_ptv3(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
    """Pointcept ``PT-v3m1`` in a ``DefaultSegmentorV2`` onto pcbench's PTv3.

    ``backbone.embedding.stem.{conv, norm}``, ``backbone.enc.enc{s}.down.{proj, norm.0}``,
    ``backbone.enc.enc{s}.block{j}.{cpe.0 (spconv), cpe.1, cpe.2, norm1.0, attn.qkv, attn.proj, norm2.0,
    mlp.0.fc1, mlp.0.fc2}``, ``backbone.dec.dec{s}.up.{proj, proj_skip}.{0, 1}`` / ``.block{j}`` and ``seg_head``
    (point_transformer_v3m1_base.py, default_segmentor_v2 in pointcept/models/default.py).
    """
    return _ptv3_rules(model, "pointcept")


def _shape_ptv3(stem: str, head: str, what: str) -> Callable[[Mapping[str, Tensor]], tuple[int, int]]:
    def shape(sd: Mapping[str, Tensor]) -> tuple[int, int]:
        """(in_channels, num_classes): the stem convolution's last axis, the head's rows."""
        if stem not in sd or head not in sd:
            raise ConversionError(f"not a {what} PTv3 segmentation checkpoint: no {stem} / {head} key")
        return int(sd[stem].shape[-1]), int(sd[head].shape[0])

    return shape


# --------------------------------------------------------------------------------------------- MinkUNet
def _minkunet_src(key: str) -> tuple[str, str]:
    """(source key, transform) of pcbench MinkUNet key ``key`` in Res16UNet's names (res16unet.py)."""
    p = key.split(".")
    conv = "kernel" if p[-1] == "weight" else p[-1]

    def bn(name: str) -> str:  # MinkowskiBatchNorm holds an nn.BatchNorm1d named bn
        return f"{name}.bn.{p[-1]}"

    if p[0] == "stem":
        return ("conv0p1s1.kernel", "minkowski") if p[1] == "conv" else (bn("bn0"), "copy")
    if p[0] in ("down", "up"):  # conv{i+1}p{2^i}s2 down; convtr{4+i}p{16/2^i}s2 up
        i = int(p[1])
        name = f"conv{i + 1}p{1 << i}s2" if p[0] == "down" else f"convtr{4 + i}p{16 >> i}s2"
        norm = f"bn{i + 1}" if p[0] == "down" else f"bntr{4 + i}"
        return (f"{name}.{conv}", "minkowski") if p[2] == "conv" else (bn(norm), "copy")
    if p[0] in ("enc", "dec"):  # block{1..4} encoder, block{5..8} decoder
        block = f"block{int(p[1]) + (1 if p[0] == 'enc' else 5)}.{p[2]}"
        if p[3] in ("conv1", "conv2"):
            return f"{block}.{p[3]}.kernel", "minkowski"
        if p[3] in ("norm1", "norm2"):
            return bn(f"{block}.{p[3]}"), "copy"
        if p[3] == "shortcut":  # downsample = Sequential(conv 1x1, norm)
            return ((f"{block}.downsample.0.kernel", "minkowski") if p[4] == "0"
                    else (bn(f"{block}.downsample.1"), "copy"))
    if p[0] == "head":
        return ("final.kernel", "minkowski_linear") if p[1] == "weight" else ("final.bias", "copy")
    return key, "copy"


def _minkunet_rules(prefix: str) -> Callable[[Mapping[str, Tensor], nn.Module], list[Rule]]:
    def rules(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
        """Res16UNet (``conv0p1s1 bn0``, ``conv{i}p{s}s2 bn{i} block{i}``, ``convtr{i}p{s}s2 bntr{i} block{i}``,
        ``final``; MinkowskiEngine kernels) onto :class:`pcbench.models.minkunet.MinkUNet`."""
        return [Rule(prefix + src, key, how) for key in model.state_dict() for src, how in [_minkunet_src(key)]]

    return rules


def _shape_minkunet(prefix: str) -> Callable[[Mapping[str, Tensor]], tuple[int, int]]:
    def shape(sd: Mapping[str, Tensor]) -> tuple[int, int]:
        """(in_channels, num_classes): the first kernel's input axis, the final kernel's output axis."""
        first, last = f"{prefix}conv0p1s1.kernel", f"{prefix}final.kernel"
        if first not in sd or last not in sd:
            raise ConversionError(f"not a Res16UNet (MinkUNet) checkpoint: no {first} / {last} key")
        return int(sd[first].shape[-2]), int(sd[last].shape[-1])

    return shape


# --------------------------------------------------------------------------------------------- PTv1
def _map_pointcept_ptv1(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
    """Pointcept ``PointTransformer-Seg50`` (a ``DefaultSegmentor``'s ``backbone``) onto
    :class:`pcbench.models.ptv1.PointTransformerSeg`.

    ``backbone.enc{i}`` is ``Sequential(TransitionDown, Bottleneck...)`` (pcbench ``encoder.stages.{i-1}.down`` /
    ``.blocks.{j}``), ``backbone.dec{i}`` is ``Sequential(TransitionUp, Bottleneck)`` numbered by level, ``dec5``
    first (pcbench ``up.{5-i}`` / ``dec_blocks.{5-i}.{j}``), and ``backbone.cls`` the head (pcbench ``head.mlp``);
    the layers inside keep the names of the original POSTECH code (point_transformer_seg.py).
    """
    n = len(model.up)
    rules = []
    for key in model.state_dict():
        p = key.split(".")
        if p[0] == "encoder":  # encoder.stages.{i}.down.* / encoder.stages.{i}.blocks.{j}.*
            i = int(p[2]) + 1
            src = [f"enc{i}", "0", *p[4:]] if p[3] == "down" else [f"enc{i}", str(int(p[4]) + 1), *p[5:]]
        elif p[0] == "up":
            src = [f"dec{n - int(p[1])}", "0", *p[2:]]
        elif p[0] == "dec_blocks":
            src = [f"dec{n - int(p[1])}", str(int(p[2]) + 1), *p[3:]]
        elif p[0] == "head" and p[1] == "mlp":
            src = ["cls", *p[2:]]
        else:
            src = p
        rules.append(Rule(".".join(["backbone", *src]), key))
    return rules


def _shape_pointcept_ptv1(sd: Mapping[str, Tensor]) -> tuple[int, int]:
    """(in_channels, num_classes): Pointcept's first linear sees the features it was given (coord, colour,
    normal: 9), pcbench's ``in_channels`` excludes the xyz it prepends itself; the head's rows give classes."""
    first, last = "backbone.enc1.0.linear.weight", "backbone.cls.3.weight"
    if first not in sd or last not in sd:
        raise ConversionError(f"not a Pointcept PointTransformer-Seg checkpoint: no {first} / {last} key")
    return int(sd[first].shape[1]) - 3, int(sd[last].shape[0])


# --------------------------------------------------------------------------------------------- PTv2
def _lbr_src(index: str, rest: list[str]) -> list[str]:
    """pcbench's Linear-BN-ReLU ``{0 Linear, 1 BN}`` -> Pointcept's ``{0 Linear, 1 PointBatchNorm.norm}``."""
    return [index, *rest] if index == "0" else [index, "norm", *rest]


def _ptv2_block_src(rest: list[str]) -> list[str]:
    """Key inside one PTv2 block (pcbench ``fc1 norm1 attn norm2 fc3 norm3``) in Pointcept's names."""
    head, tail = rest[0], rest[1:]
    if head in ("norm1", "norm2", "norm3"):
        return [head, "norm", *tail]
    if head != "attn":
        return rest
    name, tail = tail[0], tail[1:]
    if name in ("linear_q", "linear_k"):
        return ["attn", name, *_lbr_src(tail[0], tail[1:])]
    if name in ("pe_bias", "pe_mul", "weight_encoding"):  # Sequential(LBR, Linear) -> Sequential(L, BN, ReLU, L)
        src = {"pe_bias": "linear_p_bias", "pe_mul": "linear_p_multiplier"}.get(name, name)
        inner = _lbr_src(tail[1], tail[2:]) if tail[0] == "0" else ["3", *tail[1:]]
        return ["attn", src, *inner]
    return rest


def _map_pointcept_ptv2(sd: Mapping[str, Tensor], model: nn.Module) -> list[Rule]:
    """Pointcept ``PT-v2m2`` (a ``DefaultSegmentor``'s ``backbone``, head inside) onto
    :class:`pcbench.models.ptv2.PointTransformerV2`.

    ``backbone.patch_embed.{proj, blocks.blocks.{j}}``, ``backbone.enc_stages.{i}.{down.fc, down.norm,
    blocks.blocks.{j}}``, ``backbone.dec_stages.{i}.{up.proj, up.proj_skip, blocks.blocks.{j}}`` and
    ``backbone.seg_head.{0, 1, 3}``; every BatchNorm is a ``PointBatchNorm`` holding ``norm``, the position and
    weight encodings are flat ``Sequential(Linear, BN, ReLU, Linear)`` (point_transformer_v2m2_base.py).
    """
    if getattr(model, "cls_mode", False):
        raise ConversionError("the Pointcept PTv2 converter covers the segmentation network (ptv2_seg)")
    rules = []
    for key in model.state_dict():
        p = key.split(".")
        if p[0] == "embed_proj":
            src = ["patch_embed", "proj", *_lbr_src(p[1], p[2:])]
        elif p[0] == "embed_blocks":
            src = ["patch_embed", "blocks", "blocks", p[2], *_ptv2_block_src(p[3:])]
        elif p[0] == "down":  # pcbench down.{i}.proj.{0 Linear, 1 BN}
            src = ["enc_stages", p[1], "down", *(["fc"] if p[3] == "0" else ["norm", "norm"]), *p[4:]]
        elif p[0] in ("enc", "dec"):
            src = [f"{p[0]}_stages", p[1], "blocks", "blocks", p[3], *_ptv2_block_src(p[4:])]
        elif p[0] == "up":
            src = ["dec_stages", p[1], "up", p[2], *_lbr_src(p[3], p[4:])]
        elif p[0] == "head":  # Sequential(LBR, Linear) -> seg_head Sequential(L, BN, ReLU, L)
            src = ["seg_head", *(_lbr_src(p[2], p[3:]) if p[1] == "0" else ["3", *p[2:]])]
        else:
            src = p
        rules.append(Rule(".".join(["backbone", *src]), key))
    return rules


def _shape_pointcept_ptv2(sd: Mapping[str, Tensor]) -> tuple[int, int]:
    """(in_channels, num_classes): the patch embedding's input width, the head's rows."""
    first, last = "backbone.patch_embed.proj.0.weight", "backbone.seg_head.3.weight"
    if first not in sd or last not in sd:
        raise ConversionError(f"not a Pointcept PT-v2m2 segmentation checkpoint: no {first} / {last} key")
    return int(sd[first].shape[1]), int(sd[last].shape[0])


@dataclass(frozen=True)
class Converter:
    """How one (source, model config) pair maps: key rules, shape inference, keys that repeat another key."""

    rules: Callable[[Mapping[str, Tensor], nn.Module], list[Rule]]
    shape: Callable[[Mapping[str, Tensor]], tuple[int, int]]
    duplicates: Callable[[Mapping[str, Tensor]], dict[str, str]] = lambda sd: {}


#: (source, model config name) -> converter. Configs not listed have no published source of that kind.
CONVERTERS: dict[tuple[str, str], Converter] = {
    ("yanx27", "pointnet2_ssg_cls"): Converter(_map_yanx27_pointnet2, _shape_yanx27_pointnet2),
    ("yanx27", "pointnet2_msg_cls"): Converter(_map_yanx27_pointnet2, _shape_yanx27_pointnet2),
    ("pct_pytorch", "pct_cls"): Converter(_map_pct_pytorch, _shape_pct_pytorch, _pct_duplicates),
    ("torch-pointcloud", "spunet_base_seg"): Converter(_map_tpc_spunet, _shape_tpc_spunet),
    ("pointcept", "spunet_base_seg"): Converter(_map_pointcept_spunet, _shape_pointcept_spunet),
    ("torch-pointcloud", "ptv3_seg"): Converter(
        _map_tpc_ptv3, _shape_ptv3("encoder.stem.stem.weight", "head.weight", "torch-pointcloud")),
    ("minkowski", "minkunet34c_seg"): Converter(_minkunet_rules(""), _shape_minkunet("")),
    ("pointcept", "minkunet34c_seg"): Converter(_minkunet_rules("backbone."), _shape_minkunet("backbone.")),
    ("pointcept", "ptv1_seg"): Converter(_map_pointcept_ptv1, _shape_pointcept_ptv1),
    ("pointcept", "ptv2_seg"): Converter(_map_pointcept_ptv2, _shape_pointcept_ptv2),
    ("pointcept", "ptv3_seg"): Converter(
        _map_pointcept_ptv3, _shape_ptv3("backbone.embedding.stem.conv.weight", "seg_head.weight", "Pointcept")),
}


# --------------------------------------------------------------------------------------------- driver
def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe_globals() -> list[Any]:
    """numpy scalars that reference training scripts store beside the weights (yanx27 saves ``instance_acc``)."""
    import numpy as np  # noqa: PLC0415

    out: list[Any] = [np.dtype]
    core = getattr(np, "_core", None) or np.core
    out.append(core.multiarray.scalar)
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def load_source_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The flat state dict of a reference checkpoint, loaded with ``weights_only=True`` (no code runs).

    Unwraps the containers the references save (``model_state_dict``, ``state_dict``, ``model``) and the
    ``module.`` prefix of ``nn.DataParallel`` / DDP.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"source checkpoint {str(path)!r} does not exist; give the path of the downloaded file")
    if path.suffix == ".safetensors":  # torch-pointcloud's format: tensors only, no pickle at all
        try:
            from safetensors.torch import load_file  # noqa: PLC0415 - needed for this format only
        except ImportError as err:
            raise ConversionError(f"{path} is a safetensors file; pip install safetensors to read it") from err
        try:
            return dict(load_file(str(path)))
        except Exception as err:  # noqa: BLE001 - a damaged file
            raise ConversionError(f"source checkpoint {str(path)!r} is not a readable safetensors file ({err})") from err
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a plain checkpoint"
        raise ConversionError(f"source checkpoint {str(path)!r} cannot be loaded with weights_only=True ({err}); "
                              "it is damaged or holds pickled objects other than tensors") from err
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(f"source checkpoint {str(path)!r} holds no state dict (a mapping of names to "
                              "tensors, possibly under model_state_dict / state_dict / model)")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _converter(source: str, model_cfg_name: str) -> Converter:
    if source not in SOURCES:
        raise ConversionError(f"source={source!r} is not known; use one of {sorted(SOURCES)}")
    conv = CONVERTERS.get((source, model_cfg_name))
    if conv is None:
        options = sorted(m for s, m in CONVERTERS if s == source)
        raise ConversionError(f"no converter from {source} to model config {model_cfg_name!r}; {source} "
                              f"checkpoints convert to {options}")
    return conv


def convert_state_dict(sd: Mapping[str, Tensor], source: str, model: nn.Module,
                       model_cfg_name: str) -> tuple[dict[str, Tensor], list[list[str]]]:
    """(pcbench state dict, mapping rows ``[source key, pcbench key, transform]``) for ``model``'s layout.

    ConversionError naming the key when a pcbench key is missing from the source, a source key is left over,
    or a shape differs.
    """
    conv = _converter(source, model_cfg_name)
    target = model.state_dict()
    rules = conv.rules(sd, model)
    dups = conv.duplicates(sd)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        if rule.dst not in target:
            raise ConversionError(f"converter {source} -> {model_cfg_name} writes {rule.dst!r}, which "
                                  f"{type(model).__name__} does not have (a converter bug: report it)")
        if rule.dst in out:
            raise ConversionError(f"converter {source} -> {model_cfg_name} writes {rule.dst!r} twice")
        if rule.src not in sd:
            raise ConversionError(f"source checkpoint has no key {rule.src!r} (needed for pcbench's {rule.dst!r}); "
                                  f"it is not a {source} checkpoint of {model_cfg_name}, or its architecture differs")
        value = _TRANSFORMS[rule.transform](sd[rule.src], rule)
        if tuple(value.shape) != tuple(target[rule.dst].shape):
            raise ConversionError(f"shape mismatch: source {rule.src!r} {tuple(sd[rule.src].shape)} -> pcbench "
                                  f"{rule.dst!r} needs {tuple(target[rule.dst].shape)}; the model config "
                                  f"{model_cfg_name} does not match the checkpoint's architecture")
        out[rule.dst] = value.detach().to(target[rule.dst].dtype).clone().contiguous()
        used.add(rule.src)
    missing = [k for k in target if k not in out]
    if missing:
        raise ConversionError(f"{len(missing)} pcbench keys have no source, first {missing[0]!r}: the source "
                              f"checkpoint is not a {model_cfg_name} network")
    for dup, orig in dups.items():
        if orig in sd and not torch.equal(sd[dup], sd[orig]):
            raise ConversionError(f"source {dup!r} should equal {orig!r} (a shared parameter) but differs")
    leftover = [k for k in sd if k not in used and k not in dups]
    if leftover:
        raise ConversionError(f"{len(leftover)} source keys do not map to pcbench's {model_cfg_name}, first "
                              f"{leftover[0]!r}: the checkpoint holds layers this model does not have")
    mapping = [[r.src, r.dst, r.transform] for r in rules] + [[d, o, "duplicate"] for d, o in sorted(dups.items())]
    return out, mapping


def convert_checkpoint(src: str | os.PathLike, source: str, model_cfg_name: str) -> dict[str, Any]:
    """Convert the reference checkpoint file ``src`` into a pcbench checkpoint dict.

    The result (save it with ``torch.save``; it loads with ``weights_only=True``) holds ``format``,
    ``model`` (the state dict), ``model_config`` (the config name), ``in_channels`` and ``num_classes`` (read off
    the source's shapes), ``model_yaml`` (the model config with both filled) and ``source`` (``kind``, ``file``,
    ``sha256`` of the source file, ``mapping`` rows ``[source key, pcbench key, transform]``).
    """
    from .build import build_model  # noqa: PLC0415
    from .zoo import model_config  # noqa: PLC0415

    conv = _converter(source, model_cfg_name)
    sd = load_source_checkpoint(src)
    in_channels, num_classes = conv.shape(sd)
    cfg = model_config(model_cfg_name)
    model = build_model(cfg, in_channels=in_channels, num_classes=num_classes)
    state, mapping = convert_state_dict(sd, source, model, model_cfg_name)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    cfg.in_channels, cfg.num_classes = in_channels, num_classes
    return {
        "format": FORMAT,
        "model": state,
        "model_config": model_cfg_name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "model_yaml": OmegaConf.to_yaml(cfg),
        "source": {"kind": source, "repository": SOURCES[source], "file": Path(src).name,
                   "sha256": file_sha256(src), "mapping": mapping},
    }
