"""Per-cell efficiency probe, in the process that trained the model: size, FLOPs, speed, memory, bf16, int8.

``probe_efficiency(model, train_batches, eval_batches, task=..., device=...)`` returns a flat dict (stored
under the record's ``probe``) with:

- ``params``; ``flops_per_sample``: FLOPs of one forward pass over the first eval batch divided by its clouds,
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add of matmul / conv /
  attention kernels; neighbour search, gathers and scatters are not counted, so point models with heavy
  grouping look cheaper than they run). ``flops_points_per_sample`` says at how many points it was counted.
- ``train_samples_per_s``: forward + loss + backward + SGD step on a copy of the model (the model itself is
  left untouched), summed over ``repeats`` passes over ``train_batches`` after ``warmup`` passes;
  ``infer_samples_per_s`` the same for the eval-mode forward under ``torch.no_grad`` (not inference_mode:
  torchao's int8 tensors refuse inference tensors, and fp32/bf16/int8 must be timed alike);
  ``latency_b1_ms``: the median of forward passes on the first eval cloud alone, after warm-up.
  Batches are moved to the device before timing, so host-to-device copies are not in these figures.
- Peak memory of one training step and one inference batch (the batch with most points):
  on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before (tensor memory, excludes the
  caching allocator's reserve); on Linux CPU the peak RSS increase: freed heap is handed back to the kernel
  first (glibc ``malloc_trim``) so that pages cached by an earlier pass cannot hide the peak, the kernel's
  high-water mark is reset (``/proc/self/clear_refs`` = 5) and ``VmHWM - VmRSS(before)`` is read after the
  pass; where the reset is not permitted a thread samples ``VmRSS`` every millisecond (a lower bound).
- ``bf16_*``: inference throughput under ``torch.autocast(dtype=bfloat16)``, its speed-up over fp32 measured
  in the same probe and, with a ``score`` callable, the change of the score.
- ``int8_*``: the ``nn.Linear`` layers quantized by torchao (dynamic int8 activations + int8 weights, the
  successor of the deprecated ``torch.ao.quantization.quantize_dynamic``) on a copy of the model, with the
  same figures, the share of parameters it covers, or ``"unsupported: <reason>"``.

``score(model, autocast_dtype_or_None) -> float`` is supplied by the caller (the runner wraps the trainer's
evaluation and returns the headline metric as a fraction in [0, 1], which the report shows in points);
deltas are ``score(variant) - score(fp32)``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import gc
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcbench.ops import PointBatch

__all__ = ["count_flops", "machine_load", "peak_memory_mib", "probe_efficiency", "single_cloud"]

FLOPS_NOTE = ("torch.utils.flop_counter.FlopCounterMode: matmul/conv/attention, 2 FLOPs per multiply-add; "
              "neighbour search, gather and scatter not counted")
INT8_METHOD = "torchao Int8DynamicActivationInt8WeightConfig on nn.Linear"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def single_cloud(batch: PointBatch, i: int = 0) -> PointBatch:
    """Cloud ``i`` of a packed batch as a batch of one (per-cloud or per-point labels sliced alike)."""
    start = 0 if i == 0 else int(batch.offset[i - 1])
    end = int(batch.offset[i])
    label = batch.label
    if label is not None:
        label = label[i:i + 1] if label.shape[0] == batch.num_clouds and label.shape[0] != batch.num_points \
            else label[start:end]
    return PointBatch(batch.coord[start:end], batch.feat[start:end],
                      torch.tensor([end - start], device=batch.offset.device), label=label)


def count_flops(model: nn.Module, batch: PointBatch) -> float:
    """FLOPs of one eval-mode forward pass over ``batch`` as counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(batch)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


