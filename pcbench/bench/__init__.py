"""Benchmark results: the per-cell efficiency probe, the SQLite results store and the leaderboard report.

- ``pcbench.bench.probe.probe_efficiency(model, train_batches, eval_batches, task=..., device=..., score=...)``
  -> dict: imported from its module, so that the store, the report and their CLIs (and every writer process) start
  without importing torch
- ``record_from_result(fit_result, cell=..., config=..., ...)`` (the trainer's typed result) and
  ``record_from_metrics(metrics_json, cell=..., config=..., ...)`` -> a result record (record.py)
- ``ResultStore(path)``: ``add``, ``finish``, ``fail``, ``finished(config_sha256)``, ``records``, ``claim`` /
  ``release`` (one live runner per cell), ``export_jsonl``, ``import_jsonl``; ``ResultStore.open_readonly(path)``
  for readers (store.py)
- ``write_report(records, out_dir, ops=...)`` -> leaderboard.md/.csv/.html (report.py); ``PUBLISHED`` (published.py)
"""

from pcbench.bench.published import PUBLISHED
from pcbench.bench.record import config_sha256, host_info, record_from_metrics, record_from_result
from pcbench.bench.report import build_leaderboard, write_report
from pcbench.bench.store import DEFAULT_RESULTS, ResultStore

__all__ = [
    "DEFAULT_RESULTS", "PUBLISHED", "ResultStore", "build_leaderboard", "config_sha256", "host_info",
    "record_from_metrics", "record_from_result", "write_report",
]
