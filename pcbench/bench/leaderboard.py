"""The leaderboard's content, independent of any output format: rows, their runs, failed cells, notes.

A row is one **configuration identity** on one dataset under one **protocol**: the resolved config without its
seed and without the keys that only say where a run executed (``pcbench.train.config.PLACEMENT_KEYS``). Runs
of one identity are its seeds; two configurations that differ in anything else (``trainer.max_steps=30`` vs
``31``) are two rows, never one averaged row. ``n`` counts distinct seeds: a seed run more than once (a re-run,
a merge from two machines) counts once, by its latest finished record, and the row says so.

Rows are ranked per dataset and protocol (never mixed in one ranking) by the task's headline metric (OA for
classification, mIoU for segmentation): mean ± sample std over the seeds. A run contributes to each protocol its
metrics hold: ``test`` (checkpoint selected on val: honest), ``test_vote`` (the same with voting),
``test_selected`` (best test over epochs: optimistic) and, where the final evaluation ran on a validation split
(ScanNet, whose test labels are hidden), ``val`` / ``val_vote``. Efficiency figures are medians over the row's
runs on its most used hardware, which is named. Published figures (``pcbench.bench.published``) stand beside
ours with the difference, labelled with their own protocol.

Records of published checkpoints evaluated by pcbench (``extra.published_weights``, a ``suite.weights`` cell) are
never ranked with trained rows: they are :class:`WeightsRow` s, one per record and protocol, shown per dataset in
their own section "published weights, evaluated by pcbench" beside the figure the authors published for those
weights and Δ = ours − published.

Records carrying ``identity_sha256`` and typed split roles (``splits.final_role``, see
``pcbench/train/result.py``) are read without importing torch. Older records get both computed, and rows of one
model that differ in config get their differing keys listed, with the trainer's own functions
(``pcbench.train.config``), which imports ``pcbench.train`` and with it torch, once.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pcbench.bench.published import PROTOCOLS, PUBLISHED, Published, published_for

if TYPE_CHECKING:  # numpy-backed statistics are imported only when a record has a payload to resample
    from pcbench.bench.stats import BootstrapCI, PairedComparison

__all__ = ["HEADLINE", "METRIC_NAMES", "PRESENT_NAMES", "PROTOCOL_ORDER", "LeaderRow", "Leaderboard", "WeightsRow",
           "build_leaderboard", "split_text", "sweep_text", "weights_rows"]

HEADLINE = {"cls": "oa", "seg": "miou"}
METRIC_NAMES = {"oa": "OA", "macc": "mAcc", "miou": "mIoU"}
#: mIoU / mAcc average every class of the label set, absent ones counting 0 (the convention of the published
#: figures, pcbench/train/metrics.py); these average the classes present in the split's ground truth instead
PRESENT_NAMES = {"miou_present": "mIoU (present classes)", "macc_present": "mAcc (present classes)"}
PROTOCOL_ORDER = ("test", "test_vote", "test_selected", "val", "val_vote")
#: Probe fields summarized per row (median over runs on the row's hardware).
EFFICIENCY_KEYS = ("params", "flops_per_sample", "train_samples_per_s", "infer_samples_per_s", "latency_b1_ms",
                   "train_peak_mib", "infer_peak_mib", "bf16_speedup", "bf16_score_delta", "int8_speedup",
                   "int8_score_delta")
_PROVENANCE = ("result_id", "suite", "cell", "seed", "config_sha256", "identity_sha256", "git_commit",
               "pcbench_version", "torch_version", "cuda_version", "device", "device_name", "cpu_model",
               "num_threads", "allocator", "hostname", "python_version", "started_at", "finished_at", "wall_s",
               "selected_on", "best_epoch", "last_epoch", "dataset_manifest_sha256", "run_dir", "log_path")


def sweep_text(sweep: Mapping[str, Any]) -> str:
    """Swept values as 'model.k=16 data.points=512' ('' without a sweep)."""
    return " ".join(f"{k}={_value_text(v)}" for k, v in sweep.items())


@dataclass
class LeaderRow:
    """One configuration identity on one dataset under one protocol; its runs are distinct seeds."""

    dataset: str
    protocol: str
    task: str
    metric: str
    model: str
    variant: str
    recipe: str
    fidelity: str
    scores: list[float]
    metrics: dict[str, float | None]
    iou_per_class: list[float | None] | None
    class_names: list[str] | None
    hardware: str
    efficiency: dict[str, float | None]
    int8_status: str
    bf16_status: str
    runs: list[dict[str, Any]]
    rank: int = 0
    published: Published | None = None
    other_hardware_runs: int = 0
    identity: str = ""  #: configuration identity (sha256 of the config without seed and placement keys)
    repeats: dict[Any, int] = field(default_factory=dict)  #: seed -> finished records of it (only those > 1)
    differs: str = ""  #: the config keys that set this row apart from rows of the same label ("k=v, ...")
    config: dict[str, Any] | None = None  #: the latest run's trainer config
    sweep: dict[str, Any] = field(default_factory=dict)  #: swept config key -> value (record extra "sweep")
    ci: BootstrapCI | None = None  #: bootstrap interval of the headline metric (seeds pooled), see comparisons.py
    ci_note: str = ""  #: why the row has no interval ("" when it has one)
    rank_label: str = ""  #: shared rank ("2-3") where adjacent differences are not significant
    vs_above: PairedComparison | None = None  #: the row ranked just above against this one (paired bootstrap)
    corruptions: dict[str, Any] | None = None  #: ModelNet-C figures averaged over the runs that have them
    loaded: list[tuple[float, int]] = field(default_factory=list)  #: (load average, cores) of runs probed busy

    @property
    def n(self) -> int:
        """Number of distinct seeds."""
        return len(self.scores)

    @property
    def mean(self) -> float:
        """Mean headline score."""
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float | None:
        """Sample standard deviation of the headline score (None for one run)."""
        return statistics.stdev(self.scores) if len(self.scores) > 1 else None

    @property
    def delta(self) -> float | None:
        """Ours minus published (fractions), where a published figure exists."""
        return self.mean - self.published.value if self.published is not None else None

    @property
    def label(self) -> str:
        """Model name with its sweep variant (or its swept values)."""
        tag = self.variant or sweep_text(self.sweep)
        return f"{self.model} [{tag}]" if tag else self.model

    @property
    def seeds(self) -> list[Any]:
        """The seeds counted, in order."""
        return [r["seed"] for r in self.runs]

    @property
    def repeats_text(self) -> str:
        """'seed 0 run 2x, latest kept' for each seed recorded more than once ('' when none)."""
        return "; ".join(f"seed {s} run {k}x, latest kept" for s, k in sorted(
            self.repeats.items(), key=lambda x: _seed_order(x[0])))


@dataclass
class WeightsRow:
    """A published checkpoint evaluated by pcbench under one protocol (plain or voted): never ranked."""

    dataset: str
    protocol: str              # "test" / "test_vote" (or "val" / "val_vote" where the final split is val)
    weights: str               # the registry name, e.g. "pointnet2_ssg_cls.modelnet40.yanx27"
    model: str
    metric: str                # headline metric key ("oa" / "miou")
    score: float               # ours, a fraction
    published_value: float | None   # the authors' figure in %
    published_metric: str
    published_protocol: str
    published_source: str
    sha256: str | None         # of the source file that was converted
    result_id: str
    cell: str

    @property
    def delta(self) -> float | None:
        """Ours − published, in points (None without a published figure)."""
        return None if self.published_value is None else 100 * self.score - self.published_value


@dataclass
class Leaderboard:
    """Everything a report shows: ranked rows per (dataset, protocol), failed cells, counts."""

    rows: list[LeaderRow]
    failed: list[dict[str, Any]]
    counts: dict[str, int]
    published: tuple[Published, ...] = PUBLISHED
    ops: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    resamples: int = 0  #: bootstrap resamples behind the rows' intervals (0: none computed)
    weights: list[WeightsRow] = field(default_factory=list)  #: published checkpoints evaluated (never ranked)

    def weights_sections(self) -> list[tuple[str, list[WeightsRow]]]:
        """(dataset, its published-weights rows by protocol then name) in dataset order."""
        groups: dict[str, list[WeightsRow]] = defaultdict(list)
        for r in self.weights:
            groups[r.dataset].append(r)
        return [(d, sorted(groups[d], key=lambda r: (PROTOCOL_ORDER.index(r.protocol), r.weights)))
                for d in sorted(groups)]

    def sections(self) -> list[tuple[str, str, list[LeaderRow]]]:
        """(dataset, protocol, ranked rows) in display order."""
        groups: dict[tuple[str, str], list[LeaderRow]] = defaultdict(list)
        for r in self.rows:
            groups[(r.dataset, r.protocol)].append(r)
        keys = sorted(groups, key=lambda k: (k[0], PROTOCOL_ORDER.index(k[1])))
        return [(d, p, sorted(groups[(d, p)], key=lambda r: r.rank)) for d, p in keys]


# -- what a record is ---------------------------------------------------------------------------------------
def _identity(rec: Mapping[str, Any]) -> str:
    """The record's configuration identity: its ``identity_sha256`` field, else computed from its stored config.

    Without either (a hand-made record with no config) the full ``config_sha256`` stands in: such a record is
    never merged with another configuration, at worst shown as its own row.
    """
    ident = rec.get("identity_sha256")
    if ident:
        return str(ident)
    train = _trainer_config(rec)
    if train is not None:
        # The trainer's own hash, so both sides agree on what "one configuration" is; imported here because
        # pcbench.train pulls in torch, which records that carry the field never need.
        from pcbench.train.config import config_identity_sha256  # noqa: PLC0415

        return config_identity_sha256(train)
    return f"config:{rec['config_sha256']}"


def _trainer_config(rec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The trainer config inside a record's stored config (None without one).

    The runner stores ``{"train": <trainer config>, "probe": <probe settings>}`` (``cell_identity`` in
    pcbench/bench/suite.py); a record made by hand may store the trainer config itself. Probe settings say how
    efficiency was measured, not what was trained, so they are not part of the identity.
    """
    config = rec.get("config")
    if not isinstance(config, Mapping):
        return None
    if isinstance(config.get("train"), Mapping) and set(config) <= {"train", "probe"}:
        return dict(config["train"])
    return dict(config)


