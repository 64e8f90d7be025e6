"""Checkpoints the field's authors published: where each lives, what it is, and what its authors report for it.

Every entry names the pcbench model config it converts to, the dataset, the download URL, the sha256 where it is
known (``None`` otherwise: the first download prints the hash to pin), the licence, and the published figure
with the protocol it was measured under and the place it is reported. :func:`fetch_weights` downloads through
pooch (hash-checked when the hash is known), converts with :func:`pcbench.models.convert.convert_checkpoint` and
writes the pcbench checkpoint next to the download; offline users give ``file=`` a copy they already have.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pcbench.io import atomic_path

from .convert import CONVERTERS, convert_checkpoint, file_sha256

__all__ = ["PUBLISHED", "PublishedWeights", "cache_dir", "fetch_weights"]


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint (see the module docstring for the fields' meaning)."""

    name: str
    model_config: str
    source: str  # a key of pcbench.models.convert.SOURCES, or the repository when no converter exists yet
    dataset: str  # the pcbench data config it was trained on (modelnet40, scannet20, scannet200)
    url: str
    sha256: str | None
    licence: str
    metric: str
    value: float
    protocol: str
    reference: str
    #: model-config keys the checkpoint's network needs beyond the shipped config (applied by suites and by
    #: ``create_model(..., weights=<this name>)``), e.g. ``{"xcpe_legacy": True}`` for the released PT-v3m1 weights
    model_overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def convertible(self) -> bool:
        """Whether pcbench has a converter for this checkpoint's (source, model config)."""
        return (self.source, self.model_config) in CONVERTERS

    def to_dict(self) -> dict[str, Any]:
        """Plain fields plus ``convertible``."""
        return {**asdict(self), "model_overrides": dict(self.model_overrides), "convertible": self.convertible}


_YANX27 = "https://github.com/yanx27/Pointnet_Pointnet2_pytorch/raw/master/log/classification"
_PCT = "https://github.com/Strawberry-Eat-Mango/PCT_Pytorch/raw/main/checkpoints/best/models/model.t7"
_PTV3 = "https://huggingface.co/Pointcept/PointTransformerV3/tree/main"
_TPC = "https://huggingface.co/torch-pointcloud"
_TPC_REF = "torch-pointcloud 0.0.18 (PyPI) models/{file} register_model({name!r}), weights revision @ {rev}"
_MINKNET = "https://node1.chrischoy.org/data/publications/minknet"
# The released PT-v3m1 weights were trained with Pointcept v1.5.1's block, whose next xCPE convolves the previous
# block's MLP branch instead of its output (fixed in v1.5.2; torch-pointcloud builds them with legacy=True,
# models/point_transformer_v3.py _ptv3_seg_hparams). The keys convert like any PTv3 checkpoint; the network is
# pcbench's ptv3_seg with xcpe_legacy=true (equal to torch-pointcloud's legacy network in
# tests/models/test_equivalence_reference.py), which the entries' model_overrides give suites and create_model.
_PTV3_LEGACY = (("xcpe_legacy", True),)

