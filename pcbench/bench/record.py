"""One benchmark result as a flat record: what the results store holds per cell run and what export writes.

A record is a plain dict whose keys are ``RECORD_FIELDS``. Nested values (the resolved config, the metric
dicts of each split, the efficiency probe) stay dicts here; the store keeps them as JSON text. Build one
from the trainer's ``metrics.json`` with ``record_from_metrics``; ``normalize_record`` checks any record
(from Python or from an imported JSON line) and names the field, its value and the fix when it is wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import socket
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = [
    "JSON_FIELDS", "RECORD_FIELDS", "STATUSES", "FIDELITY", "config_sha256", "describe_allocator", "host_info",
    "identity_sha256", "new_result_id", "normalize_record", "now_iso", "record_from_metrics", "record_from_result",
    "split_roles",
]

STATUSES = ("running", "finished", "failed")
#: Issue 11: a row runs exactly what its cited source ran ("reference") or a documented deviation.
FIDELITY = ("reference", "pcbench variant")

#: field -> Python type of its value (None is always allowed except for the four identity fields).
RECORD_FIELDS: dict[str, type] = {
    # identity and state
    "result_id": str, "status": str, "error": str, "log_path": str, "run_dir": str,
    # which cell of which suite
    "suite": str, "cell": str, "model": str, "dataset": str, "task": str, "variant": str, "seed": int,
    "recipe": str, "fidelity": str,
    # what ran; identity_sha256 = the config without seed and placement: one leaderboard row, its seeds its runs
    "config": dict, "config_sha256": str, "identity_sha256": str,
    # which prepared split served each role: {train, val, final, final_role} (final_role "val" for ScanNet)
    "splits": dict,
    # metrics (fractions in [0, 1]); test_selected = best test score over epochs (optimistic, labelled so)
    "selected_on": str, "best_epoch": int, "last_epoch": int, "epochs": int, "steps": int,
    "val": dict, "test": dict, "test_vote": dict, "test_selected": dict, "class_names": list,
    # the trainer's own speed figures and the per-cell efficiency probe (pcbench.bench.probe)
    "train_samples_per_s": float, "eval_samples_per_s": float, "peak_memory_mib": float, "params": int,
    "wall_s": float, "probe": dict,
    # provenance
    "pcbench_version": str, "git_commit": str, "dataset_manifest_sha256": str, "torch_version": str,
    "cuda_version": str, "device": str, "device_name": str, "cpu_model": str, "num_threads": int,
    "allocator": str, "hostname": str, "python_version": str, "started_at": str, "finished_at": str,
    "recorded_at": str,
    # everything else metrics.json held, so nothing the trainer wrote is lost
    "extra": dict,
}
JSON_FIELDS = tuple(k for k, t in RECORD_FIELDS.items() if t in (dict, list))
_REQUIRED = ("result_id", "status", "cell", "config_sha256")
_METRIC_SPLITS = ("val", "test", "test_vote", "test_selected")


def now_iso() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. ``2025-01-31T12:00:00+00:00``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_result_id() -> str:
    """A fresh random id for one run of one cell (kept across export/import, so imports are idempotent)."""
    return uuid.uuid4().hex


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON (sorted keys, no spaces): the cell's identity."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def identity_sha256(config: Mapping[str, Any]) -> str:
    """The configuration identity of a record's config (pcbench.train.config.config_identity_sha256).

    A runner cell's config is ``{"train": <trainer config>, "probe": <probe settings>}``: its identity is that
    of the trainer config alone, so it equals the ``identity_sha256`` the trainer computes for the same run
    (the probe settings change how efficiency is measured, not what was trained).
    """
    from pcbench.train.config import config_identity_sha256  # noqa: PLC0415 - keeps torch out of store imports

    train = config.get("train") if set(config) == {"train", "probe"} else None
    return config_identity_sha256(dict(train if isinstance(train, Mapping) else config))


def split_roles(splits: Mapping[str, Any] | None) -> dict[str, str] | None:
    """``{train, val, final, final_role}`` of a metrics.json ``splits`` mapping (older ones lack final/final_role)."""
    if not splits:
        return None
    from pcbench.train.result import final_role  # noqa: PLC0415

    final = splits.get("final", splits.get("test"))
    out = {"train": splits.get("train"), "val": splits.get("val"), "final": final,
           "final_role": splits.get("final_role") or (final_role(final) if final is not None else None)}
    return {k: (None if v is None else str(v)) for k, v in out.items()}


def describe_allocator(environ: Mapping[str, str] | None = None) -> str:
    """Which memory allocator setting this process runs under (it changes CPU training speed severalfold, README.md)."""
    env = os.environ if environ is None else environ
    preload = env.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    tuned = [f"{k}={env[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in env]
    return "glibc tuned (" + ", ".join(tuned) + ")" if tuned else "glibc default"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict[str, Any]:
    """Provenance of the machine and process that ran a cell: versions, device, CPU, threads, allocator."""
    import torch  # noqa: PLC0415 - the store and report work without importing torch

    cuda = torch.cuda.is_available()
    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "num_threads": torch.get_num_threads(),
        "allocator": describe_allocator(),
        "hostname": socket.gethostname(),
        "python_version": platform.python_version(),
    }


def _check_type(field: str, value: Any) -> Any:
    want = RECORD_FIELDS[field]
    if value is None:
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, want) or (want in (int, float) and isinstance(value, bool)):
        raise ValueError(f"result field {field!r} must be {want.__name__} or null, got {type(value).__name__} "
                         f"{str(value)[:80]!r}")
    return value


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, type-checked copy of ``record`` (absent fields None); ValueError naming a bad field."""
    unknown = sorted(set(record) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"result record has unknown fields {unknown}; known fields: {sorted(RECORD_FIELDS)} "
                         "(put trainer extras under 'extra')")
    out = {k: _check_type(k, record.get(k)) for k in RECORD_FIELDS}
    missing = [k for k in _REQUIRED if not out[k]]
    if missing:
        raise ValueError(f"result record lacks {missing}; every record needs result_id, status, cell and "
                         "config_sha256 (record_from_metrics fills them)")
    if out["status"] not in STATUSES:
        raise ValueError(f"result field 'status' is {out['status']!r}; use one of {STATUSES}")
    if out["fidelity"] is not None and out["fidelity"] not in FIDELITY:
        raise ValueError(f"result field 'fidelity' is {out['fidelity']!r}; use one of {FIDELITY} or null")
    if out["status"] == "failed" and not out["error"]:
        raise ValueError("a failed result needs 'error' (the exception text) so the report can say why")
    if out["config"] is not None and config_sha256(out["config"]) != out["config_sha256"]:
        raise ValueError(f"result {out['result_id']}: config_sha256 {out['config_sha256'][:12]}... does not match "
                         f"its config ({config_sha256(out['config'])[:12]}...); compute it with "
                         "pcbench.bench.record.config_sha256(config)")
    if out["config"] is not None:  # records exported before identities existed get theirs from their config
        ident = identity_sha256(out["config"])
        if out["identity_sha256"] is not None and out["identity_sha256"] != ident:
            raise ValueError(f"result {out['result_id']}: identity_sha256 {out['identity_sha256'][:12]}... does not "
                             f"match its config ({ident[:12]}...); compute it with "
                             "pcbench.bench.record.identity_sha256(config)")
        out["identity_sha256"] = ident
    if out["splits"] is not None:
        unknown_roles = sorted(set(out["splits"]) - {"train", "val", "final", "final_role"})
        if unknown_roles or out["splits"].get("final_role") not in ("test", "val"):
            raise ValueError(f"result {out['result_id']}: splits={out['splits']} must map train, val, final and "
                             "final_role ('test' or 'val'); build it with pcbench.bench.record.split_roles")
    for split in _METRIC_SPLITS:
        if out[split] is not None:  # NaN (a class absent from the split) -> null: standard JSON, same meaning
            out[split] = {k: _nan_to_none(v) for k, v in out[split].items()}
        for key, val in (out[split] or {}).items():
            vals = val if isinstance(val, list) else [val]
            if key in ("oa", "macc", "miou", "iou_per_class", "acc_per_class") and any(
                    v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0) for v in vals):
                raise ValueError(f"result {out['result_id']}: {split}.{key}={str(val)[:60]} is not a fraction in "
                                 "[0, 1] (metrics.json stores fractions, not percentages)")
    return out


