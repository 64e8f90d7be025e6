"""Benchmark suites (``conf/suite/<name>.yaml``): the matrix of cells a suite runs and each cell's trainer config.

A suite names its datasets (a ``conf/data`` option, where the prepared folder is and how ``pcbench-prep``
makes it), its model entries (a ``conf/model`` option or a ``conf/experiment`` paper recipe, the datasets it
runs on, extra trainer overrides and swept options) and its seeds. :func:`expand_suite` turns that into
cells: model entry × dataset × combination of swept values × seed, each one trainer run
(``pcbench.train.fit``) plus its efficiency probe. :func:`cell_config` composes a cell's trainer config
exactly as ``pcbench-train`` would from the same overrides; :func:`cell_identity` is what the results store
hashes (``config_sha256``) to recognise a finished cell when a suite is run again.

Overrides apply in this order, later ones winning: the suite's ``train``, the dataset's ``train``, the model
entry's ``train``, the swept values, the runner's ``device=`` (as ``trainer=<device>``) and ``overrides=``, then ``seed`` and
``data.root``.

Sweeps ("how does the score move with k"): ``sweep`` maps a dotted trainer config key to its values, suite-wide
(every model entry: keys all of them have, e.g. ``data.num_points`` or ``optim.lr``) and / or per model entry
(its own knobs, e.g. ``model.k``); the two are crossed with each other, with the entry's datasets and with the
seeds::

    sweep: {model.k: [8, 16], data.num_points: [256, 512]}    # 4 configurations x seeds
    sweep: {pts: {key: data.num_points, values: [256, 512]}}  # the same key tagged "pts" in cell names

Each value changes the trainer config, so each is its own configuration identity (its own cell and
leaderboard row); the runner records the swept values as ``extra.sweep = {key: value}`` and the report draws
metric and throughput against each swept key, one line per model. Cell names carry ``<tag><value>`` (the tag is
the key's last part, or the whole key where two swept keys share it). An empty value list, a key swept twice
and (:func:`check_sweep_keys`, run by the runner's plan) a key the composed trainer config lacks are errors.

Published weights (issue 19): ``weights`` entries, next to ``models``, evaluate a checkpoint the authors published
instead of training one::

    weights:
      ssg_yanx27:                                   # entry name (cell names use it)
        name: pointnet2_ssg_cls.modelnet40.yanx27   # a pcbench.models.zoo_registry.PUBLISHED name
        file: /data/ckpt/best_model.pth             # optional: the source file already downloaded (offline)
        checkpoint: /data/ckpt/ssg.pt               # optional: a checkpoint pcbench-weights already converted
        datasets: [modelnet40]
        train: [model.num_samples=[512,128]]        # optional overrides (must keep the weights' shapes)

Each entry × dataset is one cell (the suite's first seed only: nothing is trained) whose trainer config is
``model=<the entry's model config>`` on the dataset with the suite's, the dataset's and the entry's overrides,
evaluated by ``pcbench.train.evaluate`` on ``eval.split`` (plain, and voted when the data config's TTA has
passes). Without ``file`` / ``checkpoint`` the registry downloads it (hash-checked). The runner records it with
``extra.published_weights`` and the report shows it apart from trained rows, beside the published figure.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from pcbench.bench.record import FIDELITY

__all__ = [
    "PLACEMENT_KEYS", "REFERENCE_KEYS", "Cell", "SuiteError", "cell_config", "cell_identity", "check_sweep_keys",
    "compose_bench", "expand_suite", "format_override",
]

#: Config keys that say where and with how many threads a cell runs, not what it computes: left out of the
#: cell's identity, so a suite resumed with another launcher or thread count still skips its finished cells.
PLACEMENT_KEYS = ("paths", "resume", "hydra", "logger", "fault", "trainer.threads", "trainer.num_workers",
                  "trainer.checkpoint_every_n_steps", "trainer.compile_backend", "trainer.compile_mode",
                  "trainer.compile_dynamic")
#: Overrides that keep a paper recipe the "reference": they only place the run (data folder, seed, device);
#: a key ending in "." stands for every key under it.
REFERENCE_KEYS = ("data.root", "seed", "trainer", "trainer.accelerator", "trainer.strategy", "trainer.threads",
                  "trainer.num_workers", "trainer.checkpoint_every_n_steps", "logger", "logger.",
                  "eval.save_predictions", "resume", "fault.")

_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
#: A sweep key: a plain dotted config key (no Hydra "+" / "~" prefixes, no group paths with "/").
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
#: The keys a suite, its dataset entries, its model entries and its probe settings may have: anything else is
#: a typo that would otherwise be ignored silently (e.g. ``trian:`` dropping a model's overrides).
SUITE_KEYS = ("name", "description", "seeds", "train", "sweep", "probe", "datasets", "models", "weights")
DATASET_KEYS = ("data", "label", "root", "prep", "train", "hint")
MODEL_KEYS = ("model", "experiment", "datasets", "train", "sweep", "recipe", "fidelity")
WEIGHTS_KEYS = ("name", "file", "checkpoint", "datasets", "train")
PROBE_KEYS = ("batches", "warmup", "repeats", "latency_repeats", "bf16", "int8", "score")


class SuiteError(ValueError):
    """A suite that cannot be run as written; the message names the suite key, its value and the fix."""


@dataclass(frozen=True)
class Cell:
    """One trainer run of a suite: a model entry on a dataset with one combination of swept values and one seed."""

    name: str                    # unique in the suite, e.g. "objects-pointnet2_ssg_cls-points512-s0"
    suite: str
    entry: str                   # key of the model entry in suite.models
    dataset: str                 # key of the dataset in suite.datasets
    dataset_label: str           # what the results store and the report call the dataset
    seed: int
    variant: str                 # swept values as "points=512 k=16" ("" without a sweep)
    recipe: str                  # the conf/experiment recipe, or the suite's description of the setting
    fidelity: str                # "reference" (a recipe as cited) or "pcbench variant"
    overrides: tuple[str, ...]   # trainer overrides (Hydra syntax), data.root included
    data_root: str
    probe: dict[str, Any] = field(default_factory=dict, compare=False)
    sweep: dict[str, Any] = field(default_factory=dict, compare=False)  # swept config key -> value ({} without)
    weights: dict[str, Any] = field(default_factory=dict, compare=False)  # published weights: {name, file, checkpoint}


# ------------------------------------------------------------------------------------------ composing
def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with its ``hydra`` node (the runner needs the launcher and choices)."""
    from hydra import compose as hydra_compose  # noqa: PLC0415
    from hydra import initialize_config_dir  # noqa: PLC0415
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415

    from pcbench.train.config import ConfigError, config_dir, explain_override_error  # noqa: PLC0415

    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    if saved is not None:  # inside a @hydra.main job: compose in a fresh context, then put the job's back
        gh.clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            try:
                return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
            except Exception as err:  # noqa: BLE001 - Hydra raises several types; all become one clear error
                explain = _explain_bench_error if config_name == "bench" else explain_override_error
                raise ConfigError(explain(err, list(overrides))) from err
    finally:
        if saved is not None:
            gh.clear()
            gh.initialize(saved)


