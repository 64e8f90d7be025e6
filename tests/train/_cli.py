"""Helpers of the trainer tests: tiny model overrides, prepared folders made with the real preparer, CLI runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

#: small versions of each model family (same code paths, a few thousand parameters)
TINY: dict[str, list[str]] = {
    "pointnet2_ssg_cls": ["model.num_samples=[32,8]", "model.radii=[[0.3],[0.6]]", "model.max_neighbors=[[8],[8]]",
                          "model.widths=[[[8,8,16]],[[16,16,32]]]", "model.global_widths=[32,32,64]",
                          "model.head_hidden=[32,16]"],
    "pct_cls": ["model.embed_channels=[16,32,32]", "model.num_samples=[32,16]", "model.k=8", "model.depth=1",
                "model.fuse_channels=64", "model.head_hidden=[32,16]"],
    "ptv1_cls": ["model.channels=[8,16,16,32,32]", "model.depths=[1,1,1,1,1]", "model.neighbors=[8,8,8,8,8]",
                 "model.share_planes=4", "model.head_hidden=[16,16]"],
    "ptv2_cls": ["model.patch_embed_channels=16", "model.patch_embed_groups=2", "model.enc_depths=[1,1,1,1]",
                 "model.enc_channels=[16,16,32,32]", "model.enc_groups=[2,2,4,4]",
                 "model.grid_sizes=[0.1,0.2,0.4,0.8]", "model.drop_path=0.0", "model.cls_head_channels=[16]"],
    "ptv3_cls": ["model.enc_depths=[1,1,1,1,1]", "model.enc_channels=[16,16,32,32,64]",
                 "model.enc_num_heads=[1,1,2,2,4]", "model.enc_patch_size=[48,48,48,48,48]", "model.grid_size=0.04",
                 "model.drop_path=0.0", "model.cls_head_channels=[16]"],
    "sparse_resnet_cls": ["model.planes=[8,8,16,16]", "model.init_dim=8", "model.voxel_size=0.1"],
    "pointnet2_ssg_seg": ["model.widths=[[[8,8,16]],[[16,16,16]],[[16,16,32]],[[32,32,32]]]",
                          "model.fp_widths=[[32,32],[32,32],[32,16],[16,16,16]]", "model.head_hidden=[16]",
                          "model.max_neighbors=[[8],[8],[8],[8]]"],
    "ptv1_seg": ["model.channels=[8,16,16,32,32]", "model.depths=[1,1,1,1,1]", "model.neighbors=[8,8,8,8,8]",
                 "model.share_planes=4", "model.decoder_depths=[1,1,1,1,1]"],
    "ptv2_seg": ["model.patch_embed_channels=16", "model.patch_embed_groups=2", "model.enc_depths=[1,1,1,1]",
                 "model.enc_channels=[16,16,32,32]", "model.enc_groups=[2,2,4,4]", "model.dec_channels=[16,16,16,32]",
                 "model.dec_groups=[2,2,2,4]", "model.grid_sizes=[0.08,0.16,0.32,0.64]", "model.drop_path=0.0"],
    "ptv3_seg": ["model.enc_depths=[1,1,1,1,1]", "model.enc_channels=[16,16,32,32,64]",
                 "model.enc_num_heads=[1,1,2,2,4]", "model.enc_patch_size=[48,48,48,48,48]",
                 "model.dec_depths=[1,1,1,1]", "model.dec_channels=[16,16,32,32]", "model.dec_num_heads=[1,1,2,2]",
                 "model.dec_patch_size=[48,48,48,48]", "model.grid_size=0.04", "model.drop_path=0.0"],
    "minkunet14a_seg": ["model.planes=[8,8,8,8,8,8,8,8]", "model.init_dim=8", "model.conv1_kernel_size=3"],
    "spunet_base_seg": ["model.base_channels=8", "model.channels=[8,8,8,8,8,8,8,8]", "model.layers=[1,1,1,1,1,1,1,1]"],
}

#: settings of a tiny, fast run (single process, in-process data loading)
FAST = ["trainer.num_workers=0", "trainer.max_steps=2", "trainer.max_epochs=2", "logger.log_every_n_steps=1",
        "trainer.threads=1"]
SCENE = ["data.train_max_points=6000", "data.grid_size=0.05"]


def env() -> dict[str, str]:
    """Environment of a CLI subprocess: one thread each (the machine is shared), no inherited allocator vars."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    e.update({"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    return e


def run(args: list[str], cwd: Path, timeout: float = 600, check: bool = True, tool: str = "pcbench-train"
        ) -> subprocess.CompletedProcess:
    """Run a console script of this venv from ``cwd`` (not the repo) and return the completed process."""
    p = subprocess.run([str(BIN / tool), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\n"
                             f"stderr:\n{p.stderr[-4000:]}")
    return p


def prep(dataset: str, out: Path, raw: str | Path = "synthetic", *options: str) -> Path:
    """Prepare ``dataset`` into ``out`` with the real ``pcbench-prep`` command line."""
    p = subprocess.run([str(BIN / "pcbench-prep"), dataset, f"raw={raw}", f"out={out}", "--workers", "1", *options],
                       env=env(), capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"pcbench-prep {dataset} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return out


def metrics(run_dir: Path) -> dict[str, Any]:
    """The run's metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text())


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a prepared folder (tests never write under the shared fixtures)."""
    shutil.copytree(src, dst)
    return dst