# -- memory -----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing cached to hand back this way
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str) -> tuple[float | None, str]:
    """Peak memory that ``fn()`` adds, in MiB, and how it was measured (see the module docstring)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "CUDA max_memory_allocated increase"
    _malloc_trim()
    base = _status_kib("VmRSS")
    if base is None:
        fn()
        return None, "unavailable: no /proc/self/status on this system"
    if _reset_hwm():
        fn()
        peak = _status_kib("VmHWM")
        return max(0, peak - base) / 1024, "peak RSS increase (malloc_trim, VmHWM reset via clear_refs)"
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _status_kib("VmRSS") or 0)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak = max(peak, _status_kib("VmRSS") or 0)
    return max(0, peak - base) / 1024, "peak RSS increase (malloc_trim, VmRSS sampled every 1 ms: lower bound)"


# -- machine load ---------------------------------------------------------------------------------------
def machine_load(before: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"load_avg", "cpu_count"}``: the 1-minute load average now, or the higher of now and ``before``'s.

    Read before and after a probe, the higher reading is kept: a busy spell anywhere in the probe then shows,
    and speeds measured with more runnable threads than CPUs can be flagged as contended. ``cpu_count`` is
    ``os.cpu_count()`` (the machine's CPUs, the scope of the load average, which counts every process of the
    machine), the affinity mask's size where that is unknown. ``load_avg`` is None where the system has none.
    """
    try:
        load: float | None = float(os.getloadavg()[0])
    except (OSError, AttributeError):  # no load average on this system (Windows)
        load = None
    prev = before.get("load_avg") if before else None
    if prev is not None:
        load = max(load, float(prev)) if load is not None else float(prev)
    cores = os.cpu_count()
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = None
    return {"load_avg": load, "cpu_count": cores}


# -- timing -----------------------------------------------------------------------------------------------
def _timed_passes(step: Callable[[PointBatch], object], batches: Sequence[PointBatch], warmup: int,
                  repeats: int, device: torch.device) -> tuple[float, float]:
    """(samples/s, points/s) of ``step`` over ``repeats`` passes through ``batches`` after ``warmup`` passes."""
    for _ in range(warmup):
        for b in batches:
            step(b)
    _sync(device)
    seconds = 0.0
    clouds = points = 0
    for _ in range(repeats):
        for b in batches:
            t0 = time.perf_counter()
            step(b)
            _sync(device)
            seconds += time.perf_counter() - t0
            clouds += b.num_clouds
            points += b.num_points
    return clouds / seconds, points / seconds


def _latency_ms(model: nn.Module, batch: PointBatch, warmup: int, repeats: int, device: torch.device) -> float:
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(batch)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _loss(logits: torch.Tensor, batch: PointBatch, ignore_index: int) -> torch.Tensor:
    if batch.label is None:
        raise ValueError("probe_efficiency: train_batches need labels (PointBatch.label) for the training step")
    return F.cross_entropy(logits.float(), batch.label.long(), ignore_index=ignore_index)


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """torchao logs a warning per CUDA kernel library it cannot load on a CPU-only torch: noise here."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _int8_copy(model: nn.Module) -> tuple[nn.Module | None, str, float]:
    """(quantized copy, status, share of parameters in quantized Linear weights)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None, "unsupported: the model has no nn.Linear layers", 0.0
    try:
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            import torchao  # noqa: F401, PLC0415 - optional at run time, imported only when probing
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: PLC0415
    except Exception as err:  # noqa: BLE001 - any import failure means no int8 path here; say which
        return None, f"unsupported: torchao cannot be imported ({type(err).__name__}: {str(err)[:160]})", 0.0
    total = sum(p.numel() for p in model.parameters())
    share = sum(m.weight.numel() for m in linears) / max(total, 1)
    q = copy.deepcopy(model).eval()
    try:
        quantize_(q, Int8DynamicActivationInt8WeightConfig())
    except Exception as err:  # noqa: BLE001 - torchao has no path for this device / layer type
        return None, f"unsupported: torchao quantize_ failed ({type(err).__name__}: {str(err)[:160]})", share
    return q, "ok", share


def _train_figures(model: nn.Module, batches: list[PointBatch], ignore_index: int, warmup: int, repeats: int,
                   device: torch.device) -> dict[str, Any]:
    """Training speed and peak memory on a copy: the probe must not move the weights or BatchNorm statistics."""
    trainee = copy.deepcopy(model).train()
    opt = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def train_step(b: PointBatch) -> None:
        opt.zero_grad(set_to_none=True)
        _loss(trainee(b), b, ignore_index).backward()
        opt.step()

    sps, pps = _timed_passes(train_step, batches, warmup, repeats, device)
    biggest = max(batches, key=lambda b: b.num_points)
    peak, method = peak_memory_mib(lambda: train_step(biggest), device)
    return {"train_samples_per_s": sps, "train_points_per_s": pps, "train_peak_mib": peak, "memory_method": method}