def _bench_node_keys(dotted: str, overrides: Sequence[str]) -> list[str] | None:
    """Keys of a node of conf/bench.yaml composed with the command's ``suite=`` choice (None: no such node)."""
    from hydra import compose as hydra_compose  # noqa: PLC0415

    choice = [o for o in overrides if o.split("=", 1)[0] == "suite"]
    try:
        cfg = hydra_compose("bench", overrides=choice)
    except Exception:  # noqa: BLE001 - the suite choice itself is wrong: Hydra's message says so already
        return None
    node = OmegaConf.select(cfg, dotted, default=None)
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else None


def _explain_bench_error(err: Exception, overrides: Sequence[str]) -> str:
    """Hydra's message about a pcbench-bench argument plus the runner's keys (or the node's) that were meant."""
    from pcbench.train.config import config_dir  # noqa: PLC0415

    msg = str(err).split("\nConfig search path")[0].strip()
    text = str(err)
    if not ("not in struct" in text or "Could not override" in text or "Key '" in text):
        return msg
    runner_keys = sorted(k for k in OmegaConf.load(config_dir() / "bench.yaml") if k not in ("defaults", "hydra"))
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra") or key == "suite":
            continue
        if "." not in key:
            if key not in runner_keys:
                return (f"{msg}\npcbench-bench has no key {key!r}; its keys: {', '.join(runner_keys)} (conf/bench.yaml). "
                        "Suite keys go under suite.<key>=..., trainer overrides under 'overrides=[key=value,...]'")
            continue
        parent, leaf = key.rsplit(".", 1)
        keys = _bench_node_keys(parent, overrides)
        if keys is not None and leaf not in keys:
            return f"{msg}\n{parent!r} has no key {leaf!r}; its keys: {', '.join(sorted(keys))}"
    return msg


