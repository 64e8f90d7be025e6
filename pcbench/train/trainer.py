"""The one training loop: ``fit(cfg) -> FitResult`` and ``evaluate(cfg, checkpoint) -> metrics``.

Protocol: checkpoints are selected on the validation split only; the test split is evaluated once, on
the selected checkpoint (``best.pt``); TTA / voting is reported separately as ``test_vote``;
``eval.report_test_selected`` adds the optimistic best-test-over-epochs figure as ``test_selected``.
Everything a run writes lives in ``paths.run_dir`` (rank 0 only): ``train.log``, ``metrics.csv``,
``tensorboard/``, ``checkpoints/{last,best}.pt``, ``metrics.json`` (:func:`fit`'s ``FitResult.to_dict()``) and,
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import pcbench
from pcbench import _malloc
from pcbench.io import atomic_path, write_json, write_text
from pcbench.models import build_model
from pcbench.ops.batch import NonFiniteError

from .checkpoint import FORMAT, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from .config import (
    check_recipe_data,
    check_run_config,
    compile_settings,
    compiled_tracing,
    config_changes,
    config_identity_sha256,
    config_sha256,
    preflight,
)
from .data import (
    DataBundle,
    batch_layout,
    build_data,
    eval_loader,
    eval_transform,
    mix_pairs,
    split_dataset,
    train_loader,
)
from .distributed import (
    all_reduce_sum,
    broadcast_object,
    convert_sync_batchnorm,
    dist_info,
    init_distributed,
    maybe_no_sync,
)
from .errors import ConfigError, DivergedError, RunFileError
from .evaluation import (
    EvalResult,
    autocast_context,
    class_table,
    eval_precision,
    evaluate_loaders,
    gather_predictions,
    resample_payload,
    write_predictions,
)
from .evaluation import write_submission as _write_submission
from .losses import lovasz_softmax
from .optim import bn_momentum_at, build_ema, param_groups, set_bn_momentum
from .resample import PAYLOAD_FILE, save_payload
from .result import FitResult, SplitRoles
from .rundir import hold_run_dir, remove_leftover_temps
from .state import DeviceTally, TrainState

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
                   limit: int | None = None, keep_probabilities: bool = False, progress: Any = None,
                   desc: str | None = None) -> EvalResult:
    """Evaluate ``model`` (default ``run.model``) on ``split`` under autocast ``precision`` (fp32/bf16/fp16;
    default :func:`eval_precision`: fp32 unless ``eval.autocast`` says otherwise), logging its progress.

    The benchmark runner's accuracy-delta probe calls this with the trained model and another precision.
    """
    loaders = _loaders_for(cfg, run, split, limit, tta)
    return evaluate_loaders(model or run.model, loaders, run.data.task, run.data.num_classes,
                            run.data.ignore_index, run.device, precision or eval_precision(cfg, run.precision),
                            int(cfg.eval.max_points), keep_predictions, progress=progress,
                            scores=str(cfg.eval.get("scores", "logits")),
                            desc=desc or (f"{split} vote" if tta else split),
                            keep_probabilities=keep_probabilities)


# ------------------------------------------------------------------------------------------- the loop
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


def _loss(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, smoothing: float) -> Tensor:
    """Cross-entropy averaged over this micro-batch's (weighted) targets, as Pointcept's per-GPU criterion."""
    total = nn.functional.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index,
                                        reduction="sum", label_smoothing=smoothing)
    valid = target != ignore_index
    if weight is not None:  # no boolean-mask indexing: it would read the mask's size back from the device
        denom = torch.where(valid, weight[torch.where(valid, target, 0)], 0).sum()
    else:
        denom = valid.sum()
    return total / denom.to(total.dtype).clamp_min(1)  # a micro-batch of ignored points only adds 0


def micro_batch_loss_scale(loss: Tensor, micro_batches: int) -> Tensor:
    """What one micro-batch back-propagates: its mean loss / ``micro_batches``.

    Summed over a rank's micro-batches and averaged over the ranks by DDP's gradient all-reduce, the gradient is
    the mean over the global batch's W x A micro-batch means: what Pointcept gets from W GPUs, each with its
    own mean loss (pointcept/engines/train.py; DDP averages gradients), whatever the number of devices here.
    """
    return loss / micro_batches


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
        """Report the running loss; called at the logging interval only (reading it is a device sync)."""
        if not self.main:
            return
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/samples_per_s", samples_per_s, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}")
        else:
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
        cols = ["epoch", "step", "train_loss", "lr", "val_oa", "val_macc", "val_miou", "test_oa", "test_macc", "test_miou",
                "train_samples_per_s", "skipped_steps", "scaler_skipped_steps", "wall_s"]
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


def fit(cfg: DictConfig) -> FitResult:
    """Train and evaluate the configured model; returns the typed result whose ``to_dict()`` is ``metrics.json``.

    Before anything is written: the run dir is locked for this process (ConfigError naming the owner's pid when
    another live run holds it) and, with ``resume=true``, the checkpoint's config is compared with ``cfg``.
    DivergedError (a FloatingPointError) when the weights stop being finite or too many steps were skipped.
    """
    t_start = time.perf_counter()
    check_run_config(cfg)
    _preflight(cfg)
    with _environment(cfg) as env:
        info = dist_info()
        run_dir = Path(str(broadcast_object(str(Path(str(cfg.paths.run_dir)).resolve()))))
        with _own_run_dir(run_dir, info.is_main) as took_over:
            resume_state, resume_note = _restore_point(cfg, run_dir)
            removed = remove_leftover_temps(run_dir) if info.is_main else []
            with _run_logging(run_dir if info.is_main else None, info.is_main):
                for note in (took_over, resume_note):
                    if note:
                        LOG.warning(note)
                if removed:
                    LOG.info(f"removed {len(removed)} temporary file(s) a killed run left: "
                             f"{', '.join(p.name for p in removed[:4])}")
                return _Training(cfg, env["device"], run_dir, t_start).run(resume_state)


def _read_manifest(cfg: DictConfig) -> dict[str, Any] | None:
    """``<data.root>/manifest.json`` of a finished preparation; None otherwise (check_data names what is wrong)."""
    import json  # noqa: PLC0415

    if OmegaConf.is_missing(cfg.data, "root") or cfg.data.get("root") in (None, ""):
        return None
    path = Path(str(cfg.data.root)).expanduser() / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("status", "complete") != "complete":
        return None  # a half-prepared folder: check_data names the command that finishes it
    return manifest


def _preflight(cfg: DictConfig) -> None:
    """One ConfigError listing every reason the run would stop (config.preflight), before anything is built or
    written: check_data, which runs later, stops at the first problem."""
    manifest = _read_manifest(cfg)
    if manifest is None:
        return
    problems = preflight(cfg, manifest)
    if not problems:
        return
    fixes = " ".join(p.split(" -> ", 1)[1] for p in problems if " -> " in p)
    raise ConfigError(f"the run cannot start on data.root={cfg.data.root} ({len(problems)} problem"
                      f"{'s' if len(problems) != 1 else ''}): " + "; ".join(problems)
                      + (f"; all together: {fixes}" if fixes else ""))


@contextlib.contextmanager
def _own_run_dir(run_dir: Path, main: bool) -> Iterator[str | None]:
    """Rank 0 holds the run dir's lock for the whole run; every rank raises when it is someone else's."""
    with contextlib.ExitStack() as stack:
        err, note = None, None
        if main:
            try:
                note = stack.enter_context(hold_run_dir(run_dir))
            except ConfigError as e:
                err = str(e)
        err = broadcast_object(err)
        if err:
            raise ConfigError(err)
        yield note


def _restore_point(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint a ``resume=true`` run continues from, checked against ``cfg``; (None, note) when none.

    ConfigError listing ``key: old -> new`` when the requested config differs outside PLACEMENT_KEYS (a
    different model included), so nothing of a refused resume is written.
    """
    last = run_dir / "checkpoints" / "last.pt"
    if not cfg.resume:
        if last.is_file():
            raise ConfigError(f"{run_dir} already holds a run (checkpoints/last.pt); continue it with resume=true "
                              f"or choose another run directory (hydra.run.dir=... / paths.run_dir=...)")
        return None, None
    if not last.is_file():
        return None, f"resume=true but {last} does not exist yet: starting from scratch"
    state = load_checkpoint(last)
    if state.get("format") != FORMAT:
        raise RunFileError(f"{last} has checkpoint format {state.get('format')}, this pcbench writes {FORMAT}; start "
                           "a new run directory")
    stored = state.get("config")
    if not isinstance(stored, str) or not isinstance(state.get("progress"), dict):
        raise RunFileError(f"{last} holds no training config/progress (not a last.pt written by pcbench-train); "
                           "start a new run directory")
    try:
        old = OmegaConf.create(stored)
    except Exception as err:  # noqa: BLE001 - any YAML error means a damaged checkpoint
        raise RunFileError(f"{last} holds a config that is not valid YAML ({err}); start a new run directory") from err
    changes = config_changes(old, cfg)
    if changes:
        shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in changes[:12])
        more = f"; and {len(changes) - 12} more" if len(changes) > 12 else ""
        raise ConfigError(f"resume=true but the config differs from the one {last} was trained with ({shown}{more}); "
                          "resume with the original settings (only where/how it runs may change: workers, threads, "
                          "device, logging, run dir) or start a new run directory")
    return state, None