def _seed(rec: Mapping[str, Any]) -> Any:
    if rec.get("seed") is not None:
        return rec["seed"]
    return (_trainer_config(rec) or {}).get("seed")


def _seed_order(seed: Any) -> tuple[bool, int, str]:
    return seed is None, seed if isinstance(seed, int) else 0, str(seed)


def _extra(rec: Mapping[str, Any]) -> Mapping[str, Any]:
    extra = rec.get("extra")
    return extra if isinstance(extra, Mapping) else {}


def _splits(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The record's split roles: train / val / test (the final evaluation's split) / final_role, as recorded."""
    splits = rec.get("splits") or _extra(rec).get("splits") or {}
    return dict(splits) if isinstance(splits, Mapping) else {}


def _final_role(rec: Mapping[str, Any]) -> str:
    """What the record's final evaluation split is: "val" (hidden test labels, as ScanNet) or "test".

    Read from the typed ``splits.final_role`` (metrics.json, ``pcbench.train.result.SplitRoles``), where the
    store keeps it as a field or, for records made before it had one, among the trainer's extras. Records older
    than the typed field only name the split (``splits.test``): its role is derived by the trainer's rule.
    """
    splits = _splits(rec)
    role = splits.get("final_role")
    if role in ("val", "test"):
        return role
    name = splits.get("final", splits.get("test"))
    if name is None:
        return "test"
    from pcbench.train.result import final_role  # noqa: PLC0415 - old records only; pcbench.train imports torch

    return final_role(name)


def _task(rec: Mapping[str, Any]) -> str | None:
    if rec.get("task") in HEADLINE:
        return rec["task"]
    return (rec.get("probe") or {}).get("task")


def _protocol_views(rec: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(protocol, metrics) of a record, named by the split they were computed on.

    Where the final evaluation ran on val (``final_role == "val"``) its figures are val figures ("val",
    "val_vote"), the record's own "val" entry repeats them, and a best-over-epochs "test_selected" would be the
    selection score itself.
    """
    on_val = _final_role(rec) == "val"
    views = []
    for protocol in PROTOCOL_ORDER:
        split = rec.get(protocol) or {}
        if on_val:
            if protocol in ("val", "test_selected"):
                continue
            protocol = {"test": "val", "test_vote": "val_vote"}.get(protocol, protocol)
        views.append((protocol, split))
    return views


