"""Evaluation: objects (one label per cloud) and scenes at full resolution, with optional TTA / voting.

Scenes are evaluated on every original vertex: the evaluation pipeline voxelizes them (``GridSample`` in
``data.transforms.test``, which records ``inverse``), the model predicts per kept point, and the logits are
copied back to every original vertex through the inverse map before the confusion matrix is counted.
Scenes with more than ``eval.max_points`` voxelized points are covered by overlapping sphere crops of that
size whose logits are averaged per point. TTA passes (``tta`` group) are averaged per original point
(scenes) or summed per cloud (objects, PointNet++ voting) and reported separately as ``test_vote``.

Fragment voting (Pointcept's ``SemSegTester``): when the evaluation pipeline ends in
``GridSample(mode="fragments")``, every fragment (one point per voxel) is a forward pass of its own and its
scores are summed into the original points it holds (``index``). ``scores="softmax"`` sums class
probabilities over fragments and TTA passes as Pointcept does; ``"logits"`` (default) sums raw logits.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pcbench.io import atomic_path, write_text
from pcbench.ops import PointBatch

from .data import EvalBatch, pass_loader
from .metrics import ConfusionMatrix, confusion_matrix
from .resample import ResamplePayload

__all__ = ["EvalProgress", "EvalResult", "autocast_context", "class_table", "eval_precision", "evaluate_loaders",
           "resample_payload", "write_predictions", "write_submission"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}


def autocast_context(device: torch.device, precision: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` in fp32 / bf16 / fp16 (fp32 and None: no autocast)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r} is unknown; use fp32, bf16 or fp16 (resolve eval.autocast, which "
                         "may say `train`, with eval_precision first)")
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def eval_precision(cfg: Any, train_precision: str) -> str:
    """The evaluation precision of a run: ``eval.autocast`` (fp32 / bf16 / fp16), ``train`` for the training
    precision, and fp32 when unset.

    Pointcept's tester (pointcept/engines/test.py @ d74c646) runs without autocast whatever the training
    precision, so published figures are fp32 evaluations; a recipe that evaluates otherwise says so here.
    """
    from .errors import ConfigError  # noqa: PLC0415

    value = cfg.eval.get("autocast") if "eval" in cfg else None
    if value is None:
        return "fp32"
    value = str(value)
    if value == "train":
        return str(train_precision)
    if value not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"eval.autocast={value!r} is unknown; use fp32, bf16, fp16 or train (the training "
                          "precision)")
    return value


@dataclass
class EvalResult:
    """Metrics of one split, the number of samples, seconds, and (optionally) the predictions per sample.

    ``names`` and ``items`` are always kept (they are small): ``items[i]`` is what a resampling needs of sample
    ``names[i]``: ``[target, pred]`` of an object, or the scene's confusion matrix [C, C] (see
    :func:`resample_payload`). ``confusion`` is the split's matrix [C, C] (summed over ranks); ``preds`` /
    ``labels`` (per point or per object) with ``keep_predictions``; ``probs`` (per point or per object, [n, C]
    float16) with ``keep_probabilities``.
    """

    metrics: dict[str, Any]
    samples: int
    seconds: float
    names: list[str] = field(default_factory=list)
    preds: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    loss: float | None = None
    confusion: np.ndarray | None = None
    items: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)


def _sphere_chunks(coord: Tensor, max_points: int) -> Iterator[Tensor]:
    """Index sets of at most ``max_points`` nearest points around uncovered seeds until every point is covered."""
    n = coord.shape[0]
    covered = torch.zeros(n, dtype=torch.bool, device=coord.device)
    while not bool(covered.all()):
        seed = int(torch.nonzero(~covered)[0])
        d2 = ((coord - coord[seed]) ** 2).sum(1)
        idx = torch.topk(d2, max_points, largest=False).indices.sort().values
        covered[idx] = True
        yield idx


def _scene_logits(model: nn.Module, batch: PointBatch, max_points: int) -> Tensor:
    """Per-point logits [N, C] of a one-scene batch, in sphere crops when it exceeds ``max_points``."""
    if not max_points or batch.num_points <= max_points:
        return model(batch).float()
    acc = None
    count = torch.zeros(batch.num_points, device=batch.coord.device)
    for idx in _sphere_chunks(batch.coord, max_points):
        sub = PointBatch(coord=batch.coord[idx], feat=batch.feat[idx],
                         offset=torch.tensor([idx.numel()], device=idx.device))
        out = model(sub).float()
        if acc is None:
            acc = torch.zeros(batch.num_points, out.shape[1], device=out.device)
        acc[idx] += out
        count[idx] += 1
    return acc / count[:, None]


def _scores(logits: Tensor, scores: str) -> Tensor:
    return logits.float().softmax(-1) if scores == "softmax" else logits.float()


def _fragment_scores(model: nn.Module, b: PointBatch, rows: slice, fragments: tuple[np.ndarray, np.ndarray],
                     n_full: int, max_points: int, scores: str) -> Tensor:
    """Scores [n_full, C] of one scene: each fragment predicted alone, summed into its original points."""
    ends, index = fragments
    coord, feat = b.coord[rows], b.feat[rows]
    if coord.shape[0] != len(index) or (len(ends) and int(ends[-1]) != len(index)):
        raise ValueError(f"fragment rows disagree: {coord.shape[0]} points, {len(index)} indices, fragment ends "
                         f"{ends[-3:].tolist()}; GridSample(mode='fragments') must be the last point-changing "
                         "transform of the evaluation pipeline")
    idx = torch.as_tensor(index, device=coord.device)
    acc = None
    start = 0
    for end in ends.tolist():
        sub = PointBatch(coord=coord[start:end], feat=feat[start:end],
                         offset=torch.tensor([end - start], device=coord.device))
        out = _scores(_scene_logits(model, sub, max_points), scores)
        if acc is None:
            acc = torch.zeros(n_full, out.shape[1], device=out.device)
        acc.index_add_(0, idx[start:end], out)
        start = end
    if acc is None:
        raise ValueError("a scene gave no fragments (no points); drop empty scenes when preparing")
    return acc


def _full_logits(model: nn.Module, eb: EvalBatch, task: str, max_points: int, scores: str = "logits"
                 ) -> list[Tensor]:
    """Scores per sample: [C] per object, or [n_original, C] per scene (mapped through the inverse map or summed
    over fragments)."""
    b = eb.batch
    if task == "cls":
        return list(_scores(model(b), scores))
    frags = eb.fragments or [None] * b.num_clouds
    if any(f is not None for f in frags):
        if not all(f is not None for f in frags):
            raise ValueError("some samples of the batch have fragments and some do not; apply "
                             "GridSample(mode='fragments') to every sample")
        starts = [0, *b.offset.tolist()]
        return [_fragment_scores(model, b, slice(starts[i], starts[i + 1]), frags[i], eb.full_points[i], max_points,
                                 scores) for i in range(b.num_clouds)]
    if max_points and b.num_clouds > 1:
        raise ValueError("eval.max_points needs eval.batch_size=1 (one scene per forward pass)")
    logits = _scores(_scene_logits(model, b, max_points), scores)
    out = []
    starts = [0, *b.offset.tolist()]
    inv_starts = [0, *b.inverse_offset.tolist()] if b.inverse is not None else None
    for i in range(b.num_clouds):
        if inv_starts is not None:
            out.append(logits.index_select(0, b.inverse[inv_starts[i]:inv_starts[i + 1]]))
        else:
            out.append(logits[starts[i]:starts[i + 1]])
        if out[-1].shape[0] != eb.full_points[i]:
            raise ValueError(f"sample {eb.names[i]!r}: {out[-1].shape[0]} predictions for {eb.full_points[i]} "
                             "original points; the evaluation transforms must keep an inverse map "
                             "(GridSample(return_inverse=true) last among the point-changing transforms)")
    return out


class EvalProgress:
    """Progress of one evaluation on the ``pcbench.train`` logger (console and train.log, like training).

    One line at the first batch (its ETA tells early whether the run will finish), then at most every
    ``every_s`` seconds, and one at the end: ``<desc> <done>/<total> samples (<batches>/<total> batches,
    <passes> passes) <elapsed>s eta <eta>s``. Samples are scenes for segmentation, clouds for objects. With TTA
    passes a batch can take long (one scene x 13 passes x its fragments): the first pass and then at most every
    ``every_s`` seconds also log mid-batch, ``(batch <b>/<total>: pass <p>/<passes>)``, and the ETA counts
    passes done.
    """

    def __init__(self, desc: str = "evaluation", every_s: float = 30.0,
                 logger: logging.Logger | None = None) -> None:
        self.desc, self.every_s = desc, float(every_s)
        self.log = logger or logging.getLogger("pcbench.train")
        self.total = self.total_batches = self.passes = 0
        self.done = self.batches = self.passes_done = 0
        self.t0 = self.last = 0.0

    def start(self, total: int, total_batches: int, passes: int) -> None:
        """Reset the counts for ``total`` samples in ``total_batches`` batches of ``passes`` passes each."""
        self.total, self.total_batches, self.passes = int(total), int(total_batches), int(passes)
        self.done = self.batches = self.passes_done = 0
        self.t0 = self.last = time.perf_counter()

    def _eta(self, elapsed: float) -> float:
        if self.passes_done:
            return elapsed / self.passes_done * max(self.total_batches * self.passes - self.passes_done, 0)
        return elapsed / max(self.done, 1) * max(self.total - self.done, 0)

    def pass_done(self) -> None:
        """Count one more forward pass (one TTA pass of one batch); logs mid-batch, the batch end is ``__call__``."""
        self.passes_done += 1
        now = time.perf_counter()
        at = self.passes_done - self.batches * self.passes
        if 0 < at < self.passes and (self.passes_done == 1 or now - self.last >= self.every_s):
            self.last = now
            elapsed = now - self.t0
            self.log.info(f"{self.desc} {self.done}/{self.total} samples (batch {self.batches + 1}/"
                          f"{self.total_batches}: pass {at}/{self.passes}) {elapsed:.0f}s eta {self._eta(elapsed):.0f}s")

    def __call__(self, n: int) -> None:
        """Count ``n`` more samples (one batch, all its passes) done."""
        self.done += n
        self.batches += 1
        now = time.perf_counter()
        if self.batches == 1 or self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            elapsed = now - self.t0
            self.log.info(f"{self.desc} {self.done}/{self.total} samples ({self.batches}/{self.total_batches} "
                          f"batches, {self.passes} pass{'es' if self.passes != 1 else ''}) {elapsed:.0f}s "
                          f"eta {self._eta(elapsed):.0f}s")


@torch.no_grad()
def evaluate_loaders(model: nn.Module, loaders: Sequence[DataLoader], task: str, num_classes: int,
                     ignore_index: int, device: torch.device, precision: str | None = None,
                     max_points: int = 0, keep_predictions: bool = False, progress: Any = None,
                     scores: str = "logits", desc: str = "evaluation", keep_probabilities: bool = False) -> EvalResult:
    """Evaluate ``model`` on one loader, or on several aligned loaders (TTA passes over the same samples).

    With several loaders the scores of the passes (``scores``: raw "logits" or "softmax" probabilities) are
    summed per sample before the argmax; the passes are read through one loader (:func:`pass_loader`), so
    worker processes and memory do not grow with the number of passes. Metrics count original points
    (scenes) or clouds (objects), with the confusion matrix summed over ranks under DDP (predictions are kept
    per rank; see :func:`gather_predictions`). ``progress``: None logs an :class:`EvalProgress` named
    ``desc``, False is silent, any other callable is called with the samples done per batch.
    ``keep_probabilities``: class probabilities per point (scenes) or object, the softmax of the summed logits
    divided by the passes (``scores="logits"``) or the summed probabilities renormalised (``"softmax"``).
    """
    if scores not in ("logits", "softmax"):
        raise ValueError(f"eval.scores={scores!r} is unknown; use logits or softmax")
    passes = len(loaders)
    loader = loaders[0] if passes == 1 else pass_loader(loaders)
    if progress is None:
        progress = EvalProgress(desc)
    if isinstance(progress, EvalProgress):
        progress.start(len(loaders[0].dataset), len(loaders[0]), passes)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    names: list[str] = []
    preds: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    items: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    n = 0
    t0 = time.perf_counter()
    total: list[Tensor] | None = None
    try:
        for k, eb in enumerate(loader):
            if k % passes == 0:
                first, total = eb, None
            eb.batch = eb.batch.to(device, non_blocking=True)
            with autocast_context(device, precision):
                per = _full_logits(model, eb, task, max_points, scores)
            total = per if total is None else [a + p for a, p in zip(total, per, strict=True)]
            if isinstance(progress, EvalProgress):
                progress.pass_done()
            if k % passes != passes - 1:
                continue
            for i, logits in enumerate(total):
                pred = logits.argmax(-1).cpu()
                label = torch.as_tensor(np.asarray(first.full_labels[i]), dtype=torch.long).reshape(pred.shape)
                if task == "cls":
                    cm.update(pred, label)
                    items.append(np.array([int(label), int(pred)], dtype=np.int64))
                else:  # one matrix per scene is what a resampling of scenes needs; the split's is their sum
                    scene = confusion_matrix(pred, label, num_classes, ignore_index)
                    cm.matrix += scene
                    items.append(scene.numpy())
                names.append(first.names[i])
                if keep_predictions:
                    preds.append(pred.numpy().astype(np.int64).reshape(-1))
                    labels.append(label.numpy().astype(np.int64).reshape(-1))
                if keep_probabilities:
                    p = logits / passes if scores == "logits" else logits
                    p = p.softmax(-1) if scores == "logits" else p / p.sum(-1, keepdim=True).clamp_min(1e-12)
                    probs.append(p.cpu().numpy().astype(np.float16).reshape(-1, p.shape[-1]))
            n += len(first.names)
            total = None
            if progress:
                progress(len(first.names))
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    cm.all_reduce()
    return EvalResult(cm.compute(), n, seconds, names, preds, labels, confusion=cm.matrix.numpy().copy(),
                      items=items, probs=probs)


def gather_predictions(result: EvalResult) -> EvalResult:
    """Rank 0 gets every rank's predictions, items and probabilities (ordered by sample name); other ranks keep
    theirs."""
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return result
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (result.names, result.preds, result.labels, result.items, result.probs))
    rows: list[tuple[str, Any, Any, Any, Any]] = []
    for names, ps, ls, its, prs in parts:
        n = len(names)
        rows.extend(zip(names, ps or [None] * n, ls or [None] * n, its, prs or [None] * n, strict=True))
    rows.sort(key=lambda r: r[0])

    def column(k: int) -> list[Any]:
        return [r[k] for r in rows] if rows and rows[0][k] is not None else []

    return EvalResult(result.metrics, result.samples, result.seconds, [r[0] for r in rows], column(1), column(2),
                      confusion=result.confusion, items=[r[3] for r in rows], probs=column(4))


def resample_payload(result: EvalResult, task: str, num_classes: int) -> ResamplePayload:
    """The resampling payload of an evaluation (pcbench/train/resample.py): per object its target and
    prediction, or per scene its confusion matrix, named by sample; objects with the ignore label are left out."""
    if task == "cls":
        rows = np.stack(result.items) if result.items else np.zeros((0, 2), np.int64)
        keep = (rows[:, 0] >= 0) & (rows[:, 0] < num_classes)
        names = np.array(result.names, dtype=str)[keep]
        return ResamplePayload.classification(rows[keep, 0], rows[keep, 1], num_classes, items=names)
    return ResamplePayload.segmentation(np.stack(result.items), items=np.array(result.names, dtype=str))


def class_table(metrics: dict[str, Any], names: Sequence[str], title: str = "") -> str:
    """Per-class IoU and accuracy as a fixed-width text table (``-`` where undefined), with the means last."""
    iou, acc = metrics.get("iou_per_class") or [], metrics.get("acc_per_class") or []
    width = max([5, *(len(str(n)) for n in names)])

    def pct(v: float | None) -> str:
        return "      -" if v is None else f"{100 * v:7.2f}"

    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'IoU %':>7}  {'acc %':>7}")
    for c, name in enumerate(names):
        lines.append(f"{name:<{width}}  {pct(iou[c] if c < len(iou) else None)}  {pct(acc[c] if c < len(acc) else None)}")
    lines.append(f"{'mean':<{width}}  {pct(metrics.get('miou'))}  {pct(metrics.get('macc'))}")
    return "\n".join(lines)


def write_predictions(path: str | Path, result: EvalResult) -> Path:
    """``predictions_*.npz``: flat ``pred`` / ``label`` (int64), ``names`` and cumulative ``offset`` per sample,
    the split's ``confusion`` [C, C] (rows: target) when known, and ``prob`` [points, C] float16 when kept."""
    path = Path(path)
    counts = np.array([len(p) for p in result.preds], dtype=np.int64)
    arrays = {
        "pred": np.concatenate(result.preds) if result.preds else np.zeros(0, np.int64),
        "label": np.concatenate(result.labels) if result.labels else np.zeros(0, np.int64),
        "names": np.array(result.names, dtype=str),
        "offset": np.cumsum(counts),
    }
    if result.confusion is not None:
        arrays["confusion"] = np.asarray(result.confusion, dtype=np.int64)
    if result.probs:
        arrays["prob"] = np.concatenate(result.probs)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return path


def write_submission(folder: str | Path, names: Sequence[str], preds: Sequence[np.ndarray],
                     id_map: Sequence[int]) -> list[Path]:
    """ScanNet benchmark files: ``<scene>.txt`` with one benchmark id (e.g. nyu40) per vertex, one per line."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = np.asarray(id_map, dtype=np.int64)
    out = []
    for name, pred in zip(names, preds, strict=True):
        ids = table[np.asarray(pred, dtype=np.int64)]
        out.append(write_text(folder / f"{name}.txt", "".join(f"{int(v)}\n" for v in ids)))
    return out