def _from_nonfinite_sample(err: BaseException) -> bool:
    """Whether ``err`` is collate's NonFiniteError report (raised here, or re-raised by a DataLoader worker as text)."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, NonFiniteError) or "NonFiniteError" in str(e):
            return True
        e = e.__cause__
    return False


def _nonfinite_sample_message(err: BaseException, cfg: DictConfig) -> str:
    """One line: which prepared sample holds NaN/inf (collate's words), and the command that checks the folder."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if "contains NaN or inf" in ln]
    # collate's line names the samples; a worker's re-raised text also holds the PointBatch line before it
    detail = next((ln for ln in lines if " of sample " in ln), lines[-1] if lines else text.strip().splitlines()[-1])
    detail = detail.split(": ", 1)[1] if detail.startswith("ValueError: ") else detail
    prep = " ".join(str(cfg.data.get("prep") or "pcbench-prep <dataset>").split()[:2])
    root = cfg.data.root
    return (f"a prepared training sample of data.root={root} holds NaN or inf: {detail[:300]}; check the folder with "
            f"`{prep} --verify out={root}` and re-prepare it (or drop the sample)")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler: active for fp16 only (a disabled scaler's calls are no-ops)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _json_safe(obj: Any) -> Any:
    """A resolved config for metrics.json: non-finite floats (e.g. NaN class weights of a test) as strings."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


class _Training:
    """One run of the loop as named steps: build, restore, train (train_step, optimizer_step, end_of_epoch),
    final_evaluation and result. The loop reads one flag per optimizer step from the device (whether to apply it)
    and everything else at the logging interval, at checkpoints and at epoch ends."""

    def __init__(self, cfg: DictConfig, device: torch.device, run_dir: Path, t_start: float) -> None:
        self.cfg, self.device, self.run_dir, self.t_start = cfg, device, run_dir, t_start
        self.info = dist_info()
        self.t = cfg.trainer
        self.last_path, self.best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
        self.state = TrainState()

    def run(self, resume_state: dict[str, Any] | None) -> FitResult:
        """Every step in order; returns the result written as metrics.json."""
        self.build()
        self.restore(resume_state)
        self.write_run_files()
        self.train()
        return self.result(*self.final_evaluation())

    # ------------------------------------------------------------------------------------------ build
    def build(self) -> None:
        """Data, model (+ EMA, DDP, compile), optimizer, schedule, scaler, loss weights, and the step budget."""
        cfg, t, info = self.cfg, self.t, self.info
        _seed_everything(int(cfg.seed))
        self.built = build_run(cfg, self.device)
        self.bundle, self.model, self.precision = self.built.data, self.built.model, self.built.precision
        LOG.info(f"run dir {self.run_dir}")
        # a paper recipe run on data prepared otherwise than its source is a variant: said here, recorded in the result
        self.fidelity_reasons = check_recipe_data(cfg, getattr(_dataset_of(self.built.data.train), "manifest", {}))
        for reason in self.fidelity_reasons:
            LOG.warning(f"recorded as a pcbench variant: {reason}")
        if cfg.eval.get("corruptions"):  # refused before training, not after it
            from .robustness import check_corruptions  # noqa: PLC0415

            check_corruptions(cfg, self.built)
        b = self.bundle
        LOG.info(f"data {cfg.data.name} ({b.task}, {b.num_classes} classes, {b.in_channels} input channels): "
                 f"train {len(b.train)}, val {len(b.val)}, test {len(b.test)}")
        LOG.info(f"model {cfg.model._target_}: {self.built.params:,} parameters on {self.device} ({self.precision}); "
                 f"allocator {_malloc.malloc_setting()}")
        if info.world_size > 1 and t.sync_batchnorm:
            convert_sync_batchnorm(self.model)
        self.ema = build_ema(self.model, float(t.ema_decay)) if t.ema_decay else None
        self.fwd_model: nn.Module = self.model
        if info.world_size > 1:
            self.fwd_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compile = compile_settings(t)  # None, or torch.compile's backend / mode (recorded in metrics.json)
        if self.compile is not None:
            self.fwd_model = torch.compile(self.fwd_model, **self.compile)
        groups = cfg.get("optim_groups")
        groups = OmegaConf.to_container(groups, resolve=True) if groups else None
        self.optimizer = _instantiate(cfg.optim)(param_groups(self.model, groups))
        self.bn_sched = OmegaConf.to_container(t.bn_momentum, resolve=True) if t.get("bn_momentum") else None
        self.mix_prob = float(t.get("mix_prob") or 0.0)
        self.lovasz_weight = float(t.get("lovasz_weight") or 0.0)
        if self.lovasz_weight and b.task != "seg":
            raise ConfigError("trainer.lovasz_weight is a segmentation loss; set it to 0 for classification")
        self.loader, self.sampler = train_loader(b.train, cfg, info.rank, info.world_size)
        self.device_batch, self.accum = batch_layout(t, info.world_size)
        steps_per_epoch = self.sampler.num_steps()
        LOG.info(f"batch: global {int(t.batch_size)} per step = {info.world_size} rank(s) x {self.accum} "
                 f"micro-batch(es) x {self.device_batch} samples per device")
        total = int(t.max_epochs) * steps_per_epoch
        if t.max_steps is not None:
            total = min(total, int(t.max_steps))
        self.total_steps, self.max_epochs = total, math.ceil(total / steps_per_epoch)
        self.scheduler = _instantiate(cfg.sched)(self.optimizer, total_steps=total)
        self.scaler = _grad_scaler(self.device, self.precision)
        self.weight = _class_weights(cfg, b, self.device)
        self.key = _selection_key(cfg, b.task)
        self.cfg_yaml = _resolved_yaml(cfg)
        self.clip = float(t.gradient_clip_val) if t.gradient_clip_val else None
        frac = t.get("max_skipped_fraction")
        if frac is not None and not 0.0 <= float(frac) <= 1.0:
            raise ConfigError(f"trainer.max_skipped_fraction={frac} must be between 0 and 1 (or null: no fraction "
                              "limit, only trainer.max_skipped_steps)")
        self.tally = DeviceTally(self.device)
        self.window_bad = torch.zeros((), device=self.device)  # non-finite micro-batch losses in this window
        self.reporter = _Reporter(cfg, self.run_dir, info.is_main, total)

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from ``last.pt`` (already checked against the config): weights, optimizer, RNGs, TrainState."""
        if state is None:
            return
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            self.state.load_state_dict(state["progress"])
        except (KeyError, RuntimeError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RunFileError(f"{self.last_path} does not fit this run ({first[:200]}); start a new run "
                               "directory") from err
        restore_rng_state(state["rng"])
        s = self.state
        LOG.info(f"resumed from {self.last_path}: epoch {s.epoch}, batch {s.batch}, step {s.step}")

    def write_run_files(self) -> None:
        """``.hydra/config.yaml`` (as composed) and ``resolved.yaml``, after every check passed (rank 0)."""
        if not self.info.is_main:
            return
        hydra_dir = self.run_dir / ".hydra"
        write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(self.cfg))
        write_text(hydra_dir / "resolved.yaml", self.cfg_yaml)
        from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

        if HydraConfig.initialized():  # pcbench-train keeps Hydra from writing .hydra/ before these checks
            hc = HydraConfig.get()
            write_text(hydra_dir / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
            write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(hc.overrides.task))

    # ------------------------------------------------------------------------------------------ train
    def eval_model(self) -> nn.Module:
        """The weights validation and test use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(self, path: Path) -> None:
        """``last.pt``: everything a resume needs (pending device tallies are read first)."""
        self.tally.drain(self.state)
        state = {"format": FORMAT, "model": _bare(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rng_state(),
                 "progress": self.state.state_dict(), "config": self.cfg_yaml}
        if self.info.is_main:
            save_checkpoint(state, path)

    def save_best(self) -> None:
        """``best.pt``: the selected weights and the value that selected them."""
        if self.info.is_main:
            s = self.state
            save_checkpoint({"format": FORMAT, "model": _bare(self.eval_model()).state_dict(), "config": self.cfg_yaml,
                             "epoch": s.epoch, "metric": self.key, "value": s.best}, self.best_path)

    def train(self) -> None:
        """Epochs until the step budget is spent."""
        s = self.state
        self.model.train()
        try:
            while s.epoch < self.max_epochs and s.step < self.total_steps:
                self.train_epoch()
                self.end_of_epoch()
        finally:
            self.reporter.close()

    def train_epoch(self) -> None:
        """One (possibly resumed) pass over the training batches."""
        s, cfg = self.state, self.cfg
        train_ds = _dataset_of(self.bundle.train)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(s.epoch)
        self.sampler.set_epoch(s.epoch, s.batch)
        self.loader.generator.manual_seed(int(cfg.seed) * 1000003 + s.epoch)
        self.reporter.start_epoch(s.epoch, self.sampler.num_batches(), s.batch)
        self.t_epoch = time.perf_counter()
        self.window_bad.zero_()
        try:
            for batch in self.loader:
                if self.train_step(batch.to(self.device, non_blocking=True)):
                    break
        except ValueError as err:
            if not _from_nonfinite_sample(err):
                raise
            raise RunFileError(_nonfinite_sample_message(err, self.cfg)) from err
        self.reporter.end_epoch()
        s.train_seconds += time.perf_counter() - self.t_epoch

    def train_step(self, batch: Any) -> bool:
        """Forward and backward of one micro-batch, then the optimizer step at a window's end; True when done."""
        s, t, info, epoch = self.state, self.t, self.info, self.state.epoch
        step_in_epoch, micro = divmod(s.batch, self.accum)
        # the micro-batch's place in the global batch, the same on any (ranks x micro-batches) layout
        group = (step_in_epoch * info.world_size + info.rank) * self.accum + micro
        n_samples = batch.num_clouds * info.world_size  # before Mix3D merges pairs into one cloud
        if self.mix_prob and np.random.default_rng([int(self.cfg.seed), epoch, group]).random() < self.mix_prob:
            batch = mix_pairs(batch)  # Mix3D within this micro-batch (Pointcept: per GPU), exact on resume
        if self.bn_sched is not None and micro == 0:
            set_bn_momentum(self.model, bn_momentum_at(s.step, **self.bn_sched))
        with maybe_no_sync(self.fwd_model, micro < self.accum - 1), autocast_context(self.device, self.precision), \
                (contextlib.nullcontext() if self.compile is None else compiled_tracing()):
            logits = self.fwd_model(batch)
            loss = _loss(logits, batch.label, self.weight, self.bundle.ignore_index, float(t.label_smoothing))
            if self.lovasz_weight:  # per micro-batch, as Pointcept computes it per GPU
                loss = loss + self.lovasz_weight * lovasz_softmax(logits, batch.label, self.bundle.ignore_index)
            bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1)).reshape(())
            # a non-finite loss is still back-propagated: its NaN gradients are dropped with the whole window at
            # the optimizer step, which is cheaper than a host read here to decide
            self.scaler.scale(micro_batch_loss_scale(loss, self.accum)).backward()
        loss_log = loss.detach()  # this rank's micro-batch mean
        self.window_bad.add_(bad)
        self.tally.add(loss_log, bad == 0)
        s.batch += 1
        s.train_samples += n_samples
        s.acc["samples"] += n_samples
        self.reporter.advance()
        if micro < self.accum - 1:
            return False
        self.optimizer_step()
        return s.step >= self.total_steps

    def optimizer_step(self) -> None:
        """Apply, or skip, the accumulated gradients; one host read (a packed flag) decides which."""
        s, t = self.state, self.t
        self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        code = (self.window_bad > 0).to(torch.int32) + 2 * (~torch.isfinite(norm)).to(torch.int32)
        if self.scaler.is_enabled():
            found = self.scaler._found_inf_per_device(self.optimizer)  # noqa: SLF001 - what scaler.step reads
            code = code + 4 * (torch.stack([f.reshape(()).to(self.device) for f in found.values()]).sum() > 0).to(torch.int32)
        flags = int(code)  # the one host read per step
        self.window_bad.zero_()
        loss_bad, norm_bad, overflow = bool(flags & 1), bool(flags & 2), bool(flags & 4)
        if loss_bad or (norm_bad and not overflow):
            s.skipped += 1
            LOG.warning(f"step {s.step + 1}: non-finite {'loss' if loss_bad else 'gradient norm'}; "
                        f"the step is skipped ({s.skipped} skipped so far)")
            self.check_skips()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            self.scheduler.step()
        elif overflow:  # the fp16 scaler's normal operation: it lowers the scale; the schedule waits (as Pointcept)
            s.scaler_skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
        else:
            self.optimizer.step()  # gradients are unscaled already: what scaler.step does after its own inf check
            if self.scaler.is_enabled():
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.scheduler.step()
        s.step += 1
        if s.step % self.reporter.every == 0 or s.step == self.total_steps:
            self.tally.drain(s)
            elapsed = time.perf_counter() - self.t_epoch
            self.reporter.step(s.step, s.mean_loss(), self.optimizer.param_groups[0]["lr"],
                               s.acc["samples"] / max(elapsed, 1e-9), s.epoch)
        every = int(t.checkpoint_every_n_steps)
        if every and s.step % every == 0 and s.batch < self.sampler.num_batches():
            s.train_seconds += time.perf_counter() - self.t_epoch
            self.t_epoch = time.perf_counter()
            self.checkpoint(self.last_path)
        kill = self.cfg.fault.sigkill_after_step
        if kill is not None and s.step == int(kill) and self.info.is_main:
            import signal  # noqa: PLC0415

            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the exact-resume test

    def check_skips(self) -> None:
        """DivergedError once the skipped steps pass trainer.max_skipped_steps or max_skipped_fraction of the run."""
        s, t = self.state, self.t
        fix = "lower optim.lr, set trainer.gradient_clip_val or use trainer.precision=fp32"
        if s.skipped > int(t.max_skipped_steps):
            raise DivergedError(f"{s.skipped} steps had a non-finite loss or gradient (trainer.max_skipped_steps="
                                f"{t.max_skipped_steps}); {fix}")
        frac = t.get("max_skipped_fraction")
        if frac is not None and s.skipped > float(frac) * self.total_steps:
            raise DivergedError(f"{s.skipped} of the run's {self.total_steps} steps had a non-finite loss or gradient "
                                f"(more than trainer.max_skipped_fraction={frac}); {fix}")

    def check_weights(self, model: nn.Module, what: str) -> None:
        """DivergedError naming the first non-finite tensor of ``model``'s state (one host read)."""
        items = [(k, v) for k, v in _bare(model).state_dict().items() if v.is_floating_point() and v.numel()]
        if not items:
            return
        finite = torch.stack([torch.isfinite(v).all() for _, v in items])
        if bool(finite.all()):
            return
        name = items[int(torch.argmin(finite.to(torch.int8)))][0]
        raise DivergedError(f"the run diverged: {what} are not finite (first: {name}) after {self.state.step} steps "
                            f"({self.state.skipped} skipped); lower optim.lr, set trainer.gradient_clip_val or use "
                            "trainer.precision=fp32")

    def end_of_epoch(self) -> None:
        """Read the tallies, check the weights, validate and select, write metrics.csv and last.pt."""
        s, cfg, t = self.state, self.cfg, self.t
        epoch = s.epoch
        self.tally.drain(s)
        self.check_weights(self.model, f"the weights of epoch {epoch}")
        if self.ema is not None:
            self.check_weights(self.ema.module, f"the EMA weights of epoch {epoch}")
        row: dict[str, Any] = {"epoch": epoch, "step": s.step, "train_loss": s.mean_loss(),
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "train_samples_per_s": s.train_samples / max(s.train_seconds, 1e-9),
                               "skipped_steps": s.skipped, "scaler_skipped_steps": s.scaler_skipped}
        last_epoch = epoch + 1 >= self.max_epochs or s.step >= self.total_steps
        val = None
        if last_epoch or (epoch + 1) % int(cfg.eval.every_n_epochs) == 0:
            val = evaluate_split(cfg, self.built, "val", model=self.eval_model(), limit=t.limit_eval_batches)
            self.reporter.scalars("val", val.metrics, epoch)
            row.update({f"val_{k}": val.metrics[k] for k in ("oa", "macc", "miou")})
            score = val.metrics.get(self.key)
            if score is not None and (s.best is None or score > s.best):
                s.best, s.best_epoch, s.best_metrics = float(score), epoch, dict(val.metrics)
                self.save_best()
            LOG.info(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val {self.key} "
                     f"{_fmt(score)} (best {_fmt(s.best)} at epoch {s.best_epoch})")
            if cfg.eval.report_test_selected:
                te = evaluate_split(cfg, self.built, "test", model=self.eval_model(), limit=t.limit_eval_batches)
                self.reporter.scalars("test_selected", te.metrics, epoch)
                row.update({"test_oa": te.metrics["oa"], "test_miou": te.metrics["miou"]})
                ts = te.metrics.get(self.key)
                if ts is not None and (s.test_selected is None or ts > s.test_selected["value"]):
                    s.test_selected = {"value": float(ts), "epoch": epoch, "metrics": te.metrics}
        if s.best_epoch is None and last_epoch:  # nothing scored (e.g. empty val): keep the last weights
            s.best_epoch = epoch
            s.best_metrics = dict(val.metrics) if val is not None else None
            self.save_best()
        row["wall_s"] = time.perf_counter() - self.t_start
        s.history.append(row)
        self.reporter.write_csv(s.history)
        s.epoch, s.batch = epoch + 1, 0
        s.acc = {"loss": 0.0, "n": 0, "samples": 0}
        self.checkpoint(self.last_path)

    # ------------------------------------------------------------------------------------------ results
    def final_evaluation(self) -> tuple[Run, dict[str, EvalResult]]:
        """The selected checkpoint (best.pt) once on the final split, its val re-measured, TTA if configured;
        writes the resampling payload, the confusion matrices, predictions (plain and voted) and ModelNet-C."""
        cfg, info, b = self.cfg, self.info, self.bundle
        best = load_checkpoint(self.best_path) if info.is_main or self.best_path.is_file() else None
        best_state = broadcast_object(best["model"] if best is not None else None)
        test_model = build_model(cfg.model, b.in_channels, b.num_classes).to(self.device)
        test_model.load_state_dict(best_state)
        self.check_weights(test_model, f"the weights of {self.best_path}")
        run_test = Run(b, test_model, self.device, self.precision, self.built.params)
        keep = bool(cfg.eval.save_predictions)
        probs = bool(cfg.eval.get("save_probabilities") or False)
        out = {"test": evaluate_split(cfg, run_test, "test", keep_predictions=keep, keep_probabilities=probs),
               "val_final": evaluate_split(cfg, run_test, "val")}
        if len(cfg.tta.passes):
            out["test_vote"] = evaluate_split(cfg, run_test, "test", tta=True, keep_predictions=keep,
                                              keep_probabilities=probs)
        self.extra_files = write_eval_files(self.run_dir, "test", out, b, keep, info.is_main)
        for proto in ("test", "test_vote"):
            if proto in out:
                LOG.info(class_table(out[proto].metrics, b.class_names,
                                     f"{proto} per class (checkpoint of epoch {self.state.best_epoch})"))
        self.corruptions = None
        if cfg.eval.get("corruptions"):
            from .robustness import evaluate_corruptions  # noqa: PLC0415

            self.corruptions = evaluate_corruptions(cfg, run_test, out["test"].metrics["oa"])
        return run_test, out

    def result(self, run_test: Run, ev: dict[str, EvalResult]) -> FitResult:
        """The typed result; rank 0 writes its ``to_dict()`` as metrics.json."""
        cfg, s, b, info = self.cfg, self.state, self.bundle, self.info
        names = b.class_names
        val_final = ev["val_final"].metrics
        metrics: dict[str, dict[str, Any]] = {
            # "val" is what selected best.pt, as measured then; "val_final" the same weights measured again in full
            "val": _metrics_view(s.best_metrics if s.best_metrics is not None else val_final, names),
            "val_final": _metrics_view(val_final, names),
            "test": _metrics_view(ev["test"].metrics, names),
        }
        if "test_vote" in ev:
            metrics["test_vote"] = {**_metrics_view(ev["test_vote"].metrics, names), "passes": len(cfg.tta.passes)}
        if cfg.eval.report_test_selected and s.test_selected is not None:
            metrics["test_selected"] = {**_metrics_view(s.test_selected["metrics"], names),
                                        "epoch": s.test_selected["epoch"],
                                        "note": "best test score over epochs: optimistic, not a valid estimate"}
        test = ev["test"]
        result = FitResult(
            task=b.task, dataset=str(cfg.data.name), model=str(cfg.model._target_), seed=int(cfg.seed),
            config=_json_safe(OmegaConf.to_container(cfg, resolve=True)), config_sha256=config_sha256(cfg),
            identity_sha256=config_identity_sha256(cfg),
            splits=SplitRoles.of(str(cfg.data.splits.train), b.info["val"]["source"], str(cfg.data.splits.test)),
            metrics=metrics, selection_metric=self.key, selected_value=s.best, best_epoch=s.best_epoch,
            epochs=s.epoch, steps=s.step, skipped_steps=s.skipped, scaler_skipped_steps=s.scaler_skipped,
            train_samples_per_s=s.train_samples / max(s.train_seconds, 1e-9),
            eval_samples_per_s=test.samples * info.world_size / max(test.seconds, 1e-9),
            peak_memory_mib=_peak_memory_mib(self.device), params=self.built.params,
            wall_s=time.perf_counter() - self.t_start, num_classes=b.num_classes, in_channels=b.in_channels,
            ignore_index=b.ignore_index, class_names=list(names),
            provenance={"pcbench_version": pcbench.__version__, "git_commit": _git_commit(),
                        "torch_version": torch.__version__, "device": _device_name(self.device),
                        "precision": self.precision, "world_size": info.world_size,
                        "threads": torch.get_num_threads(),
                        "malloc": _malloc.malloc_setting() if self.device.type == "cpu" else "n/a (cuda)",
                        "dataset_manifest_sha256": b.manifest_sha256},
            recipe=_recipe_fields(cfg, self.fidelity_reasons),
            extra={"val_split": b.info["val"], **self.extra_files,
                   "compile": None if self.compile is None else {**self.compile, "mode": self.compile["mode"] or "default"},
                   "batch": {"global": int(self.t.batch_size), "device": self.device_batch,
                             "micro_batches_per_step": self.accum, "ranks": info.world_size}})
        if self.corruptions is not None:
            from .robustness import NOTE  # noqa: PLC0415

            result.extra.update(corruptions=self.corruptions, corruptions_note=NOTE)
        if info.is_main:
            self.record_test(metrics, names)
            write_json(self.run_dir / "metrics.json", result.to_dict())
        LOG.info(f"test {self.key} {_fmt(test.metrics.get(self.key))} on the checkpoint of epoch {s.best_epoch} "
                 f"(selected on val {self.key} {_fmt(s.best)}; re-measured in full {_fmt(val_final.get(self.key))}); "
                 f"wrote {self.run_dir / 'metrics.json'}")
        return result


    def record_test(self, metrics: dict[str, dict[str, Any]], names: list[str]) -> None:
        """The final figures in metrics.csv (the selected epoch's row: test_oa / test_macc / test_miou) and in
        TensorBoard (test/, test_vote/ scalars and test_iou/<class>, at the last step)."""
        s = self.state
        for row in s.history:
            if row.get("epoch") == s.best_epoch:
                row.update({f"test_{k}": metrics["test"].get(k) for k in ("oa", "macc", "miou")})
        self.reporter.write_csv(s.history)
        if not self.cfg.logger.tensorboard:
            return
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        try:
            for proto in ("test", "test_vote"):
                for k in ("oa", "macc", "miou"):
                    if metrics.get(proto, {}).get(k) is not None:
                        tb.add_scalar(f"{proto}/{k}", metrics[proto][k], s.step)
            for name, v in zip(names, metrics["test"].get("iou_per_class") or [], strict=False):
                if v is not None:
                    tb.add_scalar(f"test_iou/{name}", v, s.step)
        finally:
            tb.close()