def record_from_metrics(
    metrics: Mapping[str, Any] | None,
    *,
    cell: str,
    config: Mapping[str, Any],
    status: str = "finished",
    suite: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    task: str | None = None,
    variant: str | None = None,
    recipe: str | None = None,
    fidelity: str | None = None,
    class_names: list[str] | None = None,
    probe: Mapping[str, Any] | None = None,
    error: str | None = None,
    log_path: str | None = None,
    run_dir: str | None = None,
    started_at: str | None = None,
    finished_at: str | None = None,
    result_id: str | None = None,
    host: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A normalized record from the trainer's ``metrics.json`` dict (None for a cell that failed before it).

    ``config`` is the cell's resolved config; its hash (``config_sha256``) is what the runner looks up to skip
    finished cells. ``host`` defaults to ``host_info()`` of this process; metrics.json values win over it.
    """
    m = dict(metrics or {})
    rec: dict[str, Any] = {k: None for k in RECORD_FIELDS}
    rec.update(host_info() if host is None else dict(host))
    for key in RECORD_FIELDS:
        if key in m and key not in ("config", "config_sha256", "identity_sha256", "splits", "extra", "probe"):
            rec[key] = m.pop(key)
    m.pop("identity_sha256", None)  # recomputed from ``config`` by normalize_record: one identity per config
    if isinstance(m.get("splits"), Mapping):
        rec["splits"] = split_roles(m.pop("splits"))
    if rec["last_epoch"] is None:  # the trainer runs to its last epoch; metrics.json counts them
        rec["last_epoch"] = rec["epochs"]
    extra = m
    if "config_sha256" in extra:  # the trainer's own hash of its config, kept beside ours
        extra["trainer_config_sha256"] = extra.pop("config_sha256")
    # a paper recipe's name and fidelity: the caller's, else what the trainer recorded (cfg.recipe)
    recipe = recipe if recipe is not None else rec["recipe"]
    fidelity = fidelity if fidelity is not None else rec["fidelity"]
    rec.update(
        result_id=result_id or new_result_id(), status=status, suite=suite, cell=cell, model=model,
        dataset=dataset, task=task, variant=variant, recipe=recipe, fidelity=fidelity,
        config=json.loads(json.dumps(dict(config), default=str)), error=error, log_path=log_path, run_dir=run_dir,
        started_at=started_at, finished_at=finished_at or (now_iso() if status != "running" else None),
        probe=dict(probe) if probe is not None else None, extra=extra or None, recorded_at=now_iso(),
    )
    if class_names is not None:
        rec["class_names"] = list(class_names)
    rec["config_sha256"] = config_sha256(rec["config"])
    return normalize_record(rec)


#: FitResult provenance keys that are record fields of the same meaning (the rest stays in ``extra``).
_PROVENANCE_FIELDS = ("pcbench_version", "git_commit", "torch_version", "dataset_manifest_sha256")


def record_from_result(result: Any, *, cell: str, config: Mapping[str, Any], device: str | None = None,
                       **kwargs: Any) -> dict[str, Any]:
    """A normalized ``finished`` record from the trainer's typed result (:class:`pcbench.train.result.FitResult`).

    Fields come from the result's typed attributes, never from its ``extra``: split roles from
    ``result.splits``, the torch threads from its provenance. The suite's names for model and dataset
    (``model=``, ``dataset=``, passed through ``kwargs`` like every other :func:`record_from_metrics` keyword)
    are the record's; the trainer's own (its model class, its data config name) are in ``config``.
    ``device`` is the torch device type the cell ran on ("cpu", "cuda"); ``device_name`` says which one.
    """
    prov = dict(result.provenance)
    fields: dict[str, Any] = {p: m for p, m in result.metrics.items() if p in _METRIC_SPLITS}
    fields.update({k: prov.pop(k) for k in _PROVENANCE_FIELDS if k in prov})
    fields.update(seed=result.seed, task=result.task, selected_on="val", best_epoch=result.best_epoch,
                  epochs=result.epochs, last_epoch=result.epochs, steps=result.steps,
                  train_samples_per_s=result.train_samples_per_s, eval_samples_per_s=result.eval_samples_per_s,
                  peak_memory_mib=result.peak_memory_mib, params=result.params, wall_s=result.wall_s)
    extra: dict[str, Any] = dict(result.extra)
    if "val_final" in result.metrics:  # val re-measured on the saved checkpoint: beside the selecting val
        extra["val_final"] = result.metrics["val_final"]
    extra.update(selection_metric=result.selection_metric, selected_value=result.selected_value,
                 skipped_steps=result.skipped_steps, scaler_skipped_steps=result.scaler_skipped_steps,
                 num_classes=result.num_classes, in_channels=result.in_channels, ignore_index=result.ignore_index,
                 trainer_config_sha256=result.config_sha256)
    extra.update({k: v for k, v in result.recipe.items() if k not in ("recipe", "fidelity")})
    threads = prov.pop("threads", None)
    prov.pop("device", None)  # the trainer's "cpu (<model>)" text: ``device`` + ``device_name`` say the same
    extra.update(prov)  # precision, world size, allocator setting: what the run used
    host = dict(kwargs.pop("host", None) or host_info())
    if threads is not None:
        host["num_threads"] = int(threads)
    for key in ("recipe", "fidelity"):  # the caller's (the suite's), else what the trainer recorded
        if kwargs.get(key) is None:
            kwargs[key] = result.recipe.get(key)
    rec = record_from_metrics({**extra, **fields}, cell=cell, config=config, host=host,
                              class_names=list(result.class_names) or None, **kwargs)
    rec.update(device=device, splits=split_roles({"train": result.splits.train, "val": result.splits.val,
                                                  "final": result.splits.final,
                                                  "final_role": result.splits.final_role}))
    if result.identity_sha256 and result.identity_sha256 != rec["identity_sha256"]:
        rec["extra"] = {**(rec["extra"] or {}), "trainer_identity_sha256": result.identity_sha256}
    return normalize_record(rec)
