"""Where ``conf/`` is, composing a run config from Python, and every config check made before the first step.

``conf/`` is found (in order) at ``$PCBENCH_CONF``, next to the ``pcbench`` package (a source checkout or an
editable install) or inside it (``pcbench/conf``, a packaged install), so ``pcbench-train`` works from
any working directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pcbench._confdir import conf_candidates, find_conf_dir

from .errors import ConfigError

__all__ = ["COMPILE_MODES", "PLACEMENT_KEYS", "ConfigError", "check_data", "check_run_config", "compile_settings",
           "compiled_tracing",
           "compose", "config_changes", "config_dir", "config_identity_sha256", "config_sha256", "group_options", "run_content"]

def config_dir() -> Path:
    """The ``conf/`` folder holding train.yaml; ConfigError listing the places looked at when absent."""
    found = find_conf_dir()
    if found is None:
        raise ConfigError(f"pcbench's conf/ (with train.yaml) was not found in {[str(c) for c in conf_candidates()]}; "
                          "set PCBENCH_CONF=<path of conf/> or reinstall pcbench from its source checkout")
    return found


def group_options(group: str) -> list[str]:
    """The option names of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), run_dir: str | os.PathLike | None = None,
            config_name: str = "train") -> DictConfig:
    """Compose ``conf/train.yaml`` with Hydra overrides outside ``@hydra.main`` (benchmark runner, tests).

    ``run_dir`` sets ``paths.run_dir`` (required by :func:`pcbench.train.fit` when called this way).
    Unknown keys or group options raise ConfigError with the valid choices.
    """
    from hydra import compose as hydra_compose  # noqa: PLC0415
    from hydra import initialize_config_dir  # noqa: PLC0415
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415

    overrides = list(overrides)
    if run_dir is not None:
        overrides.append(f"paths.run_dir={Path(run_dir).resolve()}")
    was = GlobalHydra.instance().is_initialized()
    if was:  # e.g. called inside a @hydra.main app: compose in a fresh context, then put it back
        saved = GlobalHydra.instance().hydra
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            try:
                return hydra_compose(config_name, overrides=overrides)
            except Exception as err:  # noqa: BLE001 - Hydra raises several types; all become one clear error
                raise ConfigError(explain_override_error(err, overrides)) from err
    finally:
        if was:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(saved)


def explain_override_error(err: Exception, overrides: Sequence[str]) -> str:
    """Hydra's message plus what to change: valid group options or the keys of the node that was mistyped."""
    msg = str(err).split("\nConfig search path")[0].strip()
    extra = ""
    text = str(err)
    if "Could not find" in text or "Available options" in text:
        extra = ""  # Hydra lists the options already
    elif "not in struct" in text or "Could not override" in text or "Key '" in text:
        for o in overrides:
            key = o.lstrip("+~").split("=", 1)[0]
            if "." not in key:
                if key in _groups() or key in ("seed", "resume", "task_name"):
                    continue
                extra = f"\nTop-level keys and groups: {sorted(set(_groups()) | {'seed', 'resume', 'task_name', 'eval'})}"
                continue
            parent, leaf = key.rsplit(".", 1)
            keys = _node_keys(parent)
            if keys is not None and leaf not in keys:
                extra = f"\n{parent!r} has no key {leaf!r}; its keys: {sorted(keys)}"
                break
    return f"{msg}{extra}"


def _groups() -> list[str]:
    return sorted(p.name for p in config_dir().iterdir() if p.is_dir())


def _node_keys(dotted: str) -> list[str] | None:
    """Keys of a node of the default composition (None when the node does not exist)."""
    try:
        cfg = compose_defaults()
    except Exception:  # noqa: BLE001
        return None
    node = OmegaConf.select(cfg, dotted, default=None)
    return list(node.keys()) if isinstance(node, DictConfig) else None