def write_eval_files(run_dir: Path, split: str, out: dict[str, EvalResult], bundle: DataBundle, keep: bool,
                     main: bool, payload_name: str | None = None) -> dict[str, Any]:
    """What a final evaluation of ``split`` leaves in the run dir; returns the result's record of it.

    ``resample_<split>.npz`` (the plain pass's resampling payload, :mod:`pcbench.train.resample`; for the test
    split ``resample_test.npz``; ``payload_name`` overrides), ``confusion_<split>.npy`` (and ``confusion_<split>_vote.npy``) and, with
    ``keep``, ``predictions_<split>.npz`` / ``predictions_<split>_vote.npz``. Every rank must call it (the
    predictions are gathered); rank 0 writes. Returned: ``{"resample": {"path", "sha256"}, "outputs": {...}}``,
    paths relative to the run dir.
    """
    gathered = {proto: gather_predictions(res) for proto, res in out.items() if proto in ("test", "test_vote")}
    if not main:
        return {}
    files: dict[str, Any] = {}
    outputs: dict[str, str] = {}
    for proto, res in gathered.items():
        suffix = split + ("_vote" if proto == "test_vote" else "")
        if res.confusion is not None:
            name = f"confusion_{suffix}.npy"
            with atomic_path(run_dir / name) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(res.confusion, dtype=np.int64))
            outputs[f"confusion_{proto}"] = name
        if keep:
            name = f"predictions_{suffix}.npz"
            write_predictions(run_dir / name, res)
            outputs[f"predictions_{proto}"] = name
    plain = gathered["test"]
    if plain.items:
        name = payload_name or (PAYLOAD_FILE if split == "test" else f"resample_{split}.npz")
        sha = save_payload(run_dir / name, resample_payload(plain, bundle.task, bundle.num_classes))
        files["resample"] = {"path": name, "sha256": sha}
    else:
        LOG.warning(f"the {split} evaluation scored no sample: no resampling payload written")
    files["outputs"] = outputs
    return files


