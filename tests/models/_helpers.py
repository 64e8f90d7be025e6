"""Inputs shared by the model tests: small synthetic object batches and real ModelNet / ScanNet samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from pcbench.models import build_model
from pcbench.ops import PointBatch, voxelize
from pcbench.testing.clouds import load_modelnet_txt, object_batch

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"

MODELNET_FILES = ["airplane/airplane_0126.txt", "chair/chair_0391.txt", "sofa/sofa_0034.txt",
                  "table/table_0053.txt", "monitor/monitor_0468.txt", "toilet/toilet_0409.txt", "bed/bed_0026.txt",
                  "guitar/guitar_0084.txt"]


def model_config(name: str, **overrides: object) -> DictConfig:
    """``conf/model/<name>.yaml`` with ``overrides`` applied (each must name a key the config has)."""
    cfg = OmegaConf.load(CONF_MODEL / f"{name}.yaml")
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"{name}.yaml has no key {key!r}")
        cfg[key] = value
    return cfg


def build_from_yaml(name: str, in_channels: int, num_classes: int, seed: int | None = 0,
                    **overrides: object) -> torch.nn.Module:
    """The model of ``conf/model/<name>.yaml`` (with ``overrides``) built as the trainer builds it."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_model(model_config(name, **overrides), in_channels=in_channels, num_classes=num_classes)


def ragged_objects(lengths: list[int], in_channels: int = 3, seed: int = 0) -> PointBatch:
    """Object clouds of the given sizes (spheres, boxes, tori in the unit sphere), random features."""
    clouds = [object_batch(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    coord = torch.cat(clouds) if clouds else torch.zeros(0, 3)
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(coord.shape[0], in_channels, generator=g)
    offset = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return PointBatch(coord, feat, offset, label=torch.arange(len(lengths)) % 5)


def modelnet_batch(root: Path, n_points: int, files: list[str] | None = None) -> PointBatch:
    """Real ModelNet40 samples (first ``n_points`` of each, as the resampled files are in random order),
    normals as features, labels = index in the official shape list."""
    base = root / "modelnet40" / "modelnet40_normal_resampled"
    names = (base / "modelnet40_shape_names.txt").read_text().split()
    coords, feats, labels = [], [], []
    for f in files or MODELNET_FILES[:2]:
        c, nrm = load_modelnet_txt(base / f)
        coords.append(c[:n_points])
        feats.append(nrm[:n_points])
        labels.append(names.index(f.split("/")[0]))
    offset = torch.tensor([len(c) for c in coords]).cumsum(0)
    return PointBatch(torch.cat(coords), torch.cat(feats), offset, label=torch.tensor(labels))


def scannet_crop(root: Path, voxel: float = 0.02, size: float = 2.0) -> tuple[PointBatch, int]:
    """ScanNet scene0000_00 vertices, 2 cm voxel-subsampled (first point per voxel), cropped to a
    ``size`` x ``size`` m column around the scene centre; colour in [0, 1] as features, v1 labels compacted
    to 0..C-1. Returns (batch, number of classes)."""
    from plyfile import PlyData  # noqa: PLC0415

    v = PlyData.read(str(root / "scannet/scans/scene0000_00/scene0000_00_vh_clean_2.labels.ply"))["vertex"]
    coord = torch.from_numpy(np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32))
    color = torch.from_numpy(np.stack([v["red"], v["green"], v["blue"]], 1).astype(np.float32) / 255.0)
    label = torch.from_numpy(np.asarray(v["label"]).astype(np.int64))
    _, inverse, counts = voxelize(coord, voxel)
    first = torch.full((counts.numel(),), coord.shape[0], dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(coord.shape[0]), "amin")
    coord, color, label = coord[first], color[first], label[first]
    centre = (coord.min(0).values + coord.max(0).values) / 2
    keep = ((coord[:, :2] - centre[:2]).abs() < size / 2).all(1)
    coord, color, label = coord[keep], color[keep], label[keep]
    uniq, label = torch.unique(label, return_inverse=True)
    return PointBatch(coord, color, torch.tensor([coord.shape[0]]), label=label), int(uniq.numel())


def per_cloud(batch: PointBatch) -> list[PointBatch]:
    """Each cloud of a packed batch as its own batch."""
    out = []
    start = 0
    for end in batch.offset.tolist():
        out.append(PointBatch(batch.coord[start:end], batch.feat[start:end], torch.tensor([end - start])))
        start = end
    return out


def permute_within_clouds(batch: PointBatch, seed: int = 0) -> tuple[PointBatch, Tensor]:
    """Shuffle the points inside every cloud; returns (batch, perm) with ``new[i] = old[perm[i]]``."""
    g = torch.Generator().manual_seed(seed)
    parts, start = [], 0
    for end in batch.offset.tolist():
        parts.append(torch.randperm(end - start, generator=g) + start)
        start = end
    perm = torch.cat(parts)
    return PointBatch(batch.coord[perm], batch.feat[perm], batch.offset, label=batch.label), perm


def overfit(model: torch.nn.Module, batch: PointBatch, target: Tensor, steps: int, lr: float = 1e-3) -> list[float]:
    """Train ``model`` on one batch with Adam; returns the loss of every step (train mode)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(batch), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def n_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plain_bn(norm: torch.nn.BatchNorm1d, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm of ``x [..., C]`` with ``norm``'s statistics, computed the textbook way."""
    return (x - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias


def naive_idw(query: Tensor, support: Tensor, feat: Tensor, query_offset: Tensor, support_offset: Tensor,
              k: int = 3) -> Tensor:
    """Inverse-distance weighted mean of the k nearest support features, one cloud at a time by brute force
    (``torch.cdist`` + sort): weights ``1 / (dist + 1e-8)`` normalised over the ``min(k, n)`` neighbours found."""
    out, q0, s0 = [], 0, 0
    for q1, s1 in zip(query_offset.tolist(), support_offset.tolist(), strict=True):
        q, s, f = query[q0:q1], support[s0:s1], feat[s0:s1]
        if s.shape[0] == 0:
            out.append(feat.new_zeros(q.shape[0], feat.shape[1]))
        else:
            d, i = torch.cdist(q.double(), s.double()).sort(1)
            w = 1.0 / (d[:, :k] + 1e-8)
            w = (w / w.sum(1, keepdim=True)).to(feat.dtype)
            out.append((f[i[:, :k]] * w.unsqueeze(-1)).sum(1))
        q0, s0 = q1, s1
    return torch.cat(out)
