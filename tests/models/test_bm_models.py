"""The model benchmark driver: case lists, one in-process worker measurement, the Markdown table."""

from __future__ import annotations

import argparse

import torch

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


def test_table_has_no_ratio_against_figures_from_another_run() -> None:
    # bm_models runs no peer, so it shows no peer figures and no ratio (a ratio needs both sides in one run).
    row = {"config": "pointnet2_ssg_cls", "case": "16x1024", "mode": "fwd", "malloc": "default", "params": 1.48e6,
           "points": 16384, "samples_per_s": 9.7, "median_ms": 1650.0, "median_cpu_ms": 3200.0,
           "loadavg_1min": [1.0, 1.2], "peak_rss_mib": 900.0}
    table = bm_models.markdown([row], {"torch": "x"})
    assert "| pointnet2_ssg_cls | 16x1024 (16384 pts) | fwd | default | 1.48M | 9.70 |" in table
    assert "community" not in table.lower() and "ours /" not in table and "ratio" not in table.lower()
    assert not hasattr(bm_models, "PEERS")


class _OneSync(torch.nn.Module):
    """Two linear layers with a host read between them: dynamo must split the forward there."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum().item() > 1e9:  # a data-dependent branch: the value must reach the host
            h = h * 2
        return self.b(h)


def test_graph_census_counts_a_host_sync_as_one_break() -> None:
    whole = bm_models._graph_census(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), "fwd",
                                    torch.randn(3, 4))
    assert (whole["graph_count"], whole["graph_break_count"], whole["break_reasons"]) == (1, 0, [])
    split = bm_models._graph_census(_OneSync(), "fwd+bwd", torch.randn(3, 4))
    assert split["graph_count"] == 2 and split["graph_break_count"] == 1
    [reason] = split["break_reasons"]
    assert reason["count"] == 1 and "test_bm_models.py:" in reason["reason"]


def test_compile_table_joins_the_census_with_the_compiled_row() -> None:
    census = {"config": "pct_cls", "case": "4x1024", "mode": "fwd", "malloc": "tuned", "compiled": False,
              "dispatch": "cuda", "graph_count": 3, "graph_break_count": 2,
              "break_reasons": [{"reason": "Tensor.item() at pct.py:10", "count": 2}]}
    comp = {"config": "pct_cls", "case": "4x1024", "mode": "fwd", "malloc": "tuned", "compiled": True,
            "first_call_ms": 61_000.0, "eager_samples_per_s": 4.0, "samples_per_s": 5.0, "speedup": 1.25,
            "compile_dynamic": "false", "dispatch": "cuda"}
    alone = {**census, "config": "ptv1_cls", "graph_count": 1, "graph_break_count": 0, "break_reasons": [],
             "samples_per_s": 3.5}
    table = "\n".join(bm_models.compile_table([census, alone, comp]))
    assert ("| pct_cls | 4x1024 | fwd | no | 3 | 2 | Tensor.item() at pct.py:10 (2) | 61.0 | 4.00 | 5.00 | 1.25x |"
            in table)
    assert "| ptv1_cls | 4x1024 | fwd | yes | 1 | 0 | - | not run | 3.50 | - | - |" in table
    assert "Ops' code path: cuda " in table and "torch.compile dynamic: false " in table
    assert bm_models.compile_table([comp]) == []  # no census, no table