def _recipe_fields(cfg: DictConfig, reasons: list[str] | None = None) -> dict[str, Any]:
    """``recipe`` / ``fidelity`` / ``recipe_source`` of a paper recipe (conf/experiment/) for metrics.json; with
    ``reasons`` (check_recipe_data's mismatches) the run is a "pcbench variant" and ``fidelity_reasons`` says why."""
    r = cfg.get("recipe")
    if not r:
        return {}
    out = {"recipe": str(r.name), "fidelity": str(r.fidelity), "recipe_source": str(r.source)}
    if reasons:
        out.update(fidelity="pcbench variant", fidelity_reasons=list(reasons))
    return out


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
            try:
                run.model.load_state_dict(state["model"])
            except RuntimeError as err:
                first = (str(err).strip().splitlines() or ["state dict mismatch"])[0]
                raise RunFileError(f"checkpoint {str(checkpoint)!r} does not fit model {cfg.model._target_} "
                                   f"({first[:200]}); evaluate it with the config it was trained with (the run's "
                                   ".hydra/config.yaml) or give a checkpoint of this model") from err
            split = str(cfg.eval.split)
            splits = run.data.info.get("manifest_splits", [])
            if split not in splits:
                raise ConfigError(f"eval.split={split!r} is not a split of data.root={cfg.data.root} (splits: "
                                  f"{splits}); choose one of them")
            role = "test"
            run.data.test = split_dataset(cfg, split)
            if len(run.data.test) == 0:
                raise ConfigError(f"eval.split={split!r} of data.root={cfg.data.root} holds no samples; choose "
                                  f"another split (splits: {splits}) or prepare that one")
            precision = eval_precision(cfg, run.precision)
            submission = cfg.eval.submission_dir
            has_vote = len(cfg.tta.passes) > 0
            source = _submission_source(cfg, has_vote)
            keep = bool(cfg.eval.save_predictions) or submission is not None
            probs = bool(cfg.eval.get("save_probabilities") or False)
            if cfg.eval.get("corruptions"):
                from .robustness import check_corruptions  # noqa: PLC0415

                check_corruptions(cfg, run)  # refuses segmentation / normals before the long evaluation
            res = evaluate_split(cfg, run, role, precision=precision, keep_predictions=keep,
                                 keep_probabilities=probs, desc=split)  # progress names the split, not its role
            out: dict[str, Any] = {split: _metrics_view(res.metrics, run.data.class_names),
                                   "checkpoint": str(Path(checkpoint).resolve()),
                                   "eval_samples_per_s": res.samples * info.world_size / max(res.seconds, 1e-9),
                                   "precision": precision, "dataset_manifest_sha256": run.data.manifest_sha256}
            results = {"test": res}
            if has_vote:
                vote = evaluate_split(cfg, run, role, precision=precision, tta=True, keep_predictions=keep,
                                      keep_probabilities=probs, desc=f"{split} vote")
                results["test_vote"] = vote
                out[f"{split}_vote"] = {**_metrics_view(vote.metrics, run.data.class_names),
                                        "passes": len(cfg.tta.passes)}
            # its own payload name: the run's resample_test.npz is what metrics.json records (by sha256)
            files = write_eval_files(run_dir, split, results, run.data, bool(cfg.eval.save_predictions),
                                     info.is_main, payload_name=f"resample_eval_{split}.npz")
            out.update(files)
            for proto, r in results.items():
                LOG.info(class_table(r.metrics, run.data.class_names, f"{split}{'_vote' if proto != 'test' else ''} "
                                                                      "per class"))
            if cfg.eval.get("corruptions"):
                from .robustness import NOTE, evaluate_corruptions  # noqa: PLC0415

                out["corruptions"] = evaluate_corruptions(cfg, run, res.metrics["oa"], precision=precision)
                out["corruptions_note"] = NOTE
            if submission is not None:
                chosen = gather_predictions(results["test_vote" if source == "vote" else "test"])
                if info.is_main:
                    id_map = _benchmark_ids(run.data)
                    written = _write_submission(submission, chosen.names, chosen.preds, id_map)
                    out["submission"] = {"dir": str(Path(submission).resolve()), "files": len(written),
                                         "from": source}
                    LOG.info(f"wrote {len(written)} submission files to {submission} from the {source} pass")
            if info.is_main:
                write_json(run_dir / f"eval_{split}.json", out)
            LOG.info(f"{split}: " + ", ".join(f"{k} {_fmt(res.metrics[k])}" for k in ("oa", "macc", "miou")))
            return out


