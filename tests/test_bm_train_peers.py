"""The training-speed comparison driver: peer import paths (with stand-in peer files), interleaving, the table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import bm_train_peers as bm
from pcbench.ops import farthest_point_sample
from pcbench.testing.clouds import object_batch

# Stand-ins with the layout and import style of the community repositories: yanx27's model file imports its
# sibling ``pointnet2_utils`` flat from models/, PCT_Pytorch's model.py imports util.py, which imports the CUDA
# extension ``pointnet2_ops`` (replaced by the benchmark's plain-torch FPS).
_PN2_UTILS = """
import torch.nn as nn
class Tiny(nn.Module):
    def __init__(self, c_in, num_class):
        super().__init__()
        self.fc = nn.Linear(c_in, num_class)
    def forward(self, x):
        return self.fc(x.max(-1)[0])
"""
_PN2_MODEL = """
import torch.nn.functional as F
import torch.nn as nn
from pointnet2_utils import Tiny
class get_model(nn.Module):
    def __init__(self, num_class, normal_channel=True):
        super().__init__()
        self.net = Tiny(6 if normal_channel else 3, num_class)
    def forward(self, xyz):
        return F.log_softmax(self.net(xyz), -1), None
"""
_PCT_UTIL = """
from pointnet2_ops import pointnet2_utils
def sample(xyz, n):
    return pointnet2_utils.furthest_point_sample(xyz, n).long()
"""
_PCT_MODEL = """
import torch
import torch.nn as nn
from util import sample
class Pct(nn.Module):
    def __init__(self, args, output_channels=40):
        super().__init__()
        self.fc = nn.Linear(3, output_channels)
        self.drop = nn.Dropout(args.dropout)
    def forward(self, x):
        xyz = x.permute(0, 2, 1)
        idx = sample(xyz.contiguous(), 8)
        centres = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
        return self.fc(self.drop(centres.max(1)[0]))
"""


def _stand_ins(root: Path) -> Path:
    pn2 = root / "Pointnet_Pointnet2_pytorch" / "models"
    pct = root / "PCT_Pytorch"
    pn2.mkdir(parents=True)
    pct.mkdir(parents=True)
    (pn2 / "pointnet2_utils.py").write_text(_PN2_UTILS)
    (pn2 / "pointnet2_cls_ssg.py").write_text(_PN2_MODEL)
    (pct / "util.py").write_text(_PCT_UTIL)
    (pct / "model.py").write_text(_PCT_MODEL)
    return root


def test_driver_times_ours_and_stand_in_peers_side_by_side(tmp_path: Path) -> None:
    community = _stand_ins(tmp_path / "community")
    out = tmp_path / "out"
    lines: list[str] = []
    bm.main(["--community-dir", str(community), "--rounds", "1", "--threads", "1", "--malloc", "default",
             "--batch", "2", "--points", "64", "--repeats", "1", "--warmup", "0", "--out", str(out)], log=lines.append)
    record = json.loads((out / "train_peers.json").read_text())
    assert record["complete"] and len(record["rows"]) == 4
    for row in record["rows"]:
        assert not row.get("error"), row
        assert row["samples_per_s"] > 0 and row["median_cpu_ms"] > 0 and row["threads"] == 1
    by = {(r["config"], r["impl"]): r for r in record["rows"]}
    assert by[("pointnet2_ssg_cls", "community")]["params"] == 6 * 40 + 40  # the stand-in was built
    assert by[("pct_cls", "community")]["params"] == 3 * 40 + 40
    # PointNet++ SSG with 3 normal channels: the xyz-only 1,475,688 plus the 3 x 64 first-layer weights
    assert by[("pointnet2_ssg_cls", "ours")]["params"] == 1_475_688 + 3 * 64
    for s in record["summary"]:
        assert s["ratio"] > 0 and s["cpu_ratio"] > 0
    table = (out / "train_peers.md").read_text()
    assert "| pointnet2_ssg_cls | default | 1 |" in table and "| pct_cls | default | 1 |" in table
    assert "unavailable" not in table and lines[-1].strip().startswith("## training speed")


def test_missing_peer_rows_say_how_to_get_them(tmp_path: Path) -> None:
    pair = bm.PAIRS["pointnet2_ssg_cls"]
    assert bm.peer_missing(pair, None) == ("unavailable: pass --community-dir <checkout of "
                                           "yanx27/Pointnet_Pointnet2_pytorch as DIR/Pointnet_Pointnet2_pytorch>")
    assert "not found; check out yanx27/Pointnet_Pointnet2_pytorch" in bm.peer_missing(pair, tmp_path)
    ns = argparse.Namespace(community_dir=None, batch=2, points=64, repeats=1, warmup=0, timeout=60, rounds=1)
    row = bm._run_worker(pair, "community", "default", 1, ns)  # returns before starting any process
    row["round"] = 0
    ours = {"config": pair.config, "impl": "ours", "malloc": "default", "threads": 1, "round": 0,
            "samples_per_s": 4.0, "median_cpu_ms": 500.0, "params": 10, "loadavg_1min": [1.0, 2.0]}
    table = bm.markdown([ours, row], {"torch": "x"}, ns)
    assert "| 4.00 | 500 | unavailable: pass --community-dir <checkout of yanx27" in table
    assert "| - | - | 1.0-2.0 |" in table  # no ratio without the peer


def test_schedule_interleaves_sides_and_alternates_their_order() -> None:
    ns = argparse.Namespace(rounds=2)
    runs = bm._schedule(ns, ["pct_cls"], ["default", "tuned"], [1])
    assert [(r[0], r[2], r[4]) for r in runs] == [
        (0, "default", "ours"), (0, "default", "community"), (0, "tuned", "community"), (0, "tuned", "ours"),
        (1, "default", "community"), (1, "default", "ours"), (1, "tuned", "ours"), (1, "tuned", "community")]


def test_summary_takes_medians_and_pairs_ratios_by_round() -> None:
    rows = []
    for rnd, (ours, theirs) in enumerate([(10.0, 5.0), (8.0, 8.0), (12.0, 4.0)]):
        for impl, sps in (("ours", ours), ("community", theirs)):
            rows.append({"config": "pct_cls", "impl": impl, "malloc": "tuned", "threads": 2, "round": rnd,
                         "samples_per_s": sps, "median_cpu_ms": 1000.0 / sps, "params": 1, "loadavg_1min": [3.0]})
    (s,) = bm.summarise(rows)
    assert s["ours"]["samples_per_s"] == 10.0 and s["community"]["samples_per_s"] == 5.0
    assert s["ratio"] == 2.0 and s["cpu_ratio"] == 2.0  # median of 2, 1, 3 (not 10 / 5 by chance)
    assert s["load"] == [3.0, 3.0]


def test_fps_stand_in_matches_the_exact_sampler() -> None:
    coord, offset = object_batch(3, 200, seed=2)
    got = bm.furthest_point_sample(coord.view(3, 200, 3), 50)
    assert got.dtype == torch.int32 and got.shape == (3, 50)
    want = farthest_point_sample(coord, offset, n=50).view(3, 50) - torch.arange(3).unsqueeze(1) * 200
    assert torch.equal(got.long(), want)
