"""benchmarks/bm_gpu.py: the --smoke run writes the GPU run's JSON / Markdown schema; sizes come from the recipes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bm_gpu

REPO = Path(__file__).resolve().parents[1]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _smoke(out: Path, precisions: tuple[str, ...]) -> dict:
    """Run ``bm_gpu --smoke`` on one classifier and one scene model; check the record's schema and values."""
    assert bm_gpu.main(["--smoke", "--only", "pointnet2_ssg_cls,minkunet14a_seg", "--precisions",
                        ",".join(precisions), "--out", str(out)]) == 0
    rec = json.loads((out / "gpu.json").read_text())
    assert rec["precisions"] == list(precisions)
    assert rec["device"] == "cpu (smoke)" and rec["smoke"] and rec["complete"]
    assert rec["environment"]["torch"] == torch.__version__
    assert [m["config"] for m in rec["models"]] == ["minkunet14a_seg", "pointnet2_ssg_cls"]
    for m in rec["models"]:
        assert "error" not in m and _positive(m["params"])
        assert (m["batch"], m["points_per_cloud"]) == bm_gpu.SMOKE_SIZES[m["task"]]
        assert [(r["precision"], r["mode"]) for r in m["rows"]] == [
            (p, mode) for p in precisions for mode in bm_gpu.MODES]
        for r in m["rows"]:
            assert "error" not in r, r
            assert _positive(r["samples_per_s"]) and _positive(r["median_ms"]) and _positive(r["peak_memory_mib"])
            assert r["samples_per_s"] == pytest.approx(m["batch"] / (r["median_ms"] / 1e3))
    ops = {(r["op"].split()[0], r["case"].split()[0]) for r in rec["ops"]}
    assert ops == {(op, case) for op in ("knn", "ball_query", "fps", "kernel_map", "serialize")
                   for case in ("object", "scene")}
    assert all(_positive(r["median_ms"]) and _positive(r["peak_memory_mib"]) for r in rec["ops"])
    md = (out / "gpu.md").read_text()
    assert md.startswith("## GPU benchmark: cpu (smoke)")
    assert "| pointnet2_ssg_cls | 2 x 128 | fp32 | infer |" in md
    # the published V100 figure sits beside the fp32 inference row, with its source, and no ratio is taken
    assert "1872 (Tesla V100 32GB, 128 x 1024, [1])" in md
    assert "guochengqian/PointNeXt docs/modelzoo.md @ f9eac280b082b0d3210305f04ef6da4fbb1d038b" in md
    assert "ratio |" not in md and " / published" not in md
    return rec


@pytest.mark.slow  # every model and op once: ~15 s of CPU, 40 s on a busy 2-core machine
def test_smoke_run_writes_every_row_with_positive_finite_values(tmp_path: Path) -> None:
    _smoke(tmp_path, ("fp32",))  # fp32 only: CPU bf16 / fp16 autocast costs seconds per call on this machine


@pytest.mark.slow
def test_smoke_run_in_every_precision(tmp_path: Path) -> None:
    rec = _smoke(tmp_path, bm_gpu.PRECISIONS)
    assert {r["precision"] for m in rec["models"] for r in m["rows"]} == {"fp32", "bf16", "fp16"}


def test_paper_sizes_come_from_the_recipes() -> None:
    # conf/experiment/pointnet2_ssg_modelnet40.yaml: batch 16 of 1024 points; ptv3_scannet20: Pointcept's
    # per-GPU batch of the 102400-point training crop; a model without a recipe says so.
    assert bm_gpu.paper_size("pointnet2_ssg_cls") == (16, 1024, "conf/experiment/pointnet2_ssg_modelnet40.yaml")
    batch, points, source = bm_gpu.paper_size("ptv3_seg")
    assert source == "conf/experiment/ptv3_scannet20.yaml" and batch >= 1 and points >= 100_000
    assert bm_gpu.paper_size("ptv3_cls") == bm_gpu.DEFAULT_SIZES["cls"]
    assert set(bm_gpu.model_configs()) >= {"pointnet2_ssg_cls", "pointnet2_msg_cls", "pct_cls", "ptv1_cls",
                                           "ptv2_cls", "ptv3_cls", "sparse_resnet_cls", "ptv3_seg"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no CUDA device is present")
def test_without_cuda_or_smoke_the_command_exits_with_one_line() -> None:
    p = subprocess.run([sys.executable, "-m", "benchmarks.bm_gpu", "--out", "/nonexistent"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "bm_gpu: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or pass --smoke "
        "for the CPU check of the outputs"]
