"""Numerical equivalence against the public pure-torch reference code: same weights, same outputs.

Usage::

    git -C <mirror of yanx27/Pointnet_Pointnet2_pytorch> archive HEAD models | tar -x -C /tmp/yanx27
    git -C <mirror of Strawberry-Eat-Mango/PCT_Pytorch> archive HEAD model.py util.py | tar -x -C /tmp/pct
    python -m benchmarks.eq_reference --yanx27 /tmp/yanx27 --pct /tmp/pct --data /work/shared/data [--out DIR]
    python -m benchmarks.eq_reference --tpc --data /work/shared/data   # torch-pointcloud 0.0.18 + spconv 2.3.8

``--tpc`` compares pcbench's SpUNet and PTv3 (both block chainings) with torch-pointcloud's on a ScanNet crop (scene0000_00, 3 m x 3 m,
2 cm voxels, 5,340 voxels; colour + centred xyz), random weights with BatchNorm / LayerNorm drawn away from their
defaults, eval mode, pinned as tests/models/_tpc.py says (one thread, spconv bias in its train-mode path, PTv3
without flash attention, curve shuffling or z-order, patch 16, torch-pointcloud's serialization depth). It also
measures spconv's CPU thread race: the reference SpUNet run twice on 2 threads against its 1-thread run.
Measured 2026-12-07 on this 2-core CPU (load average 12 from other jobs; timings not reported), max |logit
difference|, ``python -m benchmarks.eq_reference --tpc --data /work/shared/data``::

    pair                                            fp32       fp64       logit scale
    spunet_base_seg vs tpc SpUNet                   0.0        6.9e-17    0.115
    ptv3_seg vs tpc PTv3                            2.0e-06    5.3e-15    3.4
    ptv3_seg xcpe_legacy vs tpc PTv3 legacy=True    1.7e-06    3.3e-15    2.6

    spconv SpUNet on 2 threads vs 1 thread, and run 1 vs run 2 on 2 threads in one process: 4.6e-03 in one
    invocation, 4.2e-03 in the next

The 2-thread reference disagrees with itself from run to run, far above rounding (consistent with a race between
threads in spconv's CPU scatter-add; the stem alone moved by 0.077 at scale 0.88 between two processes), which is why the reference runs on one
thread; there pcbench's SpUNet gives the same float32 bits.

For each pair (yanx27 ``pointnet2_cls_ssg`` -> ``pointnet2_ssg_cls`` with xyz input and with normals, yanx27
``pointnet2_cls_msg`` -> ``pointnet2_msg_cls`` with normals, PCT_Pytorch ``Pct`` -> ``pct_cls``) the script
imports the reference network from the checkout, gives it random weights (its own initialisation, then BatchNorm
running statistics from three train-mode passes over the inputs), saves its state dict the way the reference's
training script does, converts it with :func:`pcbench.models.convert.convert_checkpoint`, loads it with
:func:`pcbench.models.create_model`, and compares on real ModelNet40 objects (1024 points, the first points of
the resampled files, xyz + normals, each cloud in lexicographic order):

- eval mode: log-probabilities (yanx27's models return ``log_softmax``) / logits (PCT), float32 and float64;
- train mode (batch statistics, dropout off on both sides): the cross-entropy gradients of every parameter,
  the reference's put through the converter's own key transforms, as max |difference| / max |gradient|.

Sampling is pinned on both sides: yanx27's farthest point sampling starts at a random point
(``torch.randint``), patched here to start at each cloud's first point, which is where pcbench's FPS starts.
PCT_Pytorch imports ``pointnet2_ops`` (a CUDA extension without a CPU build) for FPS only; the STAND-IN
registered under that name runs ``pcbench.ops.farthest_point_sample`` (tested against the brute-force reference
in tests/ops), which starts at the first point like the CUDA kernel. Everything else runs the reference code as
published.

Measured on this CPU (4 ModelNet40 objects: airplane, chair, sofa, monitor; 1024 points; random weights; reference
checkouts yanx27 @ eb64fe0, PCT_Pytorch @ 0199a3b). "eval": max |log-prob difference|; "grad": max |gradient
difference| / max |gradient| over all parameters (norm: ||difference|| / ||gradient||)::

    pair                   eval fp32  eval fp64  grad fp32 (norm)       grad fp64 (norm)
    pointnet2_ssg xyz      2.4e-07    4.4e-16    1.7e-01 (7.4e-02)      4.1e-12 (5.0e-12)
    pointnet2_ssg normals  2.4e-07    4.4e-16    1.5e-02 (9.1e-03)      1.1e-11 (6.2e-12)
    pointnet2_msg normals  2.4e-07    8.9e-16    1.2e-02 (1.2e-02)      1.6e-12 (1.6e-12)
    pct xyz                2.4e-07    1.6e-08    2.6e-01 (3.0e-01)      2.7e-01 (3.4e-01)

Float64 agrees to rounding everywhere, so the networks compute the same function with the same weights. The
float32 gradients differ by 1-17 %: train-mode BatchNorm over randomly initialised layers divides by small batch
variances and amplifies float32 rounding (pcbench's PointNet++ also applies the first layer before grouping,
``W x_j - W c`` instead of ``W (x_j - c)``, which rounds differently in float32); the eval outputs, which use
running statistics, agree to 2.4e-7.

PCT is exact (fp64 eval 5e-17) on airplane, chair and sofa; on the monitor one second-stage centre meets a
near-tie at its 32nd neighbour that the two kNN implementations resolve differently (a neighbour-selection
difference, not a weight-mapping one: the first-stage centres, neighbourhoods and features agree to 4e-17), which
moves that cloud's eval output by 1.3e-7 and, through train-mode BatchNorm and max-pool routing, the gradients of
the whole batch. On airplane + chair alone, float64 gradients agree to 1e-11 of the largest gradient
(``compare`` with ``N_CLOUDS = 2``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pcbench.io import write_text
from pcbench.models import create_model
from pcbench.models.convert import _TRANSFORMS, Rule, convert_checkpoint
from pcbench.ops import PointBatch, farthest_point_sample
from tests.models._helpers import MODELNET_FILES, modelnet_batch

N_POINTS = 1024
N_CLOUDS = 4


# --------------------------------------------------------------------------------------------- references
def _pinned_fps(fps):
    """yanx27's FPS with its random start pinned to index 0 (pcbench's start)."""

    def run(xyz, npoint):
        zeros = torch.zeros(xyz.shape[0], dtype=torch.long)
        with mock.patch.object(torch, "randint", lambda *a, **k: zeros.clone()):
            return fps(xyz, npoint)

    return run


def _fps_stand_in(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """``pointnet2_ops.pointnet2_utils.furthest_point_sample`` on CPU: [B, N, 3] -> int32 [B, npoint]."""
    b, n, _ = xyz.shape
    offset = torch.arange(1, b + 1) * n
    # in the input's dtype: a float32 FPS on float64 runs picks another centre at a near-tie (the monitor at
    # step 167 here) than pcbench's float64 FPS, which is a sampling difference, not a model difference
    idx = farthest_point_sample(xyz.reshape(-1, 3), offset, n=npoint)
    return (idx.view(b, npoint) - (torch.arange(b) * n).unsqueeze(1)).int()


def _exact_square_distance(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[B, N, M] squared distances as sums of squared differences (no expansion)."""
    return ((src.unsqueeze(2) - dst.unsqueeze(1)) ** 2).sum(-1)