def _submission_source(cfg: DictConfig, has_vote: bool) -> str:
    """Which pass the ScanNet submission comes from: ``eval.submission_from`` (vote / plain); ``auto`` (default)
    is the voted pass when TTA passes are configured (the recipes that configure them cite the voted figure)."""
    value = str(cfg.eval.get("submission_from") or "auto")
    if value not in ("auto", "vote", "plain"):
        raise ConfigError(f"eval.submission_from={value!r} is unknown; use vote, plain or auto (vote when tta has "
                          "passes)")
    if value == "vote" and not has_vote:
        raise ConfigError("eval.submission_from=vote but tta has no passes; choose a tta=... config (e.g. the "
                          "recipe's) or eval.submission_from=plain")
    return ("vote" if has_vote else "plain") if value == "auto" else value


def _benchmark_ids(bundle: DataBundle) -> list[int]:
    """Benchmark label id of every train id (ScanNet: nyu40 ids for ScanNet20, raw ids for ScanNet200)."""
    ds = _dataset_of(bundle.test)
    label_set = getattr(ds, "label_set", None)
    if label_set is None:
        raise ConfigError("eval.submission_dir is for ScanNet (benchmark submission files); this dataset has none")
    return list(ds.manifest["label_sets"][label_set]["source_ids"])