def _newer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether ``a`` finished at or after ``b`` (ties: the one met later wins, as the store lists in order)."""
    return (a.get("finished_at") or "") >= (b.get("finished_at") or "")


def split_text(rows: Iterable[LeaderRow], protocol: str) -> str:
    """What a section's figures were computed on, read from its runs' own split roles (``splits`` in the record).

    The protocol's generic wording (``PROTOCOLS``) is only a fallback for runs that recorded no splits: a suite
    whose final split is its training split is headed so, not "honest".
    """
    # typed records name the final split "final"; metrics.json of older runs called it "test"
    seen = {(s.get("train"), s.get("val"), s.get("final") or s.get("test")) for r in rows
            for s in (_splits(run) for run in r.runs) if s}
    if not seen:
        return PROTOCOLS[protocol] + " (as the protocol defines it; the runs recorded no split names)"
    parts = []
    for train, val, final in sorted(seen, key=str):
        vote = ", voting over augmented passes" if protocol.endswith("_vote") else ""
        if final is not None and final == train:
            parts.append(f"evaluated on '{final}', the training split itself: not held out, not a generalisation "
                         f"score{vote}")
        elif protocol == "test_selected":
            parts.append(f"split '{final}', best '{final}' score over epochs (selected on the evaluated split "
                         f"itself: optimistic)")
        elif final is not None and final == val:
            parts.append(f"split '{final}', checkpoint selected on '{val}', the same split (optimistic for a "
                         f"test score; the convention where test labels are hidden){vote}")
        else:
            parts.append(f"split '{final}', checkpoint selected on '{val}', trained on '{train}' (held out){vote}")
    return "; ".join(parts) if len(parts) == 1 else "runs differ: " + "; ".join(parts)


# -- aggregation --------------------------------------------------------------------------------------------
def _median(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _mean_or_none(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    return statistics.fmean(vals) if vals else None


def _hardware(r: Mapping[str, Any]) -> str:
    name = (r.get("probe") or {}).get("device_name") or r.get("device_name") or r.get("device") or "unknown"
    threads = (r.get("probe") or {}).get("num_threads") or r.get("num_threads")
    return f"{name} ({threads} threads)" if threads and (r.get("device") or "cpu") == "cpu" else str(name)


def _number(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _loaded(runs: list[Mapping[str, Any]], hardware: str) -> list[tuple[float, int]]:
    """(1-minute load average, cores) of the runs on the row's hardware whose probe ran with more runnable
    threads than cores: their speed figures measured the contention as much as the model."""
    out = []
    for r in runs:
        load, cores = _number(_extra(r).get("load_avg")), _number(_extra(r).get("cpu_count"))
        if _hardware(r) == hardware and load is not None and cores and load > cores:
            out.append((load, int(cores)))
    return out


def _sweep(rec: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """The record's swept config values (``extra["sweep"]``: {dotted key: value}); {} and a note if malformed."""
    sweep = _extra(rec).get("sweep")
    if sweep in (None, {}):
        return {}
    if not isinstance(sweep, Mapping) or not all(isinstance(k, str) and k for k in sweep):
        notes.append(f"result {rec.get('result_id')} ({rec.get('cell')}): extra.sweep is {sweep!r}, not "
                     "{'<dotted config key>': value}; the row is not drawn on a sweep curve")
        return {}
    return dict(sweep)


