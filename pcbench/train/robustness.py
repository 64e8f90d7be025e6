"""ModelNet-C robustness of a classifier (``eval.corruptions=modelnet_c``): OA under the seven corruptions of
pcbench/data/corruptions.py at severities 1-5, clean OA, mCE and relative mCE against DGCNN.

pcbench regenerates the corruptions from the prepared test split; the released ModelNet-C h5 files are not
read. Each corruption is one more evaluation transform, placed where a TTA pass goes (after
``data.transforms.pre``, e.g. ModelNet's first 1024 points, before ``data.transforms.test``), and each sample's
draw is seeded by ``(eval.corruption_seed, crc32(sample name), kind, severity)``: the same clouds for every model,
seed and process, whatever the batch order or the number of ranks.

The result is the mapping the report reads (pcbench/bench/leaderboard.py ``_corruptions``): ``{"<kind>":
[OA at severity 1..5], ..., "clean_oa": x, "mce": y, "relative_mce": z}``.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig

from pcbench.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, mce, relative_mce

from .data import eval_loader, eval_transform
from .distributed import dist_info
from .errors import ConfigError
from .evaluation import eval_precision, evaluate_loaders

if TYPE_CHECKING:
    from .trainer import Run

__all__ = ["OPTIONS", "Corrupt", "check_corruptions", "evaluate_corruptions"]

LOG = logging.getLogger("pcbench.train")

#: values of ``eval.corruptions`` (null: none)
OPTIONS = ("modelnet_c",)
NOTE = ("pcbench regenerates the ModelNet-C corruptions from the prepared test split (seeded, official parameters, "
        "pcbench/data/corruptions.py); the released ModelNet-C h5 files are not read")


@dataclass(frozen=True)
class Corrupt:
    """Evaluation transform: ModelNet-C corruption ``kind`` at ``severity`` of the sample's ``coord``.

    Per-point keys other than ``coord`` (normals, colours) are dropped: the corruptions add and remove points
    that have none. The draw depends on ``seed`` and the sample's ``name`` only (not on the transform's rng).
    """

    kind: str
    severity: int
    seed: int = 0

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        """The corrupted sample."""
        if "name" not in sample:
            raise ValueError("Corrupt needs the sample's 'name' to seed its draw; the dataset's convert() must keep it")
        coord = np.asarray(sample["coord"])
        n = coord.shape[0]
        out = {k: v for k, v in sample.items()
               if k == "coord" or not (isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n)}
        key = zlib.crc32(str(sample["name"]).encode("utf-8"))
        out["coord"] = corrupt(coord, self.kind, self.severity, (int(self.seed), key)).astype(np.float32)
        return out


def check_corruptions(cfg: DictConfig, run: Run) -> str:
    """The requested corruption set; ConfigError for an unknown one, a segmentation run, or a model that reads
    per-point features the corruptions cannot give (normals)."""
    value = str(cfg.eval.get("corruptions"))
    if value not in OPTIONS:
        raise ConfigError(f"eval.corruptions={value!r} is unknown; use {' or '.join(OPTIONS)} (or null for none)")
    if run.data.task != "cls":
        raise ConfigError(f"eval.corruptions={value} evaluates a classifier (ModelNet-C corrupts object clouds), but "
                          f"data={cfg.data.name} is a segmentation dataset; drop eval.corruptions for this run")
    ds = run.data.test.dataset if hasattr(run.data.test, "indices") else run.data.test
    extra = [k for k in getattr(ds, "feat_keys", ()) if k != "coord"]
    if extra:
        raise ConfigError(f"eval.corruptions={value} corrupts coordinates only, but the model reads {extra} as input "
                          f"features (data.dataset of data={cfg.data.name}); train it on coordinates "
                          "(data.dataset.use_normals=false) to measure its robustness")
    return value


def evaluate_corruptions(cfg: DictConfig, run: Run, clean_oa: float, precision: str | None = None
                         ) -> dict[str, Any]:
    """OA of ``run.model`` on the test split under each corruption and severity, with mCE and relative mCE
    (DGCNN reference, pcbench/data/corruptions.py); ``clean_oa`` is the plain test OA of the same model."""
    from .trainer import _with_transform  # noqa: PLC0415 - the trainer imports this module lazily

    check_corruptions(cfg, run)
    seed = int(cfg.eval.get("corruption_seed") or 0)
    info = dist_info()
    precision = precision or eval_precision(cfg, run.precision)
    LOG.info(f"ModelNet-C: {len(CORRUPTIONS)} corruptions x {len(SEVERITIES)} severities on the test split "
             f"({len(run.data.test)} samples, seed {seed}); {NOTE}")
    out: dict[str, Any] = {}
    for kind in CORRUPTIONS:
        row = []
        for severity in SEVERITIES:
            ds = _with_transform(run.data.test, eval_transform(cfg, Corrupt(kind, severity, seed)))
            res = evaluate_loaders(run.model, [eval_loader(ds, cfg, info.rank, info.world_size)], run.data.task,
                                   run.data.num_classes, run.data.ignore_index, run.device, precision,
                                   int(cfg.eval.max_points), progress=False, scores=str(cfg.eval.get("scores", "logits")))
            row.append(float(res.metrics["oa"]))
        out[kind] = row
        LOG.info(f"ModelNet-C {kind:<11} OA by severity 1-5: " + " ".join(f"{100 * v:6.2f}" for v in row))
    oa = {k: out[k] for k in CORRUPTIONS}
    out.update(clean_oa=float(clean_oa), mce=mce(oa), relative_mce=relative_mce(oa, float(clean_oa)))
    LOG.info(f"ModelNet-C: clean OA {100 * clean_oa:.2f}, mCE {out['mce']:.3f}, relative mCE {out['relative_mce']:.3f} "
             "(DGCNN = 1, Ren et al. 2022)")
    return out
