"""Published results that the leaderboard shows beside ours, each citing where it was read.

Values are fractions in [0, 1] like ours. ``protocol`` uses the leaderboard's vocabulary so a published figure is
labelled with how it was obtained and never ranked with ours:

- ``val``: validation split, checkpoint selected on that split (ScanNet convention; its test labels are hidden).
- ``test``: test split, checkpoint selected on a held-out split (our honest protocol).
- ``test_vote``: as ``test`` with voting over augmented passes.
- ``test_selected``: test split, checkpoint selected on the test split itself (optimistic).
- ``test_unstated``: test split, the selection rule is not stated by the source.
- ``benchmark``: a hidden-label online benchmark (e.g. ScanNet test), trained on train + val.

Every figure carries its provenance here, inline, so a clone of the repository alone can check it: ``source``
names the repository, file and commit it was read in (``owner/name path @ commit, table``) or, for a paper
figure, the authors, year, venue and table. ``checked`` records how the figure was verified: "source" (read in
the named file at the named commit while curating) or "paper" (taken from the paper's table; no repository file
states it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["PROTOCOLS", "PUBLISHED", "Published", "published_for"]

PROTOCOLS = {
    "test": "test split, checkpoint selected on val (honest)",
    "test_vote": "test split, checkpoint selected on val, voting over augmented passes",
    "test_selected": "test split, best test score over epochs (test-selected, optimistic)",
    "val": "val split, checkpoint selected on val",
    "val_vote": "val split, checkpoint selected on val, voting over augmented passes",
    "test_unstated": "test split, checkpoint selection not stated by the source",
    "benchmark": "hidden-label online benchmark, trained on train+val",
}


@dataclass(frozen=True)
class Published:
    """One published figure: a pcbench model config, a pcbench data config, a metric, its value and source."""

    model: str        # pcbench conf/model name
    dataset: str      # pcbench data config name
    metric: str       # oa | macc | miou
    value: float      # fraction in [0, 1]
    protocol: str     # a key of PROTOCOLS
    source: str       # repository file @ commit, or paper + table
    checked: str      # "source" or "paper"
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        """The row as a plain dict (for CSV/JSON)."""
        return asdict(self)


_POINTCEPT = "Pointcept/Pointcept README.md @ d74c646, indoor semantic segmentation table (Val mIoU)"
_PTV2 = "Pointcept/PointTransformerV2 README.md @ 5386c4d, semantic segmentation table"
_PTV2_SPUNET = "Pointcept/PointTransformerV2 README.md @ f727adb (first release), semantic segmentation table"
_MINK = "chrischoy/SpatioTemporalSegmentation README.md @ 4afee29, model zoo table"
_TTA = "Pointcept tester: fragment voting with test-time augmentation"

PUBLISHED: tuple[Published, ...] = (
    Published("ptv3_seg", "scannet20", "miou", 0.776, "val", _POINTCEPT, "source", _TTA),
    Published("ptv3_seg", "scannet200", "miou", 0.353, "val", _POINTCEPT, "source", _TTA),
    Published("ptv2_seg", "scannet20", "miou", 0.755, "val", _PTV2, "source", "PTv2 m2; " + _TTA),
    Published("ptv2_seg", "scannet20", "macc", 0.829, "val", _PTV2, "source", "PTv2 m2; " + _TTA),
    Published("ptv2_seg", "scannet20", "oa", 0.912, "val", _PTV2, "source", "PTv2 m2 (allAcc); " + _TTA),
    Published("ptv2_seg", "scannet200", "miou", 0.319, "val", _PTV2, "source", "PTv2 m2; " + _TTA),
    Published("ptv2_seg", "scannet200", "macc", 0.392, "val", _PTV2, "source", "PTv2 m2; " + _TTA),
    Published("ptv2_seg", "scannet200", "oa", 0.827, "val", _PTV2, "source", "PTv2 m2 (allAcc); " + _TTA),
    Published("spunet_base_seg", "scannet20", "miou", 0.736, "val", _PTV2_SPUNET, "source",
              "SpUNet34C in the PCR codebase; the Pointcept README @ 2a6b419 quotes 75.0 for SpUNet"),
    Published("spunet_base_seg", "scannet20", "macc", 0.822, "val", _PTV2_SPUNET, "source", "SpUNet34C"),
    Published("spunet_base_seg", "scannet20", "oa", 0.904, "val", _PTV2_SPUNET, "source", "SpUNet34C"),
    Published("minkunet34c_seg", "scannet20", "miou", 0.72219, "val", _MINK, "source",
              "Mink16UNet34C, 2 cm, no rotation averaging, no sliding window"),
    Published("minkunet34c_seg", "scannet20", "miou", 0.736, "benchmark", _MINK, "source",
              "Mink16UNet34C, 2 cm, trained on train+val, ScanNet test server, no sliding window"),
    Published("pct_cls", "modelnet40", "oa", 0.932, "test_selected",
              "Strawberry-Eat-Mango/PCT_Pytorch README.md @ 15fb741 (\"93.2% on the ModelNet40 validation "
              "dataset\"); Guo et al. 2021, PCT (CVM), Table 1", "source",
              "the 'validation' set of that code is the test split: main.py @ 15fb741 saves the model whenever "
              "test accuracy reaches a new best"),
    Published("ptv1_cls", "modelnet40", "oa", 0.937, "test_unstated",
              "Zhao et al. 2021, Point Transformer (ICCV), ModelNet40 table", "paper"),
    Published("ptv1_cls", "modelnet40", "macc", 0.906, "test_unstated",
              "Zhao et al. 2021, Point Transformer (ICCV), ModelNet40 table", "paper"),
    Published("pointnet2_ssg_cls", "modelnet40", "oa", 0.907, "test_unstated",
              "Qi et al. 2017, PointNet++ (NeurIPS), Table 2 (xyz input)", "paper"),
    Published("pointnet2_ssg_cls", "scanobjectnn_pb_t50_rs", "oa", 0.779, "test_unstated",
              "Uy et al. 2019, Revisiting Point Cloud Classification: ScanObjectNN (ICCV), PB_T50_RS table",
              "paper"),
)


def published_for(model: str, dataset: str, metric: str) -> list[Published]:
    """Published figures of one model on one dataset for one metric (any protocol)."""
    return [p for p in PUBLISHED if p.model == model and p.dataset == dataset and p.metric == metric]