def compose_bench(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/bench.yaml`` with ``overrides`` (``suite=<name>`` and the runner's keys), hydra node included."""
    return _compose("bench", overrides)


def cell_config(cell: Cell, run_dir: str | Path) -> tuple[DictConfig, dict[str, Any]]:
    """The cell's trainer config (as ``pcbench-train`` would compose it) and Hydra's group choices.

    ``paths.run_dir`` is set to ``run_dir``; ConfigError (from the trainer) names a bad override.
    """
    cfg = _compose("train", [*cell.overrides, f"paths.run_dir={Path(run_dir).resolve()}"])
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def _drop(plain: dict[str, Any], dotted: str) -> None:
    node = plain
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.get(p)
        if not isinstance(node, dict):
            return
    node.pop(leaf, None)


def cell_identity(train_cfg: DictConfig, probe: Mapping[str, Any],
                  weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a cell's result: the resolved trainer config without :data:`PLACEMENT_KEYS`, and the
    probe settings (a published-weights cell: the weights instead of the probe). Its ``config_sha256`` is what
    the store looks up to skip finished cells."""
    plain = OmegaConf.to_container(train_cfg, resolve=True)
    for key in PLACEMENT_KEYS:
        _drop(plain, key)
    if weights:
        return {"train": plain, "weights": dict(weights)}
    return {"train": plain, "probe": dict(probe)}


# ------------------------------------------------------------------------------------------ expanding
def format_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override syntax (lists as ``[a,b]``, None as ``null``, bools lowercase)."""
    return f"{key}={_value(value)}"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple, ListConfig)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str) and (v == "" or re.search(r"[\s,\[\]{}()=\"']", v)):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def _slug(v: Any) -> str:
    text = _value(v).strip("'[]").replace(",", "_")
    return re.sub(r"[^A-Za-z0-9_.]", "_", text)


def _strings(node: Any, where: str) -> list[str]:
    if node is None:
        return []
    if not OmegaConf.is_list(node) and not isinstance(node, (list, tuple)):
        raise SuiteError(f"{where} must be a list of trainer overrides like [trainer.max_epochs=10], got {node!r}")
    out = [str(x) for x in node]
    bad = [x for x in out if "=" not in x]
    if bad:
        raise SuiteError(f"{where} holds {bad}, which are not key=value overrides; write them as in pcbench-train, "
                         "e.g. trainer.max_epochs=10 or model=ptv3_seg")
    return out


def _sweeps(node: Any, where: str) -> list[tuple[str | None, str, list[Any]]]:
    """[(tag or None, config key, values)] of a ``sweep`` mapping (see the module docstring for its two forms)."""
    out: list[tuple[str | None, str, list[Any]]] = []
    if node is not None and not isinstance(node, (dict, DictConfig)):
        raise SuiteError(f"{where} must map config keys to values, e.g. {{model.k: [8, 16]}}, got {node!r}")
    for name, spec in (node or {}).items():
        if isinstance(spec, (dict, DictConfig)):  # long form: a short tag for the key in cell names
            if not _NAME.match(str(name)):
                raise SuiteError(f"{where}.{name}: sweep names may use letters, digits, '_' and '.' only")
            if "key" not in spec or "values" not in spec or set(spec) - {"key", "values"}:
                raise SuiteError(f"{where}.{name} must be {{key: <trainer override key>, values: [...]}}, got {spec!r}")
            tag, key, raw, at = str(name), str(spec["key"]), spec["values"], f"{where}.{name}.values"
        else:
            tag, key, raw, at = None, str(name), spec, f"{where}.{name}"
        if not _KEY.match(key):
            raise SuiteError(f"{where}.{name}: sweep key {key!r} is not a dotted trainer config key like model.k or "
                             "data.num_points (no '+', '~' or '/'; a key the config lacks cannot be swept)")
        if not OmegaConf.is_list(raw) and not isinstance(raw, (list, tuple)):
            raise SuiteError(f"{at}={raw!r} must be a list of values, e.g. {key}: [8, 16] (one value: [8]; a "
                             "list-valued key: a list of lists)")
        values = list(OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw)
        if not values:
            raise SuiteError(f"{at} is empty; give at least one value")
        out.append((tag, key, values))
    return out


def _tagged(sweeps: list[tuple[str | None, str, list[Any]]], where: str) -> list[tuple[str, str, list[Any]]]:
    """Sweeps with a tag each (the key's last part, or the whole key where two keys share it); SuiteError for a
    key swept twice (suite-wide and by the entry), which would run one configuration under two names."""
    keys = [k for _, k, _ in sweeps]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SuiteError(f"{where}: {twice} swept twice (in suite.sweep and the entry's sweep, or twice in one); "
                         "sweep each key in one place")
    leaves = [k.rsplit(".", 1)[-1] for t, k, _ in sweeps if t is None]
    out = [(t if t is not None else (k.rsplit(".", 1)[-1] if leaves.count(k.rsplit(".", 1)[-1]) == 1 else k), k, v)
           for t, k, v in sweeps]
    tags = [t for t, _, _ in out]
    if len(set(tags)) != len(tags):
        raise SuiteError(f"{where}: sweep tags {tags} repeat; give the long form distinct names")
    return out


def check_sweep_keys(bench: DictConfig, cells: Sequence[Cell]) -> None:
    """SuiteError unless every swept key of ``cells`` is a key of its cell's composed trainer config.

    Composes one config per model entry and dataset that sweeps, without the swept overrides, so the message can
    name the key, the model entry and the keys that exist there (Hydra would only say an override failed).
    """
    import difflib  # noqa: PLC0415

    seen: set[tuple[str, str]] = set()
    for c in cells:
        if not c.sweep or (c.entry, c.dataset) in seen:
            continue
        seen.add((c.entry, c.dataset))
        swept = set(c.sweep)
        base = [o for o in c.overrides if o.split("=", 1)[0].lstrip("+~") not in swept]
        cfg = _compose("train", base)
        for key in c.sweep:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            present = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
            if leaf in present:
                continue
            suite_wide = key in (bench.suite.get("sweep") or {}) or any(
                isinstance(v, (dict, DictConfig)) and v.get("key") == key for v in (bench.suite.get("sweep") or {}).values())
            where = "suite.sweep" if suite_wide else f"suite.models.{c.entry}.sweep"
            near = difflib.get_close_matches(leaf, present, n=3)
            hint = (f"; did you mean {', '.join(f'{parent}.{k}' if parent else k for k in near)}?" if near else "")
            has = (f"; {parent or 'the config'} has keys {', '.join(sorted(present))}" if present
                   else f"; {parent!r} is not a config node")
            raise SuiteError(f"{where}: {key!r} is not a key of the trainer config of model entry {c.entry!r} "
                             f"(model={cfg.hydra.runtime.choices.get('model')}, dataset {c.dataset}){hint}{has}")


def _override_keys(overrides: Sequence[str]) -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def _fidelity(entry: Mapping[str, Any], extra: Sequence[str], where: str) -> str:
    """"reference" when a paper recipe runs with placement overrides only; otherwise "pcbench variant"."""
    declared = entry.get("fidelity")
    if declared is not None:
        if declared not in FIDELITY:
            raise SuiteError(f"{where}.fidelity={declared!r}; use one of {FIDELITY} or leave it out")
        return str(declared)
    if not entry.get("experiment"):
        return "pcbench variant"
    changed = [k for k in _override_keys(extra)
               if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in REFERENCE_KEYS)]
    return "pcbench variant" if changed else "reference"