def _corruptions(runs: list[Mapping[str, Any]], notes: list[str]) -> dict[str, Any] | None:
    """ModelNet-C figures of a row: each kind's OA per severity, clean OA, mCE and relative mCE, averaged over
    the runs that recorded them (``extra["corruptions"]``, see pcbench/data/corruptions.py); ``runs`` = count."""
    found = []
    for r in runs:
        c = _extra(r).get("corruptions")
        if not c:
            continue
        kinds = {k: v for k, v in c.items() if k not in ("clean_oa", "mce", "relative_mce")} \
            if isinstance(c, Mapping) else {}
        ok = kinds and all(
            isinstance(v, (list, tuple)) and len(v) == 5 and all(_number(x) is not None for x in v)
            for v in kinds.values())
        if not ok:
            notes.append(f"result {r.get('result_id')} ({r.get('cell')}): extra.corruptions is not "
                         "{kind: [OA at severity 1..5], clean_oa, mce, relative_mce}; its robustness is not shown")
            continue
        found.append(c)
    if not found:
        return None
    kinds = [k for k in found[0] if k not in ("clean_oa", "mce", "relative_mce") and all(k in c for c in found)]
    out: dict[str, Any] = {k: [statistics.fmean(float(c[k][s]) for c in found) for s in range(5)] for k in kinds}
    for key in ("clean_oa", "mce", "relative_mce"):
        out[key] = _mean_or_none(_number(c.get(key)) for c in found if _number(c.get(key)) is not None)
    out["runs"] = len(found)
    return out