def load_yanx27(root: Path, msg: bool, normals: bool, classes: int) -> nn.Module:
    """yanx27 ``get_model`` from a checkout (``root/models``), FPS start pinned."""
    sys.path.insert(0, str(root / "models"))
    try:
        utils = importlib.import_module("pointnet2_utils")
        utils.farthest_point_sample = _pinned_fps(utils.farthest_point_sample)
        mod = importlib.import_module("pointnet2_cls_msg" if msg else "pointnet2_cls_ssg")
    finally:
        sys.path.pop(0)
    return mod.get_model(classes, normal_channel=normals)


def load_pct(root: Path, classes: int) -> nn.Module:
    """PCT_Pytorch ``Pct`` from a checkout, with the documented FPS stand-in for ``pointnet2_ops``."""
    pkg = types.ModuleType("pointnet2_ops")
    utils = types.ModuleType("pointnet2_ops.pointnet2_utils")
    utils.furthest_point_sample = _fps_stand_in
    pkg.pointnet2_utils = utils
    sys.modules.setdefault("pointnet2_ops", pkg)
    sys.modules.setdefault("pointnet2_ops.pointnet2_utils", utils)
    sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module("model")
        util = importlib.import_module("util")
    finally:
        sys.path.pop(0)
    # util.square_distance expands |a|^2 + |b|^2 - 2 a.b; exact squared differences remove that rounding from
    # the comparison (a near-tie at the k-th neighbour can still resolve differently: see the module docstring)
    util.square_distance = _exact_square_distance
    return mod.Pct(types.SimpleNamespace(dropout=0.5), output_channels=classes)