def _known(node: Any, keys: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in (node.keys() if isinstance(node, (dict, DictConfig)) else ()) if k not in keys)
    if unknown:
        raise SuiteError(f"{where} has unknown key(s) {unknown}; its keys are {', '.join(keys)} (a typo here would "
                         "be ignored and change what runs)")


def _entry_dataset(datasets: Any, dkey: str, where: str) -> tuple[Any, str]:
    """The suite dataset ``dkey`` an entry names and its expanded root; SuiteError naming the entry otherwise."""
    if dkey not in datasets:
        raise SuiteError(f"{where}.datasets names {dkey!r}, which is not a key of suite.datasets "
                         f"({sorted(datasets)})")
    d = datasets[dkey]
    return d, str(Path(str(d.root)).expanduser())


def expand_suite(bench: DictConfig, only: Sequence[str] | None = None) -> list[Cell]:
    """The cells of ``bench.suite`` in a stable order (those matching a glob of ``only``, when given).

    SuiteError names the suite key when the suite is malformed; a model entry none of whose cells is selected
    is not checked further (so ``only=`` can run part of a suite whose other recipes are missing here).
    """
    from pcbench.train.config import group_options  # noqa: PLC0415

    s = bench.suite
    sname = str(s.get("name") or "")
    if not _NAME.match(sname):
        raise SuiteError(f"suite.name={sname!r}: give the suite a name of letters, digits, '_' or '.'")
    seeds = list(s.get("seeds") or [])
    if not seeds or not all(isinstance(x, int) for x in seeds):
        raise SuiteError(f"suite {sname}: seeds={seeds!r}; give a list of integers, e.g. seeds: [0, 1, 2]")
    _known(s, SUITE_KEYS, f"suite {sname}")
    _known(s.get("probe") or {}, PROBE_KEYS, "suite.probe")
    datasets = s.get("datasets") or {}
    models = s.get("models") or {}
    for key, d in datasets.items():
        _known(d, DATASET_KEYS, f"suite.datasets.{key}")
    for key, e in models.items():
        _known(e, MODEL_KEYS, f"suite.models.{key}")
    weights = s.get("weights") or {}
    for key, e in weights.items():
        _known(e, WEIGHTS_KEYS, f"suite.weights.{key}")
    if not models and not weights:
        raise SuiteError(f"suite {sname} has no models; add entries under suite.models (or suite.weights)")
    experiments = set(group_options("experiment"))
    model_options = set(group_options("model"))
    data_options = set(group_options("data"))
    for key, d in datasets.items():
        if not _NAME.match(str(key)):
            raise SuiteError(f"suite {sname}: dataset key {key!r} may use letters, digits, '_' and '.' only")
        if d.get("data") not in data_options:
            raise SuiteError(f"suite.datasets.{key}.data={d.get('data')!r} is not a conf/data option; "
                             f"options: {sorted(data_options)}")
        if OmegaConf.is_missing(d, "root") or not d.get("root"):
            raise SuiteError(f"suite.datasets.{key}.root is not set: give the prepared folder, e.g. "
                             f"suite.datasets.{key}.root=/data/pcbench/{d.data}")
    common = _strings(s.get("train"), f"suite {sname}: train")
    global_sweeps = _sweeps(s.get("sweep"), "suite.sweep")
    runner_extra = ([f"trainer={bench.device}"] if bench.get("device") else []) + _strings(
        bench.get("overrides"), "overrides")
    cells: list[Cell] = []
    for ename, e in models.items():
        where = f"suite.models.{ename}"
        if not _NAME.match(str(ename)):
            raise SuiteError(f"{where}: model entry names may use letters, digits, '_' and '.' only")
        exp, model = e.get("experiment"), e.get("model") or (None if e.get("experiment") else ename)
        names = list(e.get("datasets") or [])
        if not names:
            raise SuiteError(f"{where}.datasets is empty; list the suite dataset keys it runs on ({sorted(datasets)})")
        entry_train = _strings(e.get("train"), f"{where}.train")
        sweeps = _tagged(global_sweeps + _sweeps(e.get("sweep"), f"{where}.sweep"), where)
        clash = sorted({k for _, k, _ in sweeps} & set(_override_keys(runner_extra)))
        if clash:  # the runner's overrides come after the swept values: every cell would run the same config
            raise SuiteError(f"pcbench-bench overrides= sets {clash}, which {where} sweeps (suite-wide or its own "
                             "sweep); the override would replace every swept value: drop it from overrides= or "
                             "change the sweep")
        recipe = str(e.get("recipe") or exp or f"{sname}: {model}")
        mine: list[Cell] = []
        for dkey in names:
            d, root = _entry_dataset(datasets, dkey, where)
            base = [f"experiment={exp}"] if exp else [f"model={model}", f"data={d.data}"]
            fixed = [*common, *_strings(d.get("train"), f"suite.datasets.{dkey}.train"), *entry_train]
            for combo in itertools.product(*[[(n, k, v) for v in vals] for n, k, vals in sweeps]):
                extra = [*fixed, *(format_override(k, v) for _, k, v in combo), *runner_extra]
                tag = "-".join(f"{n}{_slug(v)}" for n, _, v in combo)
                for seed in seeds:
                    mine.append(Cell(
                        name="-".join(x for x in (str(dkey), str(ename), tag, f"s{seed}") if x), suite=sname,
                        entry=str(ename), dataset=str(dkey), dataset_label=str(d.get("label") or d.data),
                        seed=int(seed), variant=" ".join(f"{n}={_value(v)}" for n, _, v in combo), recipe=recipe,
                        fidelity=_fidelity(e, extra, where), overrides=(*base, *extra, f"seed={seed}", f"data.root={root}"),
                        data_root=root, probe=OmegaConf.to_container(s.get("probe") or {}, resolve=True),
                        sweep={k: v for _, k, v in combo}))
        if only:
            mine = [c for c in mine if any(fnmatch.fnmatchcase(c.name, p) for p in only)]
        if not mine:
            continue
        if exp is not None and exp not in experiments:
            raise SuiteError(f"{where}.experiment={exp!r} is not in conf/experiment/ (recipes: {sorted(experiments)}); "
                             "add the recipe or correct the name")
        if exp is None and model not in model_options:
            raise SuiteError(f"{where}: model={model!r} is not a conf/model option; options: {sorted(model_options)}")
        cells += mine
    cells += _weight_cells(weights, datasets, sname, int(seeds[0]), common, runner_extra, only, model_options)
    if only and not cells:
        raise SuiteError(f"only={list(only)} matches none of the cells of suite {sname}; list its cells with "
                         f"pcbench-bench suite={sname} dry_run=true (without only=)")
    seen: dict[str, int] = {}
    for c in cells:
        seen[c.name] = seen.get(c.name, 0) + 1
    dup = sorted(n for n, k in seen.items() if k > 1)
    if dup:
        raise SuiteError(f"suite {sname} makes the cells {dup} more than once; give the model entries distinct names "
                         "or list each dataset once")
    return cells


