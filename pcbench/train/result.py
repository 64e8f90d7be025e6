"""The one typed result of a run: what :func:`pcbench.train.fit` returns, ``metrics.json`` holds, the runner
records and the report reads. Nothing downstream decides anything from free-form extras.

Split roles are explicit: ``splits.final`` names the prepared split the final evaluation ran on and
``splits.final_role`` says what that split *is* ("test", or "val" where the official test labels are hidden, as
for ScanNet, whose published figures are on val). Configuration identity is explicit too: ``config_sha256``
hashes everything but where the run executed; ``identity_sha256`` also drops the seed, so runs with equal
identity are seeds of one leaderboard row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FitResult", "SplitRoles", "final_role"]

#: metric dicts a result may carry, by protocol: selecting val at the chosen epoch, val re-measured on the
#: saved checkpoint, the final evaluation (plain), its voted / TTA pass, and the optimistic best-test-over-epochs.
PROTOCOLS = ("val", "val_final", "test", "test_vote", "test_selected")


def final_role(split: str) -> str:
    """What a prepared split of this name is for the leaderboard: ``val`` for a validation split, else ``test``."""
    s = str(split).lower()
    return "val" if s in ("val", "valid", "validation") or s.startswith("val_") else "test"


@dataclass(frozen=True)
class SplitRoles:
    """Which prepared split served each role, and what the final-evaluation split really is."""

    train: str
    val: str  #: the validation split's source (a prepared split, or a hold-out of train, as data.py describes)
    final: str  #: the prepared split evaluated once on the selected checkpoint (``data.splits.test``)
    final_role: str  #: "test" or "val" (see :func:`final_role`)

    @classmethod
    def of(cls, train: str, val: str, final: str) -> SplitRoles:
        """Roles with ``final_role`` derived from the final split's name."""
        return cls(str(train), str(val), str(final), final_role(final))


@dataclass
class FitResult:
    """One finished run. ``to_dict()`` is exactly ``metrics.json``; ``from_dict`` reads it back."""

    task: str
    dataset: str
    model: str
    seed: int
    config: dict[str, Any]
    config_sha256: str
    identity_sha256: str
    splits: SplitRoles
    metrics: dict[str, dict[str, Any]]  #: protocol (one of PROTOCOLS) -> metric dict
    selection_metric: str
    selected_value: float | None  #: the val value that selected the checkpoint, as logged
    best_epoch: int | None
    epochs: int
    steps: int
    skipped_steps: int = 0
    scaler_skipped_steps: int = 0
    train_samples_per_s: float | None = None
    eval_samples_per_s: float | None = None
    peak_memory_mib: float | None = None
    params: int | None = None
    wall_s: float | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    ignore_index: int | None = None
    class_names: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  #: versions, git commit, device, precision, ...
    recipe: dict[str, Any] = field(default_factory=dict)  #: {recipe, fidelity, recipe_source} of a paper recipe
    extra: dict[str, Any] = field(default_factory=dict)  #: informative only (val_split details, ...)

    @property
    def headline(self) -> float | None:
        """The selection metric on the final evaluation split (plain pass)."""
        return (self.metrics.get("test") or {}).get(self.selection_metric)

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json mapping (flat keys kept from earlier formats, plus the typed fields)."""
        out: dict[str, Any] = {}
        for proto, m in self.metrics.items():
            out[proto] = dict(m)
        out.update({
            "task": self.task, "dataset": self.dataset, "model": self.model, "seed": self.seed,
            "config": self.config, "config_sha256": self.config_sha256, "identity_sha256": self.identity_sha256,
            "splits": {"train": self.splits.train, "val": self.splits.val, "test": self.splits.final,
                       "final": self.splits.final, "final_role": self.splits.final_role},
            "selected_on": "val", "selection_metric": self.selection_metric, "selected_value": self.selected_value,
            "best_epoch": self.best_epoch, "epochs": self.epochs, "steps": self.steps,
            "skipped_steps": self.skipped_steps, "scaler_skipped_steps": self.scaler_skipped_steps,
            "train_samples_per_s": self.train_samples_per_s, "eval_samples_per_s": self.eval_samples_per_s,
            "peak_memory_mib": self.peak_memory_mib, "params": self.params, "wall_s": self.wall_s,
            "num_classes": self.num_classes, "in_channels": self.in_channels, "ignore_index": self.ignore_index,
            "class_names": list(self.class_names),
        })
        out.update(self.provenance)
        out.update(self.recipe)
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitResult:
        """Read a ``to_dict()`` mapping (a metrics.json) back; KeyError naming a missing typed field."""
        names = {f.name for f in dataclasses.fields(cls)}
        sp = d["splits"]
        final = sp.get("final", sp.get("test"))
        kw: dict[str, Any] = {
            "splits": SplitRoles(str(sp["train"]), str(sp["val"]), str(final), str(sp.get("final_role") or final_role(final))),
            "metrics": {p: dict(d[p]) for p in PROTOCOLS if isinstance(d.get(p), dict)},
            "recipe": {k: d[k] for k in ("recipe", "fidelity", "recipe_source", "fidelity_reasons") if k in d},
        }
        prov_keys = ("pcbench_version", "git_commit", "torch_version", "device", "precision", "world_size", "threads",
                     "malloc", "dataset_manifest_sha256")
        kw["provenance"] = {k: d[k] for k in prov_keys if k in d}
        for n in names - set(kw) - {"extra"}:
            if n in d:
                kw[n] = d[n]
        used = set(kw["provenance"]) | set(kw["recipe"]) | set(PROTOCOLS) | names | {"splits", "selected_on"}
        kw["extra"] = {k: v for k, v in d.items() if k not in used}
        return cls(**kw)
