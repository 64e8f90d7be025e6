"""The one training loop: ``fit(cfg) -> metrics`` and ``evaluate(cfg, checkpoint) -> metrics``.

Protocol: checkpoints are selected on the validation split only; the test split is evaluated once, on
the selected checkpoint (``best.pt``); TTA / voting is reported separately as ``test_vote``;
``eval.report_test_selected`` adds the optimistic best-test-over-epochs figure as ``test_selected``.
Everything a run writes lives in ``paths.run_dir`` (rank 0 only): ``train.log``, ``metrics.csv``,
``tensorboard/``, ``checkpoints/{last,best}.pt``, ``metrics.json`` (exactly what :func:`fit` returns) and,
with ``eval.save_predictions``, ``predictions_test.npz``.

Both functions can be called repeatedly in one process: they add and remove their own log handlers, restore
torch's thread count, never change the working directory, and tear down a process group they created.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import pcbench
from pcbench import _malloc
from pcbench.io import write_json, write_text
from pcbench.models import build_model

from .checkpoint import FORMAT, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from .config import check_run_config, config_sha256
from .data import DataBundle, build_data, eval_loader, eval_transform, mix_pairs, split_dataset, train_loader
from .distributed import (
    all_reduce_sum,
    broadcast_object,
    convert_sync_batchnorm,
    dist_info,
    init_distributed,
    maybe_no_sync,
)
from .errors import ConfigError
from .evaluate import EvalResult, autocast_context, evaluate_loaders, gather_predictions, write_predictions
from .evaluate import write_submission as _write_submission
from .losses import lovasz_softmax
from .optim import bn_momentum_at, build_ema, param_groups, set_bn_momentum

__all__ = ["Run", "build_run", "evaluate", "evaluate_split", "fit", "resolve_device", "resolve_precision"]

LOG = logging.getLogger("pcbench.train")


# ----------------------------------------------------------------------------------------- environment
def resolve_device(cfg: DictConfig) -> torch.device:
    """The torch device of this rank from ``trainer.accelerator`` (cuda:LOCAL_RANK under DDP)."""
    acc = str(cfg.trainer.accelerator)
    if acc == "auto":
        acc = "cuda" if torch.cuda.is_available() else "cpu"
    if acc == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=cuda but torch sees no CUDA device; use trainer=cpu "
                              "(or install a CUDA build of torch)")
        return torch.device("cuda", dist_info().local_rank)
    return torch.device("cpu")


def resolve_precision(cfg: DictConfig, device: torch.device) -> str:
    """fp32 / bf16 / fp16 from ``trainer.precision`` ("auto": bf16 on CUDA, fp32 on CPU)."""
    p = str(cfg.trainer.precision)
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs a CUDA device (it relies on a grad scaler); use "
                          "trainer.precision=bf16 on the CPU")
    return p


def _git_commit() -> str | None:
    root = Path(pcbench.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"cpu ({cpu})"


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@contextlib.contextmanager
def _run_logging(run_dir: Path | None, main: bool) -> Iterator[None]:
    """Log records of pcbench.train to stdout and <run_dir>/train.log (rank 0); removed afterwards."""
    handlers: list[logging.Handler] = []
    old_level, old_prop = LOG.level, LOG.propagate
    if main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(fmt)
        handlers.append(out)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
            fh.setFormatter(fmt)
            handlers.append(fh)
    for h in handlers:
        LOG.addHandler(h)
    LOG.setLevel(logging.INFO if main else logging.WARNING)
    LOG.propagate = False
    try:
        yield
    finally:
        for h in handlers:
            LOG.removeHandler(h)
            h.close()
        LOG.setLevel(old_level)
        LOG.propagate = old_prop


@contextlib.contextmanager
def _environment(cfg: DictConfig) -> Iterator[dict[str, Any]]:
    """Process group (if ddp), threads, allocator and determinism for one call; restored afterwards."""
    created = False
    if str(cfg.trainer.strategy) == "ddp":
        created = init_distributed()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    caller_rng = rng_state()  # the run seeds the global generators; the caller gets its own back
    try:
        if cfg.trainer.threads:
            torch.set_num_threads(int(cfg.trainer.threads))
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        device = resolve_device(cfg)
        if device.type == "cpu" and str(cfg.trainer.malloc) == "tuned" and not _malloc.tuned_env_active():
            _malloc.apply_mallopt()
        yield {"device": device}
    finally:
        restore_rng_state(caller_rng)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        if created:
            import torch.distributed as dist  # noqa: PLC0415

            dist.destroy_process_group()


def _seed_everything(seed: int) -> None:
    import random  # noqa: PLC0415

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may use the legacy global RNG
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- building
@dataclass
class Run:
    """What a config builds: the data, the model (bare, on the device) and where it runs."""

    data: DataBundle
    model: nn.Module
    device: torch.device
    precision: str
    params: int


def build_run(cfg: DictConfig, device: torch.device | None = None) -> Run:
    """Check ``cfg``, build its datasets and its model (``in_channels`` / ``num_classes`` from the data)."""
    check_run_config(cfg)
    device = device or resolve_device(cfg)
    bundle = build_data(cfg)
    model = build_model(cfg.model, bundle.in_channels, bundle.num_classes).to(device)
    params = sum(p.numel() for p in model.parameters())
    return Run(bundle, model, device, resolve_precision(cfg, device), params)


def _loaders_for(cfg: DictConfig, run: Run, split: str, limit: int | None = None,
                 tta: bool = False) -> list[torch.utils.data.DataLoader]:
    """One loader (plain evaluation) or one per TTA pass over ``split`` ("val" or "test")."""
    import hydra  # noqa: PLC0415

    info = dist_info()
    ds = getattr(run.data, split)
    if not tta:
        return [eval_loader(ds, cfg, info.rank, info.world_size, limit)]
    loaders = []
    for node in cfg.tta.passes:
        passed = _with_transform(ds, eval_transform(cfg, hydra.utils.instantiate(node)))
        loaders.append(eval_loader(passed, cfg, info.rank, info.world_size, limit))
    return loaders


def _with_transform(ds: Any, transform: Any) -> Any:
    """A shallow copy of an evaluation dataset (or Subset of one) with another transform."""
    import copy  # noqa: PLC0415

    from torch.utils.data import Subset  # noqa: PLC0415

    if isinstance(ds, Subset):
        return Subset(_with_transform(ds.dataset, transform), ds.indices)
    out = copy.copy(ds)
    out.transform = transform
    return out


def evaluate_split(cfg: DictConfig, run: Run, split: str = "test", precision: str | None = None,
                   model: nn.Module | None = None, tta: bool = False, keep_predictions: bool = False,
                   limit: int | None = None) -> EvalResult:
    """Evaluate ``model`` (default ``run.model``) on ``split`` under autocast ``precision`` (fp32/bf16/fp16).

    The benchmark runner's accuracy-delta probe calls this with the trained model and another precision.
    """
    loaders = _loaders_for(cfg, run, split, limit, tta)
    return evaluate_loaders(model or run.model, loaders, run.data.task, run.data.num_classes,
                            run.data.ignore_index, run.device, precision or run.precision,
                            int(cfg.eval.max_points), keep_predictions, scores=str(cfg.eval.get("scores", "logits")))


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class _Progress:
    epoch: int = 0              # current epoch (0-based)
    batch: int = 0              # micro-batches consumed in the current epoch
    step: int = 0               # optimizer steps so far (skipped ones included)
    skipped: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    test_selected: dict[str, Any] | None = None
    train_samples: int = 0
    train_seconds: float = 0.0
    acc: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "n": 0, "samples": 0})

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _selection_key(cfg: DictConfig, task: str) -> str:
    m = str(cfg.eval.metric)
    return ("oa" if task == "cls" else "miou") if m == "auto" else m


def _class_weights(cfg: DictConfig, bundle: DataBundle, device: torch.device) -> Tensor | None:
    cw = cfg.trainer.class_weights
    if cw is None:
        return None
    if isinstance(cw, str):
        if cw != "inverse_log_frequency":
            raise ConfigError(f"trainer.class_weights={cw!r} is unknown; use null, inverse_log_frequency or a list "
                              f"of {bundle.num_classes} numbers")
        base = bundle.train.dataset if isinstance(bundle.train, torch.utils.data.Subset) else bundle.train
        if bundle.task == "cls":
            idx = bundle.train.indices if isinstance(bundle.train, torch.utils.data.Subset) else slice(None)
            counts = np.bincount(base.labels()[idx], minlength=bundle.num_classes).astype(np.float64)
        else:
            counts = base.label_counts().astype(np.float64)
        freq = counts / max(counts.sum(), 1.0)
        w = 1.0 / np.log(1.2 + freq)  # ENet-style weights: rare classes up, no infinite weight for absent ones
        return torch.tensor(w, dtype=torch.float32, device=device)
    w = [float(v) for v in cw]
    if len(w) != bundle.num_classes:
        raise ConfigError(f"trainer.class_weights has {len(w)} entries but the dataset has {bundle.num_classes} "
                          "classes; give one weight per class")
    return torch.tensor(w, dtype=torch.float32, device=device)


def _loss(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, smoothing: float,
          world_size: int) -> tuple[Tensor, Tensor]:
    """Cross-entropy summed over this rank, divided by the global (weighted) target count, times W.

    DDP averages gradients over the W ranks, so this equals the mean loss of one process over the global batch.
    Returns (loss for backward, global mean loss for logging).
    """
    total = nn.functional.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index,
                                        reduction="sum", label_smoothing=smoothing)
    valid = target != ignore_index
    denom_local = (weight[target[valid]].sum() if weight is not None else valid.sum()).to(torch.float64)
    denom = all_reduce_sum(denom_local.detach()).clamp_min(1)
    loss = total / denom.to(total.dtype) * world_size
    return loss, loss.detach() / world_size


class _Reporter:
    """Progress: a tqdm bar on terminals, periodic log lines elsewhere; TensorBoard scalars; metrics.csv."""

    def __init__(self, cfg: DictConfig, run_dir: Path, main: bool, total_steps: int) -> None:
        self.main, self.run_dir, self.total_steps = main, run_dir, total_steps
        mode = cfg.logger.progress_bar
        self.bar_enabled = main and (sys.stdout.isatty() if str(mode) == "auto" else bool(mode))
        self.every = max(1, int(cfg.logger.log_every_n_steps))
        self.bar = None
        self.tb = None
        if main and cfg.logger.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.t0 = time.perf_counter()

    def start_epoch(self, epoch: int, batches: int, done: int) -> None:
        if self.bar_enabled:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=batches, initial=done, desc=f"epoch {epoch}", dynamic_ncols=True, file=sys.stdout,
                            leave=False)

    def step(self, step: int, loss: float, lr: float, samples_per_s: float, epoch: int) -> None:
        if not self.main:
            return
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/samples_per_s", samples_per_s, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}")
        elif step % self.every == 0 or step == self.total_steps:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(step, 1) * max(self.total_steps - step, 0)
            LOG.info(f"epoch {epoch} step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3e} "
                     f"{samples_per_s:.1f} samples/s eta {eta:.0f}s")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def scalars(self, prefix: str, metrics: dict[str, Any], epoch: int) -> None:
        if self.tb is None:
            return
        for k in ("oa", "macc", "miou", "loss"):
            if metrics.get(k) is not None:
                self.tb.add_scalar(f"{prefix}/{k}", metrics[k], epoch)

    def write_csv(self, history: list[dict[str, Any]]) -> None:
        if not self.main:
            return
        buf = io.StringIO()
        cols = ["epoch", "step", "train_loss", "lr", "val_oa", "val_macc", "val_miou", "test_oa", "test_miou",
                "train_samples_per_s", "skipped_steps", "wall_s"]
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow(row)
        write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def close(self) -> None:
        self.end_epoch()
        if self.tb is not None:
            self.tb.close()


def _bare(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP- and/or torch.compile-wrapped model."""
    m = model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(m, "_orig_mod", m)