def _efficiency(runs: list[Mapping[str, Any]]) -> tuple[str, dict[str, float | None], str, str, int]:
    """(hardware, medians, int8 status, bf16 status, runs on other hardware) for a group of runs."""
    hw = _hardware
    counts = Counter(hw(r) for r in runs)
    primary = counts.most_common(1)[0][0]
    mine = [r for r in runs if hw(r) == primary]
    eff = {key: _median((r.get("probe") or {}).get(key, r.get(key)) for r in mine) for key in EFFICIENCY_KEYS}
    int8 = Counter((r.get("probe") or {}).get("int8_status") or "not probed" for r in mine)
    bf16 = Counter((r.get("probe") or {}).get("bf16_status") or "not probed" for r in mine)
    return primary, eff, int8.most_common(1)[0][0], bf16.most_common(1)[0][0], len(runs) - len(mine)


def _pick_published(model: str, dataset: str, metric: str, protocol: str) -> Published | None:
    rows = published_for(model, dataset, metric)
    same = [p for p in rows if p.protocol == protocol]
    return (same or rows or [None])[0]


def _value_text(v: Any) -> str:
    return "unset" if v is None else json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)


def _mark_differences(rows: list[LeaderRow]) -> None:
    """Fill ``differs`` of rows that share a label in one section: the config keys where they disagree."""
    same: dict[tuple, list[LeaderRow]] = defaultdict(list)
    for r in rows:
        same[(r.dataset, r.protocol, r.model, r.variant, r.recipe, r.fidelity)].append(r)
    for group in same.values():
        if len(group) < 2:
            continue
        if all(r.sweep for r in group) and len({sweep_text(r.sweep) for r in group}) == len(group):
            for r in group:  # rows of a sweep differ in their swept keys, which the record names
                r.differs = sweep_text(r.sweep)
            continue
        if any(r.config is None for r in group):
            for r in group:
                r.differs = f"identity {r.identity[:12]}"
            continue
        from pcbench.train.config import config_changes  # noqa: PLC0415 - the trainer's own diff; imports torch

        for r in group:
            keys: dict[str, Any] = {}
            for other in group:
                if other is not r:
                    keys.update({k: new for k, _, new in config_changes(other.config, r.config) if k != "seed"})
            r.differs = ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(keys.items())) or \
                f"identity {r.identity[:12]}"