def compose_defaults() -> DictConfig:
    """train.yaml with its default choices (for error messages)."""
    from hydra import compose as hydra_compose  # noqa: PLC0415
    from hydra import initialize_config_dir  # noqa: PLC0415
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415

    if GlobalHydra.instance().is_initialized():
        return compose()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return hydra_compose("train")


# ----------------------------------------------------------------------------------------- run identity
#: Keys that say where and how a run executes, never what it computes: a resumed run may change them, and the
#: leaderboard's configuration identity ignores them. Dotted paths; a prefix covers its whole node.
PLACEMENT_KEYS: tuple[str, ...] = (
    "paths", "resume", "hydra", "fault", "logger", "task_name",
    "trainer.num_workers", "trainer.threads", "trainer.accelerator", "trainer.malloc", "trainer.tensorboard",
    "trainer.log_every_n_steps", "trainer.progress_bar", "trainer.checkpoint_every_n_steps",
    "trainer.compile_backend", "trainer.compile_mode", "trainer.compile_dynamic",  # how torch.compile runs it
    "eval.submission_dir", "eval.save_predictions",
)


def _plain(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=str))


def _drop(plain: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = plain
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def _sha(plain: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def config_sha256(cfg: DictConfig) -> str:
    """sha256 of the resolved config without where/how it runs (``paths``, ``resume``, ``hydra``)."""
    plain = _plain(cfg)
    for k in ("paths", "resume", "hydra"):
        plain.pop(k, None)
    return _sha(plain)


def run_content(cfg: DictConfig | dict[str, Any], *, drop_seed: bool = False) -> dict[str, Any]:
    """The resolved config without :data:`PLACEMENT_KEYS` (and without ``seed`` when ``drop_seed``)."""
    plain = _plain(cfg)
    for k in PLACEMENT_KEYS:
        _drop(plain, k)
    if drop_seed:
        plain.pop("seed", None)
    return plain


def config_identity_sha256(cfg: DictConfig | dict[str, Any]) -> str:
    """sha256 of what a run computes, seed excluded: one leaderboard row per identity, its seeds are its runs."""
    return _sha(run_content(cfg, drop_seed=True))


def config_changes(old: DictConfig | dict[str, Any], new: DictConfig | dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every difference outside :data:`PLACEMENT_KEYS`, sorted."""
    missing = object()
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, missing), b.get(k, missing), f"{prefix}.{k}" if prefix else str(k))
        elif a != b:
            out.append((prefix, None if a is missing else a, None if b is missing else b))

    walk(run_content(old), run_content(new), "")
    return out


# ----------------------------------------------------------------------------------------- run checks


def _prep_hint(cfg: DictConfig, root: str) -> str:
    cmd = str(cfg.data.get("prep", "pcbench-prep <dataset> raw=<official files> out={root}")).replace("{root}", root)
    return f"prepare it with:\n    {cmd}"


def check_data(cfg: DictConfig) -> dict[str, Any]:
    """Check ``data.root`` against the data config; returns its manifest. ConfigError naming the fix otherwise."""
    d = cfg.data
    if OmegaConf.is_missing(d, "root") or d.root in (None, ""):
        raise ConfigError(f"data.root is not set: give the folder prepared for data={d.name}, e.g. "
                          f"data.root=/data/pcbench/{d.name}; to make one, "
                          + _prep_hint(cfg, f"/data/pcbench/{d.name}"))
    root = Path(str(d.root)).expanduser()
    if root.is_file():
        raise ConfigError(f"data.root={str(root)!r} is a file, not a prepared folder; give the folder that holds "
                          "manifest.json (the out= folder of pcbench-prep), or " + _prep_hint(cfg, "<folder>"))
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r} does not exist; " + _prep_hint(cfg, str(root)))
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise ConfigError(f"data.root={str(root)!r} is not a prepared dataset (no manifest.json); "
                          + _prep_hint(cfg, str(root)))
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{mpath} is not valid JSON ({err}); re-run the preparation: "
                          + _prep_hint(cfg, str(root))) from err
    if isinstance(manifest, dict) and manifest.get("status", "complete") != "complete":
        from pcbench.data.format import PrepError, read_manifest  # noqa: PLC0415

        try:  # the dataset's own reader names the command that finishes the preparation
            read_manifest(root)
        except PrepError as err:
            raise ConfigError(f"data.root={str(root)!r} is not ready: {err}") from err
    for field, want in (d.get("expect") or {}).items():
        have = manifest
        for part in str(field).split("."):
            have = have.get(part) if isinstance(have, dict) else None
        allowed = list(want) if OmegaConf.is_list(want) else [want]
        if have not in allowed:
            raise ConfigError(f"data={d.name} expects a prepared folder with {field}={allowed[0] if len(allowed) == 1 else allowed}, "
                              f"but data.root={str(root)!r} has {field}={have!r}; choose the data config that matches "
                              f"the folder or point data.root at one prepared for data={d.name} ("
                              + _prep_hint(cfg, str(root)) + ")")
    keys = set(manifest.get("keys", []))
    feat_keys = d.dataset.get("feat_keys")
    if feat_keys is None and d.dataset.get("use_normals"):
        feat_keys = ["coord", "normal"]
    for k in feat_keys or []:
        if keys and k not in keys and k not in ("coord",):
            raise ConfigError(f"data.dataset.feat_keys includes {k!r} but data.root={str(root)!r} was prepared "
                              f"without it (stored keys: {sorted(keys)}); drop it from the feat keys "
                              f"(e.g. data.dataset.use_normals=false) or re-prepare with it")
    for role in ("train", "val", "test"):
        split = d.splits.get(role)
        if split is None:
            continue
        if split not in manifest.get("splits", {}):
            raise ConfigError(f"data.splits.{role}={split!r} is not a split of data.root={str(root)!r} (splits: "
                              f"{sorted(manifest.get('splits', {}))}); prepare it or set data.splits.{role}")
        if manifest["splits"][split].get("num_samples", 1) == 0:
            raise ConfigError(f"data.splits.{role}={split!r} of data.root={str(root)!r} holds no samples; prepare "
                              f"that split or set data.splits.{role} to another split")
    return manifest


def check_run_config(cfg: DictConfig) -> None:
    """Every check that needs no data: model/data task, trainer options; ConfigError naming the fix."""
    from pcbench.models import model_task  # noqa: PLC0415

    d = cfg.data
    task = model_task(cfg.model)
    if task != d.task:
        kind = {"cls": "classification", "seg": "segmentation"}
        name = cfg.get("hydra_choices", {}).get("model", "") if isinstance(cfg.get("hydra_choices"), dict) else ""
        raise ConfigError(f"the model ({cfg.model._target_}{' ' + name if name else ''}) is a {kind[task]} model "
                          f"but data={d.name} is a {kind[d.task]} dataset; choose a model=..._{d.task} config "
                          f"(options: {[o for o in group_options('model') if o.endswith('_' + d.task)]})")
    t = cfg.trainer
    if str(t.precision) not in ("fp32", "bf16", "fp16", "auto"):
        raise ConfigError(f"trainer.precision={t.precision!r} is unknown; use fp32, bf16 or fp16")
    if str(t.accelerator) not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"trainer.accelerator={t.accelerator!r} is unknown; use cpu, cuda or auto")
    if str(t.strategy) not in ("single", "ddp"):
        raise ConfigError(f"trainer.strategy={t.strategy!r} is unknown; use single, or ddp (trainer=ddp under torchrun)")
    if str(t.malloc) not in ("tuned", "default"):
        raise ConfigError(f"trainer.malloc={t.malloc!r} is unknown; use tuned or default")
    for key in ("max_epochs", "batch_size", "device_batch_size"):
        if t.get(key) is not None and int(t[key]) < 1:
            raise ConfigError(f"trainer.{key}={t[key]} must be >= 1")
    if t.max_steps is not None and int(t.max_steps) < 1:
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be >= 1 (or null for no step cap)")
    if int(t.num_workers) < 0:
        raise ConfigError(f"trainer.num_workers={t.num_workers} must be >= 0")
    if int(t.checkpoint_every_n_steps) < 0:
        raise ConfigError(f"trainer.checkpoint_every_n_steps={t.checkpoint_every_n_steps} must be >= 0 (0 = epoch ends)")
    compile_settings(t)
    if cfg.eval.metric not in ("auto", "oa", "macc", "miou"):
        raise ConfigError(f"eval.metric={cfg.eval.metric!r} is unknown; use auto, oa, macc or miou")


#: torch.compile's modes (torch/_inductor/list_mode_options); "default" is passed as mode=None.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_settings(t: DictConfig) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments from ``trainer.compile{,_backend,_mode,_dynamic}`` (None when off);
    ConfigError naming the fix for an unknown backend or mode or a dynamic that is not null / true / false."""
    if not t.get("compile"):
        return None
    backend = str(t.get("compile_backend") or "inductor")
    mode = str(t.get("compile_mode") or "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile_mode={mode!r} is unknown; use one of {list(COMPILE_MODES)}")
    dynamic = t.get("compile_dynamic")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise ConfigError(f"trainer.compile_dynamic={dynamic!r} must be null (torch's automatic choice), true "
                          "(symbolic sizes) or false (a graph per input shape)")
    import torch._dynamo  # noqa: PLC0415 - only runs that compile pay for importing the compiler stack

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"trainer.compile_backend={backend!r} is unknown; use one of {known} (inductor generates "
                          "kernels; eager / aot_eager only trace, for debugging)")
    return {"backend": backend, "mode": None if mode == "default" else mode, "dynamic": dynamic}


def compiled_tracing() -> contextlib.AbstractContextManager:
    """Dynamo settings for calls of a ``torch.compile``d model: Python ints stay constants in the graphs.

    The models pass layer constants (samples per level, kernel sizes) through functions that also see other
    values, and dynamo would otherwise turn such an int into a symbol on the second value, where torch 2.13's
    inductor generated a wrapper naming an undefined size (``NameError: name 's47' is not defined``,
    pointnet2_ssg_cls on the CPU code path). Tensor sizes follow ``trainer.compile_dynamic``.
    """
    import torch._dynamo  # noqa: PLC0415 - only compiled runs import the compiler stack

    return torch._dynamo.config.patch(specialize_int=True)


# ----------------------------------------------------------------------------------- paper recipe data
def _manifest_field(manifest: dict[str, Any], field: str) -> Any:
    have: Any = manifest
    for part in field.split("."):
        have = have.get(part) if isinstance(have, dict) else None
    return have


def check_recipe_data(cfg: DictConfig, manifest: dict[str, Any]) -> list[str]:
    """Mismatches between the prepared data a paper recipe needs (``recipe.data``) and ``manifest``.

    ``recipe.data`` maps a manifest field (dotted, e.g. ``options.sampling``) to the value, or list of values,
    the recipe's source used. Each mismatch is one sentence naming the field, both values and the fix; an
    empty list means the data is the recipe's (or the run is not a recipe). A run with mismatches is a
    "pcbench variant", not a "reference" run: the trainer records these sentences as the reason.
    """
    recipe = cfg.get("recipe")
    if not recipe or not recipe.get("data"):
        return []
    root = cfg.data.get("root") if not OmegaConf.is_missing(cfg.data, "root") else None
    out = []
    for field, want in recipe.data.items():
        allowed = list(OmegaConf.to_container(want)) if OmegaConf.is_list(want) else [want]
        have = _manifest_field(manifest, str(field))
        if have not in allowed:
            shown = allowed[0] if len(allowed) == 1 else allowed
            key = str(field).removeprefix("options.")
            fix = (f"re-prepare with `{key}={str(shown).lower() if isinstance(shown, bool) else shown}`"
                   if str(field).startswith("options.") else f"prepare from the raw files that give {field}={shown}")
            out.append(f"recipe {recipe.name} needs data prepared with {field}={shown!r}, but data.root={root} has "
                       f"{field}={have!r}; {fix} (see the Prepare line of conf/experiment/{recipe.name}.yaml)")
    return out


# ----------------------------------------------------------------------------------------- preflight
def _split_samples(manifest: dict[str, Any], split: str | None) -> int | None:
    """Samples of a prepared split (None when the manifest has no such split)."""
    info = manifest.get("splits", {}).get(str(split)) if split is not None else None
    if info is None:
        return None
    if info.get("num_samples") is not None:
        return int(info["num_samples"])
    return sum(int(f.get("num_samples", 0)) for f in info.get("files", []))


def preflight(cfg: DictConfig, manifest: dict[str, Any], cuda_available: bool | None = None) -> list[str]:
    """Every reason the run of ``cfg`` on the prepared data of ``manifest`` would stop, each with the override
    that avoids it (``-> key=value ...``), so a recipe tried on a few samples or on a CPU fails once, listing
    them all, instead of once per problem. Checks: train / val / test splits missing or empty (including an
    empty val hold-out), fp16 or CUDA asked for without a CUDA device, a batch larger than the training data.
    ``cuda_available`` defaults to ``torch.cuda.is_available()``.
    """
    import torch  # noqa: PLC0415

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    d, t = cfg.data, cfg.trainer
    problems: list[str] = []
    sizes = {name: _split_samples(manifest, name) for name in manifest.get("splits", {})}
    nonempty = sorted(name for name, n in sizes.items() if n)
    other = nonempty[0] if nonempty else "train"
    root = d.get("root") if not OmegaConf.is_missing(d, "root") else None
    for role in ("train", "val", "test"):
        split = d.splits.get(role)
        if split is None:
            continue
        n = sizes.get(str(split))
        if not n:
            what = "is not a split of" if n is None else "holds no samples in"
            problems.append(f"data.splits.{role}={split} {what} data.root={root} (splits with samples: {nonempty}) "
                            f"-> data.splits.{role}={other if role != 'train' else '<one of them>'}")
    n_train = sizes.get(str(d.splits.train)) or 0
    if d.splits.get("val") is None and n_train:
        fraction = float(d.get("val_fraction") or 0)
        held = min(max(1, round(fraction * n_train)), n_train - 1) if 0 < fraction < 1 else 0
        if held < 1:
            problems.append(f"the validation hold-out (data.val_fraction={fraction} of {n_train} training samples) "
                            f"is empty -> data.splits.val={d.splits.train} (validate on the training samples)")
        n_train -= held
    n_train *= int(d.get("dataset", {}).get("loop", 1) or 1)
    batch = int(t.batch_size)
    if n_train and batch > n_train:
        problems.append(f"trainer.batch_size={t.batch_size} exceeds the {n_train} training samples of data.root={root} "
                        f"-> trainer.batch_size={n_train}")
        batch = n_train
    device_batch = t.get("device_batch_size")
    if "batch_size" in str(OmegaConf.to_container(t, resolve=False).get("device_batch_size")):
        device_batch = batch  # ${.batch_size}: follows the (lowered) global batch
    if device_batch is not None and int(device_batch) >= 1 and batch % int(device_batch):
        # the global batch must be micro-batches of the per-device batch (pcbench.train.data.batch_layout)
        fit = max(k for k in range(1, int(device_batch) + 1) if batch % k == 0)
        problems.append(f"trainer.device_batch_size={device_batch} does not divide the global batch of {batch} "
                        f"-> trainer.device_batch_size={fit}")
    acc = str(t.accelerator)
    if acc == "cuda" and not cuda_available:
        problems.append("trainer.accelerator=cuda but torch sees no CUDA device -> trainer=cpu")
    on_cpu = acc == "cpu" or not cuda_available
    if str(t.precision) == "fp16" and on_cpu:
        problems.append("trainer.precision=fp16 needs a CUDA device (it relies on a grad scaler) -> "
                        "trainer.precision=bf16 (or fp32)")
    return problems
