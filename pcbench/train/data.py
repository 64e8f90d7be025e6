"""Datasets, splits and loaders from the ``data`` / ``aug`` / ``tta`` config groups.

Split protocol: ``data.splits`` names the prepared split used as train, val and test. ``val: null`` (ModelNet,
ScanObjectNN: no validation split ships) holds out ``data.val_fraction`` of train, seeded by
``data.val_seed`` and stratified by class (:func:`stratified_holdout`); those samples get the evaluation
transforms and never reach the training loader.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset, Subset

from pcbench.data import collate, seed_worker
from pcbench.data.transforms import Compose
from pcbench.ops import PointBatch

from .distributed import GlobalBatchSampler
from .errors import ConfigError

__all__ = [
    "DataBundle",
    "batch_layout",
    "EvalBatch",
    "build_data",
    "eval_config",
    "eval_loader",
    "eval_transform",
    "manifest_sha256",
    "mix_pairs",
    "pass_loader",
    "split_dataset",
    "stratified_holdout",
    "train_loader",
]


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified hold-out of ``round(fraction * n)`` samples (at least 1).

    Each class gives its proportional share (largest remainders round the shares so they sum to the total);
    the samples of a class are drawn by a generator seeded with ``seed``.
    """
    n = len(labels)
    if not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {fraction}")
    total = min(max(1, int(round(fraction * n))), n - 1)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * total / n
    quota = np.floor(share).astype(int)
    for i in np.argsort(-(share - quota), kind="stable")[: total - quota.sum()]:
        quota[i] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def _instantiate_list(nodes: Any) -> list[Any]:
    import hydra  # noqa: PLC0415

    return [hydra.utils.instantiate(n) for n in (nodes or [])]


def train_transform(cfg: DictConfig) -> Compose:
    """``data.transforms.pre`` + ``aug.transforms`` + ``data.transforms.train``."""
    t = cfg.data.transforms
    return Compose([*_instantiate_list(t.pre), *_instantiate_list(cfg.aug.transforms), *_instantiate_list(t.train)])


class StashFull:
    """Keep the full-resolution labels and point count before any transform changes the points."""

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        out = dict(sample)
        if "label" in sample:
            out["full_label"] = np.array(sample["label"], copy=True)
        out["full_points"] = int(np.asarray(sample["coord"]).shape[0])
        return out

    def __repr__(self) -> str:
        return "StashFull()"


def eval_transform(cfg: DictConfig, tta_pass: Any = None, role: str = "test") -> Compose:
    """``data.transforms.pre`` + (one TTA pass) + ``data.transforms.test``, with the full labels stashed first.

    ``role="val"`` uses ``data.transforms.val`` instead when a data config or recipe sets it (e.g. one
    voxelized pass per epoch for checkpoint selection, fragment voting for the final test).
    """
    t = cfg.data.transforms
    mid = [tta_pass] if tta_pass is not None else []
    last = t.get("val") if role == "val" and t.get("val") is not None else t.test
    return Compose([StashFull(), *_instantiate_list(t.pre), *mid, *_instantiate_list(last)])


@dataclass
class DataBundle:
    """The three splits of a run and what the model and loss need from the data."""

    train: Dataset
    val: Dataset
    test: Dataset
    task: str
    num_classes: int
    in_channels: int
    ignore_index: int
    class_names: list[str]
    manifest_sha256: str
    info: dict[str, Any] = field(default_factory=dict)  # split protocol, recorded in metrics.json


def manifest_sha256(root: str | Path) -> str:
    """sha256 of the prepared folder's manifest.json bytes (it holds the sha256 of every shard)."""
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


def _dataset(cfg: DictConfig, split: str, transform: Any, seed: int) -> Dataset:
    import hydra  # noqa: PLC0415

    return hydra.utils.instantiate(cfg.data.dataset, root=str(cfg.data.root), split=split, transform=transform,
                                   seed=seed)