def _dataset_of(ds: Any) -> Any:
    return ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds


def _resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def _metrics_view(m: dict[str, Any], names: list[str]) -> dict[str, Any]:
    out = dict(m)
    out["class_names"] = names
    return out


def fit(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate the configured model; returns exactly what ``<run dir>/metrics.json`` holds."""
    t_start = time.perf_counter()
    check_run_config(cfg)
    with _environment(cfg) as env:
        info = dist_info()
        run_dir = Path(str(broadcast_object(str(Path(str(cfg.paths.run_dir)).resolve()))))
        with _run_logging(run_dir if info.is_main else None, info.is_main):
            return _fit(cfg, env["device"], run_dir, t_start)


def _fit(cfg: DictConfig, device: torch.device, run_dir: Path, t_start: float) -> dict[str, Any]:
    info = dist_info()
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    resume_state = None
    if cfg.resume:
        if last_path.is_file():
            resume_state = load_checkpoint(last_path)
        else:
            LOG.warning(f"resume=true but {last_path} does not exist yet: starting from scratch")
    elif last_path.is_file():
        raise ConfigError(f"{run_dir} already holds a run (checkpoints/last.pt); continue it with resume=true "
                          f"or choose another run directory (hydra.run.dir=... / paths.run_dir=...)")
    _seed_everything(int(cfg.seed))
    run = build_run(cfg, device)
    bundle, model, precision = run.data, run.model, run.precision
    if info.is_main:
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        if not (run_dir / ".hydra" / "config.yaml").is_file():  # composed outside @hydra.main
            write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        write_text(run_dir / ".hydra" / "resolved.yaml", _resolved_yaml(cfg))
    LOG.info(f"run dir {run_dir}")
    LOG.info(f"data {cfg.data.name} ({bundle.task}, {bundle.num_classes} classes, {bundle.in_channels} input "
             f"channels): train {len(bundle.train)}, val {len(bundle.val)}, test {len(bundle.test)}")
    LOG.info(f"model {cfg.model._target_}: {run.params:,} parameters on {device} ({precision}); "
             f"allocator {_malloc.malloc_setting()}")
    t = cfg.trainer
    if info.world_size > 1 and t.sync_batchnorm:
        convert_sync_batchnorm(model)
    ema = build_ema(model, float(t.ema_decay)) if t.ema_decay else None
    fwd_model: nn.Module = model
    if info.world_size > 1:
        fwd_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        fwd_model = torch.compile(fwd_model)
    groups = cfg.get("optim_groups")
    groups = OmegaConf.to_container(groups, resolve=True) if groups else None
    optimizer = _instantiate(cfg.optim)(param_groups(model, groups))
    bn_sched = OmegaConf.to_container(t.bn_momentum, resolve=True) if t.get("bn_momentum") else None
    mix_prob = float(t.get("mix_prob") or 0.0)
    lovasz_weight = float(t.get("lovasz_weight") or 0.0)
    if lovasz_weight and bundle.task != "seg":
        raise ConfigError("trainer.lovasz_weight is a segmentation loss; set it to 0 for classification")
    loader, sampler = train_loader(bundle.train, cfg, info.rank, info.world_size)
    accum = int(t.accumulate_grad_batches)
    steps_per_epoch = sampler.num_batches() // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"one epoch has {sampler.num_batches()} batches, fewer than "
                          f"trainer.accumulate_grad_batches={accum}; lower it or trainer.batch_size")
    sampler.limit = steps_per_epoch * accum  # leftover micro-batches would never complete a step
    total_steps = int(t.max_epochs) * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, int(t.max_steps))
    max_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = _instantiate(cfg.sched)(optimizer, total_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    weight = _class_weights(cfg, bundle, device)
    key = _selection_key(cfg, bundle.task)
    prog = _Progress()
    if resume_state is not None:
        if resume_state.get("format") != FORMAT:
            raise ConfigError(f"{last_path} has checkpoint format {resume_state.get('format')}, this pcbench writes "
                              f"{FORMAT}; start a new run directory")
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        if ema is not None and resume_state.get("ema") is not None:
            ema.load_state_dict(resume_state["ema"])
        prog = _Progress(**resume_state["progress"])
        restore_rng_state(resume_state["rng"])
        LOG.info(f"resumed from {last_path}: epoch {prog.epoch}, batch {prog.batch}, step {prog.step}")
    reporter = _Reporter(cfg, run_dir, info.is_main, total_steps)
    cfg_yaml = _resolved_yaml(cfg)

    def checkpoint(path: Path) -> None:
        state = {"format": FORMAT, "model": _bare(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None, "rng": rng_state(),
                 "progress": prog.state(), "config": cfg_yaml}
        if info.is_main:
            save_checkpoint(state, path)

    def eval_model() -> nn.Module:
        return ema.module if ema is not None else model

    def save_best() -> None:
        if info.is_main:
            save_checkpoint({"format": FORMAT, "model": _bare(eval_model()).state_dict(), "config": cfg_yaml,
                             "epoch": prog.epoch, "metric": key, "value": prog.best}, best_path)

    train_ds = _dataset_of(bundle.train)
    model.train()
    try:
        while prog.epoch < max_epochs and prog.step < total_steps:
            epoch = prog.epoch
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch, prog.batch)
            loader.generator.manual_seed(int(cfg.seed) * 1000003 + epoch)
            reporter.start_epoch(epoch, sampler.num_batches(), prog.batch)
            t_epoch = time.perf_counter()
            window_bad = False
            for batch in loader:
                micro = prog.batch % accum
                batch = batch.to(device, non_blocking=True)
                if mix_prob and np.random.default_rng([int(cfg.seed), epoch, prog.batch, info.rank]).random() < mix_prob:
                    batch = mix_pairs(batch)  # Mix3D, drawn per batch from (seed, epoch, batch): exact on resume
                if bn_sched is not None and micro == 0:
                    set_bn_momentum(model, bn_momentum_at(prog.step, **bn_sched))
                with maybe_no_sync(fwd_model, micro < accum - 1), autocast_context(device, precision):
                    logits = fwd_model(batch)
                    loss, loss_log = _loss(logits, batch.label, weight, bundle.ignore_index,
                                           float(t.label_smoothing), info.world_size)
                    if lovasz_weight:  # per rank, averaged over ranks by DDP (as Pointcept)
                        lv = lovasz_weight * lovasz_softmax(logits, batch.label, bundle.ignore_index)
                        loss, loss_log = loss + lv, loss_log + lv.detach() / info.world_size
                    finite = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1)) == 0
                    if bool(finite):
                        scaler.scale(loss / accum).backward()
                    else:
                        window_bad = True
                prog.batch += 1
                n_samples = batch.num_clouds * info.world_size
                prog.train_samples += n_samples
                prog.acc["samples"] += n_samples
                if bool(finite):
                    prog.acc["loss"] += float(loss_log)
                    prog.acc["n"] += 1
                reporter.advance()
                if micro < accum - 1:
                    continue
                # ------------------------------------------------------------ optimizer step
                scaler.unscale_(optimizer)
                clip = float(t.gradient_clip_val) if t.gradient_clip_val else float("inf")
                norm = nn.utils.clip_grad_norm_(model.parameters(), clip) if not window_bad else None
                if window_bad or norm is None or not bool(torch.isfinite(norm)):
                    prog.skipped += 1
                    LOG.warning(f"step {prog.step + 1}: non-finite {'loss' if window_bad else 'gradient norm'}; "
                                f"the step is skipped ({prog.skipped} skipped so far)")
                    if prog.skipped > int(t.max_skipped_steps):
                        raise FloatingPointError(
                            f"{prog.skipped} steps had a non-finite loss or gradient (trainer.max_skipped_steps="
                            f"{t.max_skipped_steps}); lower optim.lr, set trainer.gradient_clip_val or use "
                            "trainer.precision=fp32")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update_parameters(model)
                scheduler.step()
                window_bad = False
                prog.step += 1
                elapsed = time.perf_counter() - t_epoch
                lr = optimizer.param_groups[0]["lr"]
                last_loss = prog.acc["loss"] / max(prog.acc["n"], 1)
                reporter.step(prog.step, last_loss, lr, prog.acc["samples"] / max(elapsed, 1e-9), epoch)
                every = int(t.checkpoint_every_n_steps)
                if every and prog.step % every == 0 and prog.batch < sampler.num_batches():
                    prog.train_seconds += time.perf_counter() - t_epoch
                    t_epoch = time.perf_counter()
                    checkpoint(last_path)
                kill = cfg.fault.sigkill_after_step
                if kill is not None and prog.step == int(kill) and info.is_main:
                    import signal  # noqa: PLC0415

                    os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the exact-resume test
                if prog.step >= total_steps:
                    break
            reporter.end_epoch()
            prog.train_seconds += time.perf_counter() - t_epoch
            # ---------------------------------------------------------------- end of epoch
            row: dict[str, Any] = {"epoch": epoch, "step": prog.step,
                                   "train_loss": prog.acc["loss"] / max(prog.acc["n"], 1),
                                   "lr": optimizer.param_groups[0]["lr"],
                                   "train_samples_per_s": prog.train_samples / max(prog.train_seconds, 1e-9),
                                   "skipped_steps": prog.skipped}
            last_epoch = epoch + 1 >= max_epochs or prog.step >= total_steps
            if last_epoch or (epoch + 1) % int(cfg.eval.every_n_epochs) == 0:
                val = evaluate_split(cfg, run, "val", model=eval_model(), limit=t.limit_eval_batches)
                reporter.scalars("val", val.metrics, epoch)
                row.update({f"val_{k}": val.metrics[k] for k in ("oa", "macc", "miou")})
                score = val.metrics.get(key)
                if score is not None and (prog.best is None or score > prog.best):
                    prog.best, prog.best_epoch = float(score), epoch
                    save_best()
                LOG.info(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val {key} "
                         f"{_fmt(score)} (best {_fmt(prog.best)} at epoch {prog.best_epoch})")
                if cfg.eval.report_test_selected:
                    te = evaluate_split(cfg, run, "test", model=eval_model(), limit=t.limit_eval_batches)
                    reporter.scalars("test_selected", te.metrics, epoch)
                    row.update({"test_oa": te.metrics["oa"], "test_miou": te.metrics["miou"]})
                    ts = te.metrics.get(key)
                    if ts is not None and (prog.test_selected is None or ts > prog.test_selected["value"]):
                        prog.test_selected = {"value": float(ts), "epoch": epoch, "metrics": te.metrics}
            if prog.best_epoch is None and last_epoch:  # nothing scored (e.g. empty val): keep the last weights
                prog.best_epoch = epoch
                save_best()
            row["wall_s"] = time.perf_counter() - t_start
            prog.history.append(row)
            reporter.write_csv(prog.history)
            prog.epoch, prog.batch = epoch + 1, 0
            prog.acc = {"loss": 0.0, "n": 0, "samples": 0}
            checkpoint(last_path)
    finally:
        reporter.close()
    # -------------------------------------------------------------------- test once, on the selected weights
    best = load_checkpoint(best_path) if info.is_main or best_path.is_file() else None
    best_state = broadcast_object(best["model"] if best is not None else None)
    test_model = build_model(cfg.model, bundle.in_channels, bundle.num_classes).to(device)
    test_model.load_state_dict(best_state)
    run_test = Run(bundle, test_model, device, precision, run.params)
    keep = bool(cfg.eval.save_predictions)
    test = evaluate_split(cfg, run_test, "test", keep_predictions=keep)
    val_best = evaluate_split(cfg, run_test, "val")
    result: dict[str, Any] = {
        "val": _metrics_view(val_best.metrics, bundle.class_names),
        "test": _metrics_view(test.metrics, bundle.class_names),
    }
    if len(cfg.tta.passes):
        vote = evaluate_split(cfg, run_test, "test", tta=True)
        result["test_vote"] = {**_metrics_view(vote.metrics, bundle.class_names), "passes": len(cfg.tta.passes)}
    if cfg.eval.report_test_selected and prog.test_selected is not None:
        result["test_selected"] = {**_metrics_view(prog.test_selected["metrics"], bundle.class_names),
                                   "epoch": prog.test_selected["epoch"],
                                   "note": "best test score over epochs: optimistic, not a valid estimate"}
    if keep:
        gathered = gather_predictions(test)
        if info.is_main:
            write_predictions(run_dir / "predictions_test.npz", gathered)
    result.update({
        "task": bundle.task,
        "dataset": str(cfg.data.name),
        "model": str(cfg.model._target_),
        "best_epoch": prog.best_epoch,
        "selected_on": "val",
        "selection_metric": key,
        "splits": {"train": str(cfg.data.splits.train), "val": bundle.info["val"]["source"],
                   "test": str(cfg.data.splits.test)},
        "val_split": bundle.info["val"],
        "epochs": prog.epoch,
        "steps": prog.step,
        "skipped_steps": prog.skipped,
        "train_samples_per_s": prog.train_samples / max(prog.train_seconds, 1e-9),
        "eval_samples_per_s": test.samples * info.world_size / max(test.seconds, 1e-9),
        "peak_memory_mib": _peak_memory_mib(device),
        "params": run.params,
        "wall_s": time.perf_counter() - t_start,
        "seed": int(cfg.seed),
        "config_sha256": config_sha256(cfg),
        "dataset_manifest_sha256": bundle.manifest_sha256,
        "pcbench_version": pcbench.__version__,
        "git_commit": _git_commit(),
        "torch_version": torch.__version__,
        "device": _device_name(device),
        "precision": precision,
        "world_size": info.world_size,
        "threads": torch.get_num_threads(),
        "malloc": _malloc.malloc_setting() if device.type == "cpu" else "n/a (cuda)",
        "num_classes": bundle.num_classes,
        "in_channels": bundle.in_channels,
        "ignore_index": bundle.ignore_index,
        **_recipe_fields(cfg),
    })
    if info.is_main:
        write_json(run_dir / "metrics.json", result)
    LOG.info(f"test {key} {_fmt(test.metrics.get(key))} on the checkpoint of epoch {prog.best_epoch} "
             f"(val {key} {_fmt(val_best.metrics.get(key))}); wrote {run_dir / 'metrics.json'}")
    return result


def _recipe_fields(cfg: DictConfig) -> dict[str, Any]:
    """``recipe`` / ``fidelity`` / ``recipe_source`` of a paper recipe (conf/experiment/) for metrics.json."""
    r = cfg.get("recipe")
    if not r:
        return {}
    return {"recipe": str(r.name), "fidelity": str(r.fidelity), "recipe_source": str(r.source)}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _instantiate(node: DictConfig) -> Any:
    import hydra  # noqa: PLC0415

    return hydra.utils.instantiate(node)


# ------------------------------------------------------------------------------------------- evaluate
def evaluate(cfg: DictConfig, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``eval.split`` of ``cfg``; writes ``eval_<split>.json`` in ``paths.run_dir``.

    With ``eval.save_predictions`` also ``predictions_<split>.npz``; with ``eval.submission_dir`` (or a split
    without labels, e.g. ScanNet test) the ScanNet benchmark files. TTA passes give ``<split>_vote``.
    """
    check_run_config(cfg)
    with _environment(cfg) as env:
        info = dist_info()
        run_dir = Path(str(cfg.paths.run_dir)).resolve()
        with _run_logging(None, info.is_main):
            device = env["device"]
            state = load_checkpoint(checkpoint, map_location="cpu")
            run = build_run(cfg, device)
            run.model.load_state_dict(state["model"])
            split = str(cfg.eval.split)
            splits = run.data.info.get("manifest_splits", [])
            if split not in splits:
                raise ConfigError(f"eval.split={split!r} is not a split of data.root={cfg.data.root} (splits: "
                                  f"{splits}); choose one of them")
            role = "test"
            run.data.test = split_dataset(cfg, split)
            precision = str(cfg.eval.autocast) if cfg.eval.autocast else run.precision
            submission = cfg.eval.submission_dir
            keep = bool(cfg.eval.save_predictions) or submission is not None
            res = evaluate_split(cfg, run, role, precision=precision, keep_predictions=keep)
            out: dict[str, Any] = {split: _metrics_view(res.metrics, run.data.class_names),
                                   "checkpoint": str(Path(checkpoint).resolve()),
                                   "eval_samples_per_s": res.samples * info.world_size / max(res.seconds, 1e-9),
                                   "precision": precision, "dataset_manifest_sha256": run.data.manifest_sha256}
            if len(cfg.tta.passes):
                vote = evaluate_split(cfg, run, role, precision=precision, tta=True)
                out[f"{split}_vote"] = {**_metrics_view(vote.metrics, run.data.class_names),
                                        "passes": len(cfg.tta.passes)}
            gathered = gather_predictions(res) if keep else res
            if info.is_main:
                if cfg.eval.save_predictions:
                    write_predictions(run_dir / f"predictions_{split}.npz", gathered)
                if submission is not None:
                    id_map = _benchmark_ids(run.data)
                    files = _write_submission(submission, gathered.names, gathered.preds, id_map)
                    out["submission"] = {"dir": str(Path(submission).resolve()), "files": len(files)}
                    LOG.info(f"wrote {len(files)} submission files to {submission}")
                write_json(run_dir / f"eval_{split}.json", out)
            LOG.info(f"{split}: " + ", ".join(f"{k} {_fmt(res.metrics[k])}" for k in ("oa", "macc", "miou")))
            return out


def _benchmark_ids(bundle: DataBundle) -> list[int]:
    """Benchmark label id of every train id (ScanNet: nyu40 ids for ScanNet20, raw ids for ScanNet200)."""
    ds = _dataset_of(bundle.test)
    label_set = getattr(ds, "label_set", None)
    if label_set is None:
        raise ConfigError("eval.submission_dir is for ScanNet (benchmark submission files); this dataset has none")
    return list(ds.manifest["label_sets"][label_set]["source_ids"])