#: name -> entry. Figures are the authors' own, quoted with their protocol, never re-measured here.
PUBLISHED: dict[str, PublishedWeights] = {w.name: w for w in [
    PublishedWeights(
        "pointnet2_ssg_cls.modelnet40.yanx27", "pointnet2_ssg_cls", "yanx27", "modelnet40",
        f"{_YANX27}/pointnet2_ssg_wo_normals/checkpoints/best_model.pth", None, "MIT",
        "overall accuracy", 92.2,
        "ModelNet40 test split, 1024 points, xyz only (no normals), mean of 3 votes (test_classification.py "
        "--num_votes 3)",
        "yanx27/Pointnet_Pointnet2_pytorch README.md @ eb64fe0, table 'PointNet2_SSG (Pytorch without normal)'"),
    PublishedWeights(
        "pointnet2_msg_cls.modelnet40.yanx27", "pointnet2_msg_cls", "yanx27", "modelnet40",
        f"{_YANX27}/pointnet2_msg_normals/checkpoints/best_model.pth", None, "MIT",
        "overall accuracy", 92.8,
        "ModelNet40 test split, 1024 points, xyz + normals, mean of 3 votes (test_classification.py "
        "--use_normals --num_votes 3)",
        "yanx27/Pointnet_Pointnet2_pytorch README.md @ eb64fe0, table 'PointNet2_MSG (Pytorch with normal)'"),
    PublishedWeights(
        "pct_cls.modelnet40.pct_pytorch", "pct_cls", "pct_pytorch", "modelnet40", _PCT, None, "MIT",
        "overall accuracy", 93.2,
        "ModelNet40 test split ('validation' in the README), 1024 points, xyz only, one pass (main.py --eval)",
        "Strawberry-Eat-Mango/PCT_Pytorch README.md @ 0199a3b, 'Models'"),
    PublishedWeights(
        "ptv3_seg.scannet20.pointcept", "ptv3_seg",
        "Pointcept (a Hugging Face folder: download model/model_best.pth, then pcbench-convert source=pointcept "
        "model=ptv3_seg)", "scannet20",
        f"{_PTV3}/scannet-semseg-pt-v3m1-0-base", None, "MIT (Pointcept code); weights: see the Hugging Face page",
        "val mIoU", 77.6,
        "ScanNet v2 val, Pointcept SemSegTester (fragments over test-time augmentations, 4 GPUs training)",
        "Pointcept/Pointcept README.md @ d74c646, 'Indoor semantic segmentation' table (issue Pointcept#357 reports "
        "73.6 without test-time augmentation)", model_overrides=_PTV3_LEGACY),
    PublishedWeights(
        "spunet_base_seg.scannet20.torch-pointcloud", "spunet_base_seg", "torch-pointcloud", "scannet20",
        f"{_TPC}/spunet-v1m1.scannet20.pointcept/resolve/641cc7cc6035a4086dfed9f70d839e9f551d5955/model.safetensors",
        None, "MIT", "val mIoU", 75.67,
        "ScanNet v2 val (20 classes), torch-pointcloud's evaluation of Pointcept's SpUNet-v1m1 weights (colour in "
        "[-1, 1] + normals, 2 cm grid)",
        _TPC_REF.format(file="spunet.py", name="spunet-v1m1.scannet20.pointcept", rev="641cc7c")),
    PublishedWeights(
        "ptv3_seg.scannet20.torch-pointcloud", "ptv3_seg", "torch-pointcloud", "scannet20",
        f"{_TPC}/ptv3-base.scannet20.pointcept/resolve/3a8e0a66d76ecfb57d4dd0e4ef43de18f1491b41/model.safetensors",
        None, "MIT", "val mIoU", 77.42,
        "ScanNet v2 val (20 classes), torch-pointcloud's evaluation of Pointcept's PTv3 weights",
        _TPC_REF.format(file="point_transformer_v3.py", name="ptv3-base.scannet20.pointcept", rev="3a8e0a6"),
        model_overrides=_PTV3_LEGACY),
    PublishedWeights(
        "ptv3_seg.scannet200.torch-pointcloud", "ptv3_seg", "torch-pointcloud", "scannet200",
        f"{_TPC}/ptv3-base.scannet200.pointcept/resolve/1f1232df7e827ff72dd7cd038763e75516494462/model.safetensors",
        None, "MIT", "val mIoU", 35.12,
        "ScanNet200 val (200 classes), torch-pointcloud's evaluation of Pointcept's PTv3 ScanNet200 weights",
        _TPC_REF.format(file="point_transformer_v3.py", name="ptv3-base.scannet200.pointcept", rev="1f1232d"),
        model_overrides=_PTV3_LEGACY),
    PublishedWeights(
        "minkunet34c_seg.scannet20.minkowski", "minkunet34c_seg", "minkowski", "scannet20",
        f"{_MINKNET}/MinkUNet34C-train-conv1-5.pth", None, "MIT (repository licence)", "val mIoU", 72.219,
        "ScanNet v2 val, trained on train only, 2 cm voxels, 5x5x5 first convolution, no rotation average, no "
        "sliding window",
        "chrischoy/SpatioTemporalSegmentation README.md @ 5af74cb, 'Model Zoo' (Mink16UNet34C, ScanNet train, conv1 "
        "kernel 5)"),
    PublishedWeights(
        "pointnet2_ssg_cls.modelnet40.torch-pointcloud", "pointnet2_ssg_cls", "torch-pointcloud (PointNet++ layout)",
        "modelnet40",
        f"{_TPC}/pointnet2-ssg.modelnet40.xu-yan/resolve/9e1021fc09c3cfc2abc4072dcf1e970e0ea18c97/model.safetensors",
        None, "MIT", "overall accuracy", 92.30,
        "ModelNet40 test split, 1024 points by FPS, xyz only; yanx27's SSG weights re-hosted by torch-pointcloud",
        _TPC_REF.format(file="pointnet2.py", name="pointnet2-ssg.modelnet40.xu-yan", rev="9e1021f")),
]}


