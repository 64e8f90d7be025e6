"""The model benchmark driver: case lists, one in-process worker measurement, the Markdown table."""

from __future__ import annotations

import argparse

from benchmarks import bm_models


def test_cases_cover_object_batches_latency_and_the_scene() -> None:
    assert bm_models._cases("ptv1_cls", quick=False) == [("16x1024", "fwd"), ("16x1024", "fwd+bwd"),
                                                          ("1x1024", "fwd")]
    seg = bm_models._cases("pointnet2_ssg_seg", quick=False)
    assert ("16x4096", "fwd+bwd") in seg and ("scene", "fwd") in seg and ("1x4096", "fwd") in seg


def test_worker_measures_one_row_and_the_table_shows_it() -> None:
    ns = argparse.Namespace(config="ptv1_cls", case="2x1024", mode="fwd+bwd", threads=1, repeats=1, warmup=1,
                            quick=True, compile=False)
    row = bm_models.worker(ns)
    assert row["samples_per_call"] == 2 and row["points"] == 2048
    assert row["median_ms"] > 0 and row["samples_per_s"] > 0 and row["peak_rss_mib"] > 0
    assert row["params"] == 3_262_872  # Pointcept PointTransformer-Cls50 (3 feature channels, 40 classes)
    row["malloc"] = "default"
    skipped = {"config": "pct_seg", "case": "scene", "mode": "fwd", "malloc": "-", "error": "skipped: O(n^2)"}
    table = bm_models.markdown([row, skipped], {"torch": "x"})
    assert "| ptv1_cls | 2x1024 (2048 pts) | fwd+bwd | default | 3.26M |" in table
    assert "skipped: O(n^2)" in table and "failed" not in table
