"""Confidence intervals and paired comparisons of leaderboard rows, from the runs' resampling payloads.

A finished run may record where its resampling payload lies: ``record["extra"]["resample"] = {"path": ...,
"sha256": ...}`` (path absolute or relative to the record's ``run_dir``; written by
``pcbench.bench.stats.save_payload``). The payload holds the plain final evaluation (protocol ``test``, or ``val``
where the final split is a validation split), so only rows of that protocol get an interval; the others say why.

Per row: the percentile bootstrap interval of the headline metric with the row's seeds pooled
(``stats.bootstrap_ci``). Per section (one dataset and protocol, rows ranked best first): every run of adjacent
rows that all have payloads is compared by one paired bootstrap (``stats.rank_labels``: the same resampled test
items for every row), giving P(row above is better) and a shared rank ("2-3") where the difference is not
significant at 95 %. A row without a payload breaks the chain: it keeps its own rank. Fixed seed
(:data:`CI_SEED`), so a report is reproducible; payload files are read once per process per file version.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcbench.bench.leaderboard import Leaderboard, LeaderRow

if TYPE_CHECKING:  # the statistics need numpy: imported when a row has payloads, so the CLIs start fast
    from pcbench.bench.stats import ResamplePayload

__all__ = ["CI_CONFIDENCE", "CI_SEED", "PAYLOAD_PROTOCOLS", "attach_statistics", "method_text", "row_payloads"]

CI_SEED = 0
CI_CONFIDENCE = 0.95
#: The protocols whose score the payload reproduces: the plain pass of the final evaluation.
PAYLOAD_PROTOCOLS = ("test", "val")
# A payload's own score must match the recorded one: beyond this (a fraction) it is from another evaluation.
_MATCH_TOL = 5e-4


def method_text(n_resamples: int) -> str:
    """The sentence a report prints about how intervals and significance were computed (0: none were)."""
    if not n_resamples:
        return ("No run recorded a resampling payload (extra.resample), so the rows have no confidence interval "
                "or significance test: ranks follow the mean alone.")
    return (f"95 % CI: percentile bootstrap over test items (samples or scenes), {n_resamples} resamples, seed "
            f"{CI_SEED}, the row's seeds pooled (each resample applied to every seed, metric averaged over them). "
            "Significance: paired bootstrap of adjacent rows on the same resamples; rows whose difference's 95 % "
            "interval contains 0 share a rank (e.g. 2-3); P(above better) = share of resamples where the row "
            "above scores higher.")


@functools.lru_cache(maxsize=512)
def _load_cached(path: str, sha256: str | None, mtime_ns: int, size: int) -> ResamplePayload:
    from pcbench.bench.stats import load_payload  # noqa: PLC0415

    return load_payload(path, sha256)  # mtime and size in the key: a rewritten file is read again


def _payload_path(rec: Mapping[str, Any], path: str) -> Path:
    p = Path(path)
    if not p.is_absolute() and rec.get("run_dir"):
        p = Path(rec["run_dir"]) / p
    return p


def _load(rec: Mapping[str, Any]) -> tuple[ResamplePayload | None, str]:
    """A run's payload, or None and why not."""
    extra = rec.get("extra") if isinstance(rec.get("extra"), Mapping) else {}
    ref = extra.get("resample")
    if not ref:
        return None, "no resampling payload recorded"
    if not isinstance(ref, Mapping) or not isinstance(ref.get("path"), str):
        return None, f"extra.resample is {ref!r}, not {{'path': ..., 'sha256': ...}}"
    path = _payload_path(rec, ref["path"])
    try:
        st = os.stat(path)
        return _load_cached(str(path), ref.get("sha256"), st.st_mtime_ns, st.st_size), ""
    except FileNotFoundError:
        return None, f"payload {path} is missing"
    except (OSError, ValueError) as e:
        return None, f"payload unreadable: {e}"


def row_payloads(row: LeaderRow, records: Mapping[str, Mapping[str, Any]]) -> tuple[list[ResamplePayload], str]:
    """The payloads of all of a row's runs, or ([], why the row has no interval)."""
    if row.protocol not in PAYLOAD_PROTOCOLS:
        return [], (f"the payloads hold the plain final evaluation ({'/'.join(PAYLOAD_PROTOCOLS)}), not "
                    f"{row.protocol}")
    out = []
    for run in row.runs:
        rec = records.get(run["result_id"]) or {}
        payload, why = _load(rec)
        if payload is None:
            return [], f"seed {run['seed']}: {why}"
        score = payload.metrics()[row.metric]
        # A final evaluation on a validation split is recorded under "test" and shown as protocol "val".
        split = (rec.get("test") or rec.get("val") or {}) if row.protocol == "val" else rec.get(row.protocol) or {}
        recorded = split.get(row.metric)
        if isinstance(recorded, (int, float)) and abs(score - recorded) > _MATCH_TOL:
            return [], (f"seed {run['seed']}: the payload gives {row.metric} {score:.4f} but the run recorded "
                        f"{recorded:.4f}; it is from another evaluation")
        out.append(payload)
    return out, ""


def _compare(rows: list[LeaderRow], payloads: list[list[ResamplePayload]], n_resamples: int) -> list[Any]:
    """Comparisons of each row with the next within a chain of rows that all have payloads (None if not comparable)."""
    from pcbench.bench.stats import paired_bootstrap, rank_labels  # noqa: PLC0415

    metric = rows[0].metric
    try:
        _, comps = rank_labels(payloads, metric, n_resamples=n_resamples, seed=CI_SEED)
        return list(comps)
    except ValueError:  # some rows were evaluated on another split: compare the pairs that share one
        out = []
        for a, b in zip(payloads[:-1], payloads[1:], strict=True):
            try:
                out.append(paired_bootstrap(a, b, metric, n_resamples=n_resamples, seed=CI_SEED))
            except ValueError:
                out.append(None)
        return out


def attach_statistics(board: Leaderboard, records: Mapping[str, Mapping[str, Any]], *,
                      n_resamples: int | None = None) -> int:
    """Fill ``ci``, ``ci_note``, ``vs_above`` and ``rank_label`` of every row (records: result_id -> record).

    Returns the resample count used (None: ``stats.DEFAULT_RESAMPLES``).
    """
    from pcbench.bench.stats import DEFAULT_RESAMPLES, bootstrap_ci, shared_ranks  # noqa: PLC0415

    n_resamples = DEFAULT_RESAMPLES if n_resamples is None else int(n_resamples)
    for _, _, rows in board.sections():
        found = []
        for r in rows:
            payloads, why = row_payloads(r, records)
            r.ci_note = why
            if payloads:
                try:
                    r.ci = bootstrap_ci(payloads, r.metric, n_resamples=n_resamples, seed=CI_SEED)
                except ValueError as e:  # the row's own seeds disagree on the split
                    r.ci_note, payloads = str(e), []
            found.append(payloads)
        significant: list[bool] = [True] * (len(rows) - 1)  # not compared: each row keeps its own rank
        start = 0
        while start < len(rows):
            end = start
            while end < len(rows) and found[end]:
                end += 1
            if end - start >= 2:
                for k, comp in enumerate(_compare(rows[start:end], found[start:end], n_resamples)):
                    i = start + k
                    if comp is not None:
                        rows[i + 1].vs_above = comp
                        significant[i] = comp.significant
            start = end + 1
        for r, label in zip(rows, shared_ranks(significant), strict=True):
            r.rank_label = label
    return n_resamples