def eval_config(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose ``data.dataset`` has no ``loop``: evaluation datasets read each sample once.

    The key is deleted from a copy: ``OmegaConf.merge`` can only add or overwrite keys, so merging a node
    without ``loop`` over ``cfg`` would keep the training repeat count.
    """
    out = copy.deepcopy(cfg)  # DictConfig.copy shares nested nodes with cfg
    with open_dict(out):
        out.data.dataset.pop("loop", None)
    return out


def split_dataset(cfg: DictConfig, split: str) -> Dataset:
    """The prepared split ``split`` (a name in the folder's manifest) with the evaluation transforms."""
    return _dataset(eval_config(cfg), split, eval_transform(cfg), int(cfg.seed))


def build_data(cfg: DictConfig, check: bool = True) -> DataBundle:
    """The train / val / test datasets of ``cfg`` (validated with :func:`pcbench.train.config.check_data` first)."""
    from .config import check_data  # noqa: PLC0415

    if check:
        check_data(cfg)
    d = cfg.data
    seed = int(cfg.seed)
    train_full = _dataset(cfg, d.splits.train, train_transform(cfg), seed)
    eval_cfg = eval_config(cfg)
    info: dict[str, Any] = {"splits": OmegaConf.to_container(d.splits, resolve=True)}
    if d.splits.val is None:
        if d.task != "cls":
            raise ConfigError(f"data.splits.val is null for the segmentation dataset {d.name}; name the validation "
                              "split, e.g. data.splits.val=val")
        labels = train_full.labels()
        held = stratified_holdout(labels, float(d.val_fraction), int(d.val_seed))
        keep = np.setdiff1d(np.arange(len(train_full)), held)
        train = Subset(train_full, keep.tolist())
        val_base = _dataset(eval_cfg, d.splits.train, eval_transform(cfg, role="val"), seed)
        val = Subset(val_base, held.tolist())
        info["val"] = {"source": f"held out from {d.splits.train}", "fraction": float(d.val_fraction),
                       "seed": int(d.val_seed), "num_samples": len(held), "stratified": True,
                       "indices_sha256": hashlib.sha256(held.astype(np.int64).tobytes()).hexdigest()}
        if d.get("val_caveat"):
            info["val"]["caveat"] = str(d.val_caveat)
    else:
        train = train_full
        val = _dataset(eval_cfg, d.splits.val, eval_transform(cfg, role="val"), seed)
        info["val"] = {"source": str(d.splits.val), "num_samples": len(val)}
    test = _dataset(eval_cfg, d.splits.test, eval_transform(cfg), seed)
    info["train_samples"], info["test_samples"] = len(train), len(test)
    info["manifest_splits"] = sorted(train_full.manifest["splits"])
    base = train_full
    return DataBundle(train=train, val=val, test=test, task=str(d.task), num_classes=base.num_classes,
                      in_channels=base.in_channels, ignore_index=base.ignore_index, class_names=base.classes,
                      manifest_sha256=manifest_sha256(d.root), info=info)


@dataclass
class EvalBatch:
    """A collated evaluation batch plus what full-resolution metrics need."""

    batch: PointBatch
    names: list[str]
    full_labels: list[np.ndarray]  # per sample: scalar class (objects) or per original point (scenes)
    full_points: list[int]
    # per sample: (fragment_offset [F], index [M]) from GridSample(mode="fragments"), else None
    fragments: list[tuple[np.ndarray, np.ndarray] | None] = field(default_factory=list)


def collate_eval(samples: Sequence[dict[str, Any]]) -> EvalBatch:
    """Collate for evaluation: the PointBatch, sample names and the stashed full-resolution labels."""
    batch = collate(samples)
    frags = [(np.asarray(s["fragment_offset"], dtype=np.int64), np.asarray(s["index"], dtype=np.int64))
             if "fragment_offset" in s else None for s in samples]
    return EvalBatch(batch=batch, names=[str(s.get("name", "")) for s in samples],
                     full_labels=[np.asarray(s.get("full_label", s.get("label", -1))) for s in samples],
                     full_points=[int(s.get("full_points", len(s["coord"]))) for s in samples], fragments=frags)


def mix_pairs(batch: PointBatch) -> PointBatch:
    """Mix3D (Nekrasov et al., 3DV 2021) as Pointcept's ``point_collate_fn``: clouds 2i and 2i+1 become one cloud.

    The packed points stay where they are; only ``offset`` changes (every second boundary is dropped, an odd
    last cloud stays alone). Instance ids of the second cloud of a pair are shifted past the first's.
    """
    off = batch.offset
    if off.numel() < 2:
        return batch
    new_off = torch.cat([off[1:-1:2], off[-1:]])
    instance = batch.instance
    if instance is not None:
        instance = instance.clone()
        starts = [0, *off.tolist()]
        for i in range(1, off.numel(), 2):
            first = instance[starts[i - 1]:starts[i]]
            shift = int(first.max()) if first.numel() else 0
            seg = instance[starts[i]:starts[i + 1]]
            instance[starts[i]:starts[i + 1]] = torch.where(seg != -1, seg + shift, seg)
    inv_off = batch.inverse_offset
    if inv_off is not None:
        inv_off = torch.cat([inv_off[1:-1:2], inv_off[-1:]])
    return dataclasses.replace(batch, offset=new_off, instance=instance, inverse_offset=inv_off)


def _strip(samples: Sequence[dict[str, Any]]) -> PointBatch:
    return collate(samples)


def batch_layout(trainer_cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """``(device batch, micro-batches per optimizer step)`` of ``trainer.batch_size`` on ``world_size`` ranks.

    ``trainer.batch_size`` is the global batch of one optimizer step, ``trainer.device_batch_size`` the samples
    of one forward pass on one device (BatchNorm, Mix3D and the Lovasz loss see these); null means
    ``batch_size / world_size`` (no accumulation). Each rank accumulates
    ``batch_size / (world_size * device_batch_size)`` micro-batches per step.
    """
    t = trainer_cfg
    if t.get("accumulate_grad_batches") is not None:
        raise ConfigError(f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} is replaced by "
                          "trainer.device_batch_size: for k accumulated batches of b use "
                          "trainer.batch_size=<k*b> trainer.device_batch_size=<b / ranks>")
    bs = int(t.batch_size)
    if bs % world_size:
        raise ConfigError(f"trainer.batch_size={bs} (the global batch) is not divisible by the {world_size} "
                          f"ranks; use a multiple of {world_size}")
    dev = t.get("device_batch_size")
    d = bs // world_size if dev is None else int(dev)
    if d < 1 or bs % (world_size * d):
        raise ConfigError(f"trainer.device_batch_size={dev} does not divide the global trainer.batch_size={bs} "
                          f"over {world_size} rank(s): the global batch must be ranks x device batch x micro-"
                          f"batches; use a divisor of {bs // world_size} (e.g. trainer.device_batch_size="
                          f"{bs // world_size}), or change trainer.batch_size")
    return d, bs // (world_size * d)


def train_loader(dataset: Dataset, cfg: DictConfig, rank: int, world_size: int) -> tuple[DataLoader, GlobalBatchSampler]:
    """The training DataLoader of micro-batches (see :func:`batch_layout`); its sampler drives epochs and resume."""
    t = cfg.trainer
    n = len(dataset)
    if n < int(t.batch_size):
        raise ConfigError(f"trainer.batch_size={t.batch_size} exceeds the {n} training samples of "
                          f"{cfg.data.root}; lower trainer.batch_size")
    _, micro = batch_layout(t, world_size)
    sampler = GlobalBatchSampler(n, int(t.batch_size), seed=int(cfg.seed), shuffle=True, rank=rank,
                                 world_size=world_size, drop_last=True, limit_batches=t.limit_train_batches,
                                 micro_batches=micro)
    workers = int(t.num_workers)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_strip,
                        pin_memory=str(t.accelerator) in ("cuda", "auto") and torch.cuda.is_available(),
                        worker_init_fn=seed_worker, persistent_workers=False,
                        generator=torch.Generator().manual_seed(int(cfg.seed)),
                        prefetch_factor=2 if workers > 0 else None)
    return loader, sampler


def eval_batch_size(cfg: DictConfig) -> int:
    """``eval.batch_size``, defaulting to the per-rank training batch for objects and 1 for scenes."""
    if cfg.eval.batch_size:
        return int(cfg.eval.batch_size)
    return 1 if cfg.data.task == "seg" else int(cfg.trainer.batch_size)


def eval_loader(dataset: Dataset, cfg: DictConfig, rank: int = 0, world_size: int = 1,
                limit: int | None = None) -> DataLoader:
    """Evaluation loader over this rank's share (``rank::world_size``) of ``dataset`` in order."""
    idx = list(range(rank, len(dataset), world_size))
    bs = eval_batch_size(cfg)
    if limit:
        idx = idx[: int(limit) * bs]
    workers = int(cfg.trainer.num_workers)
    return DataLoader(Subset(dataset, idx), batch_size=bs, shuffle=False, num_workers=workers,
                      collate_fn=collate_eval, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(int(cfg.seed)))


class _PassDataset(Dataset):
    """Item ``(p, i)`` is item ``i`` of pass ``p``'s dataset (the same samples under another TTA transform)."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return len(self.datasets[0]) * len(self.datasets)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        p, i = key
        return self.datasets[p][i]


class _PassBatchSampler:
    """For each run of ``batch_size`` sample positions, one batch per pass: ``[(p, i) for i in run]``.

    The batches of one sample group arrive consecutively, so the consumer can finish a group (sum its passes)
    before the next one is read: memory holds one group, whatever the number of passes.
    """

    def __init__(self, num_samples: int, batch_size: int, passes: int) -> None:
        self.num_samples, self.batch_size, self.passes = num_samples, batch_size, passes

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, self.num_samples, self.batch_size):
            run = range(start, min(start + self.batch_size, self.num_samples))
            for p in range(self.passes):
                yield [(p, i) for i in run]

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size) * self.passes


def _pass_stream(ds: Dataset, p: int) -> Dataset:
    """``ds`` (or the Subset of one) reading with TTA pass ``p``'s random stream where it has one."""
    if isinstance(ds, Subset):
        return Subset(_pass_stream(ds.dataset, p), ds.indices)
    return ds.with_stream(p) if hasattr(ds, "with_stream") else ds


def pass_loader(loaders: Sequence[DataLoader]) -> DataLoader:
    """One loader over several aligned evaluation loaders (TTA passes): it yields pass 0..P-1 of the first
    batch, then of the second, ... with the worker count of ``loaders[0]``, not one worker pool per pass.

    Each input must be a plain in-order loader (as :func:`eval_loader` builds) over the same number of samples
    with the same batch size; only their datasets (transforms) differ. Building a DataLoader starts no
    process, so the per-pass loaders handed in cost nothing until iterated, and they never are. Pass ``p``
    draws its random transforms from its own stream (:meth:`pcbench.data.PreparedDataset.with_stream`), so
    random passes differ from each other, reproducibly for a seed.
    """
    from torch.utils.data import BatchSampler, SequentialSampler  # noqa: PLC0415

    if not loaders:
        raise ValueError("pass_loader needs at least one loader")
    first = loaders[0]
    n = len(first.dataset)
    for k, loader in enumerate(loaders):
        bs = loader.batch_sampler
        if not (isinstance(bs, BatchSampler) and isinstance(bs.sampler, SequentialSampler) and not bs.drop_last):
            raise ValueError(f"TTA pass {k}: pass_loader merges in-order evaluation loaders only (eval_loader); "
                             f"got batch sampler {type(bs).__name__}")
        if len(loader.dataset) != n or loader.batch_size != first.batch_size:
            raise ValueError(f"TTA pass {k} has {len(loader.dataset)} samples in batches of {loader.batch_size}, "
                             f"pass 0 has {n} in batches of {first.batch_size}; TTA passes must be aligned")
    workers = first.num_workers
    return DataLoader(_PassDataset([_pass_stream(loader.dataset, p) for p, loader in enumerate(loaders)]),
                      batch_sampler=_PassBatchSampler(n, int(first.batch_size), len(loaders)),
                      num_workers=workers, collate_fn=first.collate_fn, worker_init_fn=first.worker_init_fn,
                      generator=first.generator, pin_memory=first.pin_memory,
                      prefetch_factor=first.prefetch_factor if workers > 0 else None)