def probe_efficiency(
    model: nn.Module,
    train_batches: Sequence[PointBatch],
    eval_batches: Sequence[PointBatch],
    *,
    task: str,
    device: torch.device | str,
    score: Callable[[nn.Module, torch.dtype | None], float] | None = None,
    fp32_score: float | None = None,
    ignore_index: int = -1,
    warmup: int = 2,
    repeats: int = 5,
    latency_repeats: int = 10,
    bf16: bool = True,
    int8: bool = True,
) -> dict[str, Any]:
    """Measure one model's cost on ``device`` (see the module docstring); the model is left as it was.

    ``fp32_score``: the model's fp32 score as the caller already measured it (the trainer's final test); then
    ``score`` is called for the bf16 and int8 variants only.
    """
    if task not in ("cls", "seg"):
        raise ValueError(f"probe_efficiency: task={task!r}; use 'cls' or 'seg' (the model config's task)")
    if not train_batches or not eval_batches:
        raise ValueError(f"probe_efficiency: got {len(train_batches)} train and {len(eval_batches)} eval batches; "
                         "give at least one of each")
    if warmup < 0 or repeats < 1 or latency_repeats < 1:
        raise ValueError(f"probe_efficiency: warmup={warmup}, repeats={repeats}, latency_repeats={latency_repeats}; "
                         "need warmup >= 0 and repeats >= 1")
    device = torch.device(device)
    train_b = [b.to(device) for b in train_batches]
    eval_b = [b.to(device) for b in eval_batches]
    was_training = model.training
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {
        "task": task, "device": device.type, "num_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "params": params, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "warmup": warmup, "repeats": repeats, "train_batch_clouds": train_b[0].num_clouds,
        "eval_batch_clouds": eval_b[0].num_clouds, "flops_note": FLOPS_NOTE,
    }
    flops = count_flops(model, eval_b[0])
    out["flops_per_sample"] = flops / eval_b[0].num_clouds
    out["flops_points_per_sample"] = eval_b[0].num_points / eval_b[0].num_clouds

    out.update(_train_figures(model, train_b, ignore_index, warmup, repeats, device))
    gc.collect()

    model.eval()
    try:
        def infer(m: nn.Module, dtype: torch.dtype | None) -> Callable[[PointBatch], object]:
            def step(b: PointBatch) -> object:
                cast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
                with torch.no_grad(), cast:
                    return m(b)
            return step

        out["infer_samples_per_s"], out["infer_points_per_s"] = _timed_passes(
            infer(model, None), eval_b, warmup, repeats, device)
        out["latency_b1_ms"] = _latency_ms(model, single_cloud(eval_b[0]), warmup + 1, latency_repeats, device)
        biggest_eval = max(eval_b, key=lambda b: b.num_points)
        out["infer_peak_mib"], _ = peak_memory_mib(lambda: infer(model, None)(biggest_eval), device)
        if fp32_score is not None:
            base_score: float | None = float(fp32_score)
        else:
            base_score = float(score(model, None)) if score is not None else None
        out["score_fp32"] = base_score
        out["score_fp32_source"] = ("given (the caller's fp32 evaluation)" if fp32_score is not None
                                    else "measured by this probe" if score is not None else None)

        out.update(bf16_status="skipped", bf16_samples_per_s=None, bf16_speedup=None, bf16_score_delta=None)
        if bf16:
            try:
                sps, _ = _timed_passes(infer(model, torch.bfloat16), eval_b, warmup, repeats, device)
                out.update(bf16_status="ok", bf16_samples_per_s=sps, bf16_speedup=sps / out["infer_samples_per_s"])
                if score is not None:
                    out["bf16_score_delta"] = float(score(model, torch.bfloat16)) - base_score
            except RuntimeError as err:  # an op without a bf16 kernel on this device
                out["bf16_status"] = f"failed: {type(err).__name__}: {str(err)[:200]}"

        out.update(int8_status="skipped", int8_method=INT8_METHOD, int8_linear_param_share=None,
                   int8_samples_per_s=None, int8_speedup=None, int8_score_delta=None)
        if int8:
            qmodel, status, share = _int8_copy(model)
            out.update(int8_status=status, int8_linear_param_share=share)
            if qmodel is not None:
                try:
                    sps, _ = _timed_passes(infer(qmodel, None), eval_b, warmup, repeats, device)
                    out.update(int8_samples_per_s=sps, int8_speedup=sps / out["infer_samples_per_s"])
                    if score is not None:
                        out["int8_score_delta"] = float(score(qmodel, None)) - base_score
                except (RuntimeError, NotImplementedError) as err:  # a quantized kernel missing for this device
                    out["int8_status"] = f"unsupported: {type(err).__name__}: {str(err)[:200]}"
                    out["int8_samples_per_s"] = out["int8_speedup"] = None
                del qmodel
    finally:
        model.train(was_training)
    return out