def cache_dir() -> Path:
    """Where downloads and converted checkpoints go: ``$PCBENCH_WEIGHTS`` or ``~/.cache/pcbench/weights``."""
    env = os.environ.get("PCBENCH_WEIGHTS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pcbench" / "weights"


def _entry(name: str) -> PublishedWeights:
    if name not in PUBLISHED:
        raise ValueError(f"no published checkpoint named {name!r}; `pcbench-weights list` shows {sorted(PUBLISHED)}")
    return PUBLISHED[name]


def _copy_file_url(url: str, output_file: str | Any, _pooch: Any = None) -> None:
    """A pooch downloader for ``file://`` URLs: copy the local file to ``output_file`` (a path or a file object)."""
    from urllib.parse import unquote, urlparse  # noqa: PLC0415

    src = Path(unquote(urlparse(url).path))
    if not src.is_file():
        raise ValueError(f"{url}: no such file")
    data = src.read_bytes()
    if hasattr(output_file, "write"):
        output_file.write(data)
    else:
        Path(output_file).write_bytes(data)


def _download(entry: PublishedWeights, folder: Path) -> Path:
    """The source file, downloaded by pooch with its hash checked (when known)."""
    try:
        import pooch  # noqa: PLC0415 - only downloads need it
    except ImportError as err:
        raise ValueError("downloading needs pooch (pip install pooch); or pass file=<the checkpoint you already "
                         "have>") from err
    known = f"sha256:{entry.sha256}" if entry.sha256 else None
    fname = f"{entry.name}.source{Path(entry.url).suffix or '.pth'}"
    # pooch knows http(s) / ftp / sftp / doi; file:// (a mirror on a shared file system, the tests) is a copy
    downloader = _copy_file_url if entry.url.startswith("file://") else None
    try:
        return Path(pooch.retrieve(entry.url, known_hash=known, fname=fname, path=folder, progressbar=False,
                                   downloader=downloader))
    except ValueError as err:  # pooch's hash mismatch
        raise ValueError(f"{entry.name}: the download from {entry.url} does not match the registered sha256 "
                         f"({err}); the file changed upstream or the download is damaged") from err


def fetch_weights(name: str, file: str | os.PathLike | None = None, folder: str | os.PathLike | None = None) -> Path:
    """Path of the converted pcbench checkpoint of the published checkpoint ``name`` (downloaded and converted
    once; ``file`` converts a local copy instead of downloading). The source's sha256 is checked when known."""
    entry = _entry(name)
    if not entry.convertible:
        raise ValueError(f"{name}: pcbench has no converter from {entry.source} to {entry.model_config} yet; the "
                         f"checkpoint is listed for its published figure only (download: {entry.url})")
    folder = Path(folder) if folder is not None else cache_dir()
    out = folder / f"{name}.pt"
    if file is not None:
        src = Path(file)
        if not src.is_file():
            raise ValueError(f"file={str(src)!r} does not exist; give the path of the downloaded checkpoint")
        if entry.sha256 and file_sha256(src) != entry.sha256:
            raise ValueError(f"{src}: sha256 {file_sha256(src)} differs from the registered {entry.sha256} of "
                             f"{name}; it is another file or a damaged copy")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        src = _download(entry, folder)
    state = convert_checkpoint(src, entry.source, entry.model_config)
    state["published"] = entry.to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out