def build_leaderboard(records: Iterable[Mapping[str, Any]], ops: dict[str, Any] | None = None, *,
                      resamples: int | None = None) -> Leaderboard:
    """Group records (dicts as the store returns them) per configuration identity, aggregate seeds and rank.

    Rows whose runs recorded a resampling payload get a bootstrap interval and adjacent rows a paired comparison
    (``pcbench.bench.comparisons``) from ``resamples`` resamples (None: ``stats.DEFAULT_RESAMPLES``; 0: none).
    """
    records = list(records)
    counts = Counter(r["status"] for r in records)
    latest: dict[tuple[str, Any], Mapping[str, Any]] = {}
    times: Counter[tuple[str, Any]] = Counter()
    identity: dict[str, str] = {}  # result_id -> identity, computed once per record
    for r in records:
        identity[r["result_id"]] = _identity(r)
        if r["status"] != "finished":
            continue
        key = (identity[r["result_id"]], _seed(r))
        times[key] += 1
        if key not in latest or _newer(r, latest[key]):
            latest[key] = r
    finished = [r for r in latest.values() if not _extra(r).get("published_weights")]
    published_evals = [r for r in latest.values() if _extra(r).get("published_weights")]
    failed = [r for r in records if r["status"] == "failed" and (identity[r["result_id"]], _seed(r)) not in latest]
    notes: list[str] = []
    dup = sum(times.values()) - len(latest)
    if dup:
        notes.append(f"{dup} finished run(s) repeat a seed of a configuration already counted; the latest of each "
                     "counts (the rows concerned say which seed)")

    groups: dict[tuple, list[tuple[Mapping[str, Any], dict]]] = defaultdict(list)
    with_test = {r.get("dataset") for r in finished if any(split for p, split in _protocol_views(r)
                                                           if p in PROTOCOL_ORDER[:3])}
    for rec in finished:
        task = _task(rec)
        if task is None:
            notes.append(f"result {rec['result_id']} ({rec['cell']}) has no task; not ranked")
            continue
        metric = HEADLINE[task]
        for protocol, split in _protocol_views(rec):
            if protocol == "val" and rec.get("dataset") in with_test:
                continue  # with test labels the validation score selected the checkpoint: not a result
            if split.get(metric) is None:
                continue
            key = (rec.get("dataset") or "?", protocol, task, rec.get("model") or "?", rec.get("variant") or "",
                   rec.get("recipe") or "", rec.get("fidelity") or "", identity[rec["result_id"]])
            groups[key].append((rec, split))

    rows: list[LeaderRow] = []
    for (dataset, protocol, task, model, variant, recipe, fidelity, ident), members in groups.items():
        metric = HEADLINE[task]
        members.sort(key=lambda m: _seed_order(_seed(m[0])))
        runs = [m[0] for m in members]
        splits = [m[1] for m in members]
        per_class = [s.get("iou_per_class") for s in splits if s.get("iou_per_class")]
        iou = None
        if per_class and len({len(p) for p in per_class}) == 1:  # None: the class was absent in that run
            iou = [_mean_or_none(v) for v in zip(*per_class, strict=True)]
        hardware, eff, int8, bf16, other = _efficiency(runs)
        newest = runs[0]
        for r in runs[1:]:
            newest = r if _newer(r, newest) else newest
        rows.append(LeaderRow(
            dataset=dataset, protocol=protocol, task=task, metric=metric, model=model, variant=variant, recipe=recipe,
            fidelity=fidelity, scores=[float(s[metric]) for s in splits],
            metrics={k: _mean_or_none(s.get(k) for s in splits) for k in (*METRIC_NAMES, *PRESENT_NAMES)},
            iou_per_class=iou, class_names=next((r.get("class_names") for r in runs if r.get("class_names")), None),
            hardware=hardware, efficiency=eff, int8_status=int8, bf16_status=bf16,
            runs=[{**{k: r.get(k) for k in _PROVENANCE}, "seed": _seed(r), "identity_sha256": ident,
                   "memory_method": (r.get("probe") or {}).get("memory_method"), "splits": _splits(r),
                   "load_avg": _extra(r).get("load_avg"), "cpu_count": _extra(r).get("cpu_count")} for r in runs],
            published=_pick_published(model, dataset, metric, protocol), other_hardware_runs=other,
            identity=ident, repeats={_seed(r): times[(ident, _seed(r))] for r in runs if times[(ident, _seed(r))] > 1},
            config=_trainer_config(newest), sweep=[_sweep(r, notes) for r in runs][runs.index(newest)],
            corruptions=_corruptions(runs, notes), loaded=_loaded(runs, hardware),
        ))
    _mark_differences(rows)
    by_section: dict[tuple[str, str], list[LeaderRow]] = defaultdict(list)
    for r in rows:
        by_section[(r.dataset, r.protocol)].append(r)
    for section in by_section.values():
        for i, r in enumerate(sorted(section, key=lambda r: -r.mean), 1):
            r.rank = i
            r.rank_label = str(i)
    # A record's note is met once per protocol it has: keep one of each.
    board = Leaderboard(rows=rows, failed=failed, counts=dict(counts), ops=ops, notes=list(dict.fromkeys(notes)),
                        weights=weights_rows(published_evals))
    if resamples != 0 and any(_extra(r).get("resample") for r in finished):
        # Imported here: comparisons.py reads the rows of this module, and numpy is only needed with payloads.
        from pcbench.bench.comparisons import attach_statistics  # noqa: PLC0415

        board.resamples = attach_statistics(board, {r["result_id"]: r for r in finished}, n_resamples=resamples)
    else:
        for r in rows:
            r.ci_note = "no resampling payload recorded" if resamples != 0 else "statistics not computed"
    return board


def weights_rows(records: Iterable[Mapping[str, Any]]) -> list[WeightsRow]:
    """One :class:`WeightsRow` per finished published-weights record and protocol its metrics hold."""
    out: list[WeightsRow] = []
    for rec in records:
        flag = _extra(rec).get("published_weights") or {}
        task = _task(rec)
        if rec.get("status") != "finished" or not flag or task is None:
            continue
        metric = HEADLINE[task]
        pub = flag.get("published") or {}
        for protocol, split in _protocol_views(rec):
            if protocol not in ("test", "test_vote", "val", "val_vote") or split.get(metric) is None:
                continue
            value = pub.get("value")
            out.append(WeightsRow(
                dataset=rec.get("dataset") or "?", protocol=protocol, weights=str(flag.get("name")),
                model=rec.get("model") or "?", metric=metric, score=float(split[metric]),
                published_value=float(value) if value is not None else None,
                published_metric=str(pub.get("metric") or ""), published_protocol=str(pub.get("protocol") or ""),
                published_source=str(pub.get("source") or ""), sha256=flag.get("sha256"),
                result_id=rec["result_id"], cell=rec.get("cell") or ""))
    return out