def _model_overrides(pairs: Sequence[tuple[str, Any]]) -> list[str]:
    """``model.<key>=<value>`` overrides (Hydra syntax, booleans lower-case) of a published checkpoint's network."""
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in pairs]


def _weight_cells(weights: Mapping[str, Any], datasets: Mapping[str, Any], sname: str, seed: int,
                  common: list[str], runner_extra: list[str], only: Sequence[str] | None,
                  model_options: set[str]) -> list[Cell]:
    """The cells of ``suite.weights`` (see the module docstring): one evaluation per entry and dataset."""
    from pcbench.models.zoo_registry import PUBLISHED  # noqa: PLC0415 - imports torch

    cells: list[Cell] = []
    for ename, e in weights.items():
        where = f"suite.weights.{ename}"
        if not _NAME.match(str(ename)):
            raise SuiteError(f"{where}: weights entry names may use letters, digits, '_' and '.' only")
        name = e.get("name")
        if name not in PUBLISHED:
            raise SuiteError(f"{where}.name={name!r} is not a published checkpoint; `pcbench-weights list` shows "
                             f"{sorted(PUBLISHED)}")
        entry = PUBLISHED[str(name)]
        if entry.model_config not in model_options:
            raise SuiteError(f"{where}: {name} converts to model config {entry.model_config!r}, which is not in "
                             "conf/model/")
        if not entry.convertible and not e.get("checkpoint"):
            raise SuiteError(f"{where}.name={name}: pcbench has no converter from {entry.source} to "
                             f"{entry.model_config} yet; give {where}.checkpoint=<a pcbench checkpoint> or drop it")
        names = list(e.get("datasets") or [])
        if not names:
            raise SuiteError(f"{where}.datasets is empty; list the suite dataset keys it is evaluated on "
                             f"({sorted(datasets)})")
        spec = {"name": str(name), **{k: str(Path(str(e[k])).expanduser()) for k in ("file", "checkpoint")
                                      if e.get(k)}}
        entry_train = _strings(e.get("train"), f"{where}.train")
        for dkey in names:
            d, root = _entry_dataset(datasets, dkey, where)
            extra = [*common, *_strings(d.get("train"), f"suite.datasets.{dkey}.train"), *entry_train, *runner_extra]
            cell = Cell(name=f"{dkey}-{ename}-s{seed}", suite=sname, entry=str(ename), dataset=str(dkey),
                        dataset_label=str(d.get("label") or d.data), seed=seed, variant="",
                        recipe=f"published weights: {name}", fidelity="pcbench variant",
                        overrides=(f"model={entry.model_config}", *_model_overrides(entry.model_overrides),
                                   f"data={d.data}", *extra, f"seed={seed}", f"data.root={root}"),
                        data_root=root, probe={}, weights=spec)
            if not only or any(fnmatch.fnmatchcase(cell.name, p) for p in only):
                cells.append(cell)
    return cells