# --------------------------------------------------------------------------------------------- inputs
def modelnet_objects(data: Path, normals: bool) -> tuple[torch.Tensor, PointBatch]:
    """(reference input [B, 3 (+3), N], the same clouds packed), each cloud sorted by (x, y, z)."""
    batch = modelnet_batch(data, N_POINTS, MODELNET_FILES[:N_CLOUDS])
    xyz = batch.coord.view(N_CLOUDS, N_POINTS, 3)
    nrm = batch.feat.view(N_CLOUDS, N_POINTS, 3)
    order = torch.stack([torch.from_numpy(np.lexsort(c.numpy().T[::-1]).copy()) for c in xyz])
    xyz = torch.stack([c[o] for c, o in zip(xyz, order, strict=True)])
    nrm = torch.stack([c[o] for c, o in zip(nrm, order, strict=True)])
    dense = torch.cat([xyz, nrm], -1) if normals else xyz
    feat = nrm.reshape(-1, 3) if normals else xyz.new_zeros(N_CLOUDS * N_POINTS, 0)
    return dense.transpose(1, 2).contiguous(), PointBatch(xyz.reshape(-1, 3), feat, batch.offset,
                                                          label=batch.label)


# --------------------------------------------------------------------------------------------- comparison
@contextmanager
def _no_dropout(*models: nn.Module):
    saved = [(m, m.p) for net in models for m in net.modules() if isinstance(m, nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p


def _ref_out(ref: nn.Module, dense: torch.Tensor, log_probs: bool) -> torch.Tensor:
    out = ref(dense)
    out = out[0] if isinstance(out, tuple) else out
    return out if log_probs else F.log_softmax(out, -1)


def compare(ref: nn.Module, source: str, config: str, dense: torch.Tensor, batch: PointBatch, tmp: Path,
            log_probs: bool) -> dict[str, float]:
    """Max differences of log-probabilities (eval) and of the gradients (train), float32 and float64."""
    torch.manual_seed(0)
    with torch.no_grad():  # BatchNorm running statistics from real inputs, not the initial (0, 1)
        ref.train()
        for _ in range(3):
            ref(dense)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}  # frozen: train passes below update buffers
    src = tmp / f"{config}.{source}.pth"
    if source == "yanx27":
        torch.save({"epoch": 0, "instance_acc": np.float64(0.0), "model_state_dict": sd}, src)
    else:
        torch.save({f"module.{k}": v for k, v in sd.items()}, src)  # nn.DataParallel, as main.py saves
    state = convert_checkpoint(src, source, config)
    dst = tmp / f"{config}.{source}.pt"
    torch.save(state, dst)
    in_channels, classes = state["in_channels"], state["num_classes"]
    out: dict[str, float] = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        # yanx27's FPS allocates its distance buffer in the default dtype, so float64 runs need it as default
        torch.set_default_dtype(dtype)
        ours = create_model(config, in_channels, classes, weights=dst).to(dtype)
        ref.load_state_dict(sd)
        ref.to(dtype)
        b = PointBatch(batch.coord.to(dtype), batch.feat.to(dtype), batch.offset)
        d = dense.to(dtype)
        ours.eval()
        ref.eval()
        with torch.no_grad():
            a, r = F.log_softmax(ours(b), -1), _ref_out(ref, d, log_probs)
        out[f"eval_{tag}"] = float((a - r).abs().max())
        ours.train()
        ref.train()
        ours.zero_grad()
        ref.zero_grad()
        with _no_dropout(ours, ref):
            F.nll_loss(F.log_softmax(ours(b), -1), batch.label).backward()
            F.nll_loss(_ref_out(ref, d, log_probs), batch.label).backward()
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        own = dict(ours.named_parameters())
        pairs = [(own[dst_].grad, _TRANSFORMS[how](ref_params[src_].grad, Rule(src_, dst_, how)))
                 for src_, dst_, how in state["source"]["mapping"] if dst_ in own and how != "duplicate"]
        scale = max(float(g.abs().max()) for _, g in pairs)
        out[f"grad_{tag}_rel"] = max(float((g - h).abs().max()) for g, h in pairs) / scale
        diff = torch.cat([(g - h).flatten() for g, h in pairs])
        out[f"grad_{tag}_norm_rel"] = float(diff.norm() / torch.cat([h.flatten() for _, h in pairs]).norm())
        out["params_compared"] = len(pairs)
    torch.set_default_dtype(torch.float32)
    return out


def compare_tpc(data: Path, out: Path) -> list[dict[str, float | str]]:
    """SpUNet and PTv3 against torch-pointcloud (max |logit difference|, fp32 and fp64) and spconv's thread race."""
    import safetensors.torch as st  # noqa: PLC0415 - reference tier only
    from torch_pointcloud.models import create_model as tpc_create_model  # noqa: PLC0415

    from tests.models._tpc import (  # noqa: PLC0415
        one_thread,
        ptv3_overrides,
        randomise_norms,
        scene_voxels,
        spconv_train_mode_bias,
        tpc_forward,
        tpc_ptv3,
    )

    grid, feat, batch = scene_voxels(data)
    rows: list[dict[str, float | str]] = []
    pairs = (("spunet_base_seg", False, lambda: tpc_create_model("spunet-v1m1.scannet20.pointcept",
                                                                  pretrained=False)),
             ("ptv3_seg", False, tpc_ptv3), ("ptv3_seg", True, lambda: tpc_ptv3(legacy=True)))
    for config, legacy, build in pairs:
        torch.manual_seed(0)
        ref = spconv_train_mode_bias(randomise_norms(build()))
        src = out / f"{config}.tpc.safetensors"
        st.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src))
        dst = out / f"{config}.tpc.pt"
        torch.save(convert_checkpoint(src, "torch-pointcloud", config), dst)
        extra = ptv3_overrides(grid, legacy) if config == "ptv3_seg" else {}
        ours = create_model(config, 6, 20, weights=dst, **extra).eval()
        name = f"{config}{' xcpe_legacy' if legacy else ''} vs torch-pointcloud"
        row: dict[str, float | str] = {"pair": name, "voxels": int(grid.shape[0])}
        for dtype, tag in ((torch.float32, "fp32"), (torch.float64, "fp64")):
            ref.to(dtype)
            ours.to(dtype)
            with one_thread(), torch.no_grad():
                want = tpc_forward(ref, grid, feat.to(dtype))
                got = ours(PointBatch(batch.coord.to(dtype), batch.feat.to(dtype), batch.offset))
            row[f"eval_{tag}"] = float((got - want).abs().max())
            row["scale"] = float(want.abs().max())
        if config == "spunet_base_seg":
            ref.float()
            saved = torch.get_num_threads()
            torch.set_num_threads(2)
            try:
                with torch.no_grad():
                    runs = [tpc_forward(ref, grid, feat) for _ in range(2)]
            finally:
                torch.set_num_threads(saved)
            with one_thread(), torch.no_grad():
                single = tpc_forward(ref, grid, feat)
            row["spconv_2threads_vs_1"] = max(float((r - single).abs().max()) for r in runs)
            row["spconv_2threads_run1_vs_run2"] = float((runs[0] - runs[1]).abs().max())
        rows.append(row)
        print(", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run every pair whose checkout is given; print and write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--yanx27", type=Path, help="checkout of yanx27/Pointnet_Pointnet2_pytorch (with models/)")
    p.add_argument("--pct", type=Path, help="checkout of Strawberry-Eat-Mango/PCT_Pytorch (model.py, util.py)")
    p.add_argument("--tpc", action="store_true", help="SpUNet and PTv3 against torch-pointcloud 0.0.18 + spconv "
                   "(needs scannet/ under --data)")
    p.add_argument("--data", type=Path, required=True, help="folder holding modelnet40/modelnet40_normal_resampled")
    p.add_argument("--out", type=Path, default=Path("eq_reference"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list = []
    if args.tpc:
        if not (args.data / "scannet").is_dir():
            print(f"error: no scannet under --data {args.data}", file=sys.stderr)
            return 2
        rows += compare_tpc(args.data, args.out)
        if not (args.yanx27 or args.pct):
            write_text(args.out / "eq_reference.json", json.dumps(rows, indent=2) + "\n")
            return 0
    if not (args.data / "modelnet40").is_dir():
        print(f"error: no modelnet40 under --data {args.data}", file=sys.stderr)
        return 2
    cases = []
    if args.yanx27:
        cases += [("pointnet2_ssg xyz", lambda: load_yanx27(args.yanx27, False, False, 40), "yanx27",
                   "pointnet2_ssg_cls", False, True),
                  ("pointnet2_ssg normals", lambda: load_yanx27(args.yanx27, False, True, 40), "yanx27",
                   "pointnet2_ssg_cls", True, True),
                  ("pointnet2_msg normals", lambda: load_yanx27(args.yanx27, True, True, 40), "yanx27",
                   "pointnet2_msg_cls", True, True)]
    if args.pct:
        cases += [("pct xyz", lambda: load_pct(args.pct, 40), "pct_pytorch", "pct_cls", False, False)]
    if not cases:
        print("error: give --yanx27, --pct and/or --tpc", file=sys.stderr)
        return 2
    for name, build, source, config, normals, log_probs in cases:
        torch.manual_seed(0)
        ref = build()
        dense, batch = modelnet_objects(args.data, normals)
        res = compare(ref, source, config, dense, batch, args.out, log_probs)
        rows.append({"pair": name, **res})
        print(f"{name:24s} eval fp32 {res['eval_fp32']:.2e}  eval fp64 {res['eval_fp64']:.2e}  "
              f"grad fp32 {res['grad_fp32_rel']:.2e} (norm {res['grad_fp32_norm_rel']:.2e})  "
              f"grad fp64 {res['grad_fp64_rel']:.2e} (norm {res['grad_fp64_norm_rel']:.2e})  "
              f"({res['params_compared']} parameters)", flush=True)
    write_text(args.out / "eq_reference.json", json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
