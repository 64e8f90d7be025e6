"""Evaluation fidelity: TTA passes through one loader (bounded workers), progress on the log, workers that die
with their parent."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pcbench.data import ModelNetDataset, seed_worker
from pcbench.data.transforms import rotation_matrix
from pcbench.ops import PointBatch
from pcbench.train import compose
from pcbench.train.config import check_recipe_data, preflight
from pcbench.train.data import collate_eval, eval_loader, eval_transform, pass_loader
from pcbench.train.errors import ConfigError
from pcbench.train.evaluation import EvalProgress, autocast_context, eval_precision, evaluate_loaders

REPO = Path(__file__).resolve().parents[2]


class _Clouds(Dataset):
    """Deterministic object clouds; pass ``shift`` plays a TTA transform; every read appends its pid to a file."""

    def __init__(self, n: int, shift: float, pid_file: Path | None = None) -> None:
        self.n, self.shift, self.pid_file = n, shift, pid_file

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.pid_file is not None:
            with open(self.pid_file, "a") as f:  # O_APPEND: lines of concurrent workers do not interleave
                f.write(f"{os.getpid()}\n")
        rng = np.random.default_rng(i)
        coord = rng.normal(size=(16, 3)).astype(np.float32) + self.shift
        return {"coord": coord, "feat": coord.copy(), "label": i % 3, "name": f"obj{i:03d}"}


class _MeanLinear(nn.Module):
    """Logits = linear(mean feature of each cloud): position-sensitive, so each shifted pass scores differently."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 3)

    def forward(self, b: PointBatch) -> torch.Tensor:
        ends = b.offset.tolist()
        means = [b.feat[s:e].mean(0) for s, e in zip([0, *ends[:-1]], ends, strict=True)]
        return self.fc(torch.stack(means))


def _loader(ds: Dataset, bs: int, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=bs, shuffle=False, num_workers=workers, collate_fn=collate_eval,
                      worker_init_fn=seed_worker)


SHIFTS = [0.0, 0.5, -0.7, 1.3, 2.0]


def test_tta_passes_share_one_worker_pool(tmp_path: Path) -> None:
    # regression: zip(*loaders) started num_workers processes per TTA pass (5 passes x 2 = 10 here)
    pids = tmp_path / "pids.txt"
    loaders = [_loader(_Clouds(7, s, pids), 3, 2) for s in SHIFTS]
    res = evaluate_loaders(_MeanLinear(), loaders, "cls", 3, -1, torch.device("cpu"), keep_predictions=True,
                           progress=False)
    readers = {int(x) for x in pids.read_text().split()}
    assert os.getpid() not in readers and len(readers) <= 2, readers
    assert len(pids.read_text().split()) == 7 * len(SHIFTS)  # every sample of every pass read exactly once
    # the same votes as summing each pass's logits by hand
    model = _MeanLinear().eval()
    with torch.no_grad():
        want = sum(model(collate_eval([_Clouds(7, s)[i] for i in range(7)]).batch) for s in SHIFTS)
    assert res.names == [f"obj{i:03d}" for i in range(7)] and res.samples == 7
    np.testing.assert_array_equal(np.concatenate(res.preds), want.argmax(-1).numpy())


def test_pass_loader_order_and_alignment() -> None:
    loaders = [_loader(_Clouds(5, s), 2, 0) for s in SHIFTS[:3]]
    got = list(pass_loader(loaders))
    # batch 0 of passes 0, 1, 2, then batch 1 of each, ... (a last short batch too)
    assert [eb.names for eb in got] == [["obj000", "obj001"]] * 3 + [["obj002", "obj003"]] * 3 + [["obj004"]] * 3
    for k, eb in enumerate(got):
        first = int(eb.names[0][3:])
        want = _Clouds(5, SHIFTS[k % 3])[first]["coord"]
        np.testing.assert_array_equal(eb.batch.coord[:16].numpy(), want)
    assert len(pass_loader(loaders)) == 9
    with pytest.raises(ValueError, match="TTA pass 1 has 4 samples"):
        pass_loader([loaders[0], _loader(_Clouds(4, 0.0), 2, 0)])
    with pytest.raises(ValueError, match="in-order evaluation loaders only"):
        pass_loader([DataLoader(_Clouds(5, 0.0), batch_size=2, shuffle=True, collate_fn=collate_eval)])


def test_evaluation_logs_progress_with_passes_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    # regression: evaluate_loaders printed nothing until the end (no caller passed `progress`)
    loaders = [_loader(_Clouds(5, s), 2, 0) for s in SHIFTS[:2]]
    with caplog.at_level(logging.INFO, logger="pcbench.train"):
        evaluate_loaders(_MeanLinear(), loaders, "cls", 3, -1, torch.device("cpu"), desc="test vote")
    lines = [r.getMessage() for r in caplog.records if r.name == "pcbench.train"]
    assert lines[0].startswith("test vote 0/5 samples (batch 1/3: pass 1/2)") and "eta" in lines[0]
    assert lines[1].startswith("test vote 2/5 samples (1/3 batches, 2 passes)") and "eta" in lines[1]
    assert lines[-1].startswith("test vote 5/5 samples (3/3 batches, 2 passes)") and lines[-1].endswith("eta 0s")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pcbench.train"):
        evaluate_loaders(_MeanLinear(), loaders[:1], "cls", 3, -1, torch.device("cpu"), progress=False)
    assert not caplog.records
    prog = EvalProgress("val", every_s=0)
    with caplog.at_level(logging.INFO, logger="pcbench.train"):
        evaluate_loaders(_MeanLinear(), loaders[:1], "cls", 3, -1, torch.device("cpu"), progress=prog)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["val 2/5 samples", "val 4/5 samples",
                                                                       "val 5/5 samples"]


def test_one_long_sample_logs_each_pass_with_an_eta(caplog: pytest.LogCaptureFixture) -> None:
    # one ScanNet scene x 13 TTA passes is one batch: progress per sample alone stays silent until the end
    loaders = [_loader(_Clouds(1, s), 1, 0) for s in SHIFTS[:3]]
    prog = EvalProgress("test vote", every_s=0)
    with caplog.at_level(logging.INFO, logger="pcbench.train"):
        evaluate_loaders(_MeanLinear(), loaders, "cls", 3, -1, torch.device("cpu"), progress=prog)
    lines = [r.getMessage() for r in caplog.records if r.name == "pcbench.train"]
    assert [ln.split(")")[0] for ln in lines] == ["test vote 0/1 samples (batch 1/1: pass 1/3",
                                                  "test vote 0/1 samples (batch 1/1: pass 2/3",
                                                  "test vote 1/1 samples (1/1 batches, 3 passes"]
    assert all("eta" in ln for ln in lines) and lines[-1].endswith("eta 0s")


_HANG = """
import os, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from pcbench.data import ModelNetDataset, seed_worker
from pcbench.data.transforms import rotation_matrix

class Slow(Dataset):
    def __len__(self):
        return 1000
    def __getitem__(self, i):
        with open(sys.argv[1], "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(60)
        return i

for _ in DataLoader(Slow(), batch_size=1, num_workers=2, worker_init_fn=seed_worker):
    pass
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has died
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_loader_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    # regression: a trainer killed mid-evaluation (OOM killer) left its forked workers holding their memory
    pids = tmp_path / "pids.txt"
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(_HANG))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(script), str(pids)], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (pids.is_file() and len(set(pids.read_text().split())) >= 2):
            time.sleep(0.1)
        workers = {int(x) for x in pids.read_text().split()}
        assert len(workers) == 2 and all(_alive(w) for w in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers)


@pytest.mark.parametrize("experiment", ["ptv3_scannet20", "ptv3_scannet200", "minkunet34c_scannet20", None])
def test_evaluation_runs_in_fp32_unless_told(experiment: str | None, tmp_path: Path) -> None:
    # regression: evaluation ran under the training precision (fp16 for PTv3) where Pointcept's tester is fp32
    extra = [f"experiment={experiment}"] if experiment else []
    cfg = compose([*extra, "trainer=gpu"], run_dir=tmp_path)
    assert eval_precision(cfg, "fp16") == "fp32"
    assert eval_precision(compose([*extra, "eval.autocast=train"], run_dir=tmp_path), "bf16") == "bf16"
    assert eval_precision(compose([*extra, "eval.autocast=bf16"], run_dir=tmp_path), "fp32") == "bf16"
    with pytest.raises(ConfigError, match="eval.autocast='half' is unknown"):
        eval_precision(compose([*extra, "eval.autocast=half"], run_dir=tmp_path), "fp32")
    with pytest.raises(ValueError, match="resolve eval.autocast, which may say `train`, with eval_precision"):
        autocast_context(torch.device("cpu"), "train")


def _tta_loaders(cfg: Any, ds: Dataset) -> list[DataLoader]:
    import hydra

    out = []
    for node in cfg.tta.passes:
        passed = copy.copy(ds)
        passed.transform = eval_transform(cfg, hydra.utils.instantiate(node))
        out.append(eval_loader(passed, cfg))
    return out


def test_pointnet2_votes_shuffle_points_per_vote_seeded(prepared: dict[str, Path], tmp_path: Path) -> None:
    # regression: the votes only rotated, in one point order, so FPS (which starts at the first point) picked
    # the same centres in all 12 votes; charlesq34/pointnet2 evaluate.py shuffles the order at every vote
    cfg = compose(["experiment=pointnet2_ssg_modelnet40", f"data.root={prepared['mn40_syn']}",
                   "trainer.num_workers=0", "trainer.batch_size=4"], run_dir=tmp_path)
    plain = ModelNetDataset(prepared["mn40_syn"], "test", transform=eval_transform(cfg), use_normals=False,
                            feat_keys=())
    loaders = _tta_loaders(cfg, plain)
    assert len(loaders) == 12
    batches = list(pass_loader(loaders))
    first = [eb.batch.coord[:1024].numpy() for eb in batches[:12]]  # object 0 in each of the 12 votes
    ref = plain[0]["coord"]
    assert ref.shape == (1024, 3)
    orders = []
    for k, pts in enumerate(first):
        back = pts @ rotation_matrix((0, 1, 0), k / 12 * 2 * np.pi).astype(np.float32)  # undo the rotation
        # the same 1024 points (the first of the stored cloud), in another order
        dist = ((back[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
        match = dist.argmin(1)
        assert np.allclose(dist.min(1), 0, atol=1e-8) and len(np.unique(match)) == 1024
        orders.append(match)
    assert len({o[:16].tobytes() for o in orders}) == 12  # 12 different orders, so 12 different FPS starts
    again = list(pass_loader(_tta_loaders(cfg, plain)))
    for a, b in zip(batches, again, strict=True):  # seeded: the same votes on every evaluation
        torch.testing.assert_close(a.batch.coord, b.batch.coord, rtol=0, atol=0)


def test_random_tta_passes_draw_different_numbers(prepared: dict[str, Path], tmp_path: Path) -> None:
    # regression: every pass of a sample drew from the same generator, so scale_vote10's nine random scales
    # were one scale counted nine times
    cfg = compose([f"data.root={prepared['mn40_syn']}", "tta=scale_vote10", "trainer.num_workers=0",
                   "trainer.batch_size=2"], run_dir=tmp_path)
    plain = ModelNetDataset(prepared["mn40_syn"], "test", transform=eval_transform(cfg))
    batches = list(pass_loader(_tta_loaders(cfg, plain)))[:10]
    ref = plain[0]["coord"]
    scales = [tuple(np.round(np.ptp(eb.batch.coord[:1024].numpy(), 0) / np.ptp(ref, 0), 6)) for eb in batches]
    assert scales[0] == (1.0, 1.0, 1.0) and len(set(scales[1:])) == 9
    assert all(0.8 - 1e-6 <= s <= 1.2 + 1e-6 for sc in scales for s in sc)


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def test_recipe_data_mismatch_is_reported_with_the_fix(prepared: dict[str, Path], tmp_path: Path) -> None:
    # regression: a PointNet++ run on normal_resampled with FPS sampling was recorded `fidelity: reference`
    root = prepared["mn40_syn"]  # normal_resampled, sampling=fps, normals=true
    cfg = compose(["experiment=pointnet2_ssg_modelnet40", f"data.root={root}"], run_dir=tmp_path)
    problems = check_recipe_data(cfg, _manifest(root))
    assert len(problems) == 3, problems
    assert any("source='ply_hdf5_2048'" in p and "has source='normal_resampled'" in p for p in problems)
    assert any("options.sampling='first'" in p and "re-prepare with `sampling=first`" in p for p in problems)
    assert any("options.normals=False" in p and "re-prepare with `normals=false`" in p for p in problems)
    good = {**_manifest(root), "source": "ply_hdf5_2048",
            "options": {**_manifest(root)["options"], "sampling": "first", "normals": False}}
    assert check_recipe_data(cfg, good) == []
    assert check_recipe_data(compose([f"data.root={root}"], run_dir=tmp_path), _manifest(root)) == []  # no recipe


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_recipe_declares_real_manifest_fields(experiment: str, prepared: dict[str, Path],
                                                   tmp_path: Path) -> None:
    cfg = compose([f"experiment={experiment}"], run_dir=tmp_path)
    kind = {"modelnet40": "mn40_syn", "scannet": "scannet_syn", "scanobjectnn": "sonn_syn"}
    root = prepared[next(v for k, v in kind.items() if str(cfg.data.name).startswith(k))]
    manifest = _manifest(root)
    assert cfg.recipe.data, f"{experiment}: declare recipe.data (the prepared-data options of its source)"
    for field in cfg.recipe.data:
        have: Any = manifest
        for part in str(field).split("."):
            have = have.get(part) if isinstance(have, dict) else None
        assert have is not None, f"{experiment}: recipe.data.{field} is not a manifest field of {root.name}"


def _overrides(problems: list[str]) -> list[str]:
    return [o for p in problems for o in p.split(" -> ")[1].split(" ")[:1]]


def test_preflight_lists_every_problem_with_its_override(tmp_path: Path) -> None:
    # regression: a recipe on a few samples / a CPU stopped on one problem per run (five rounds)
    manifest = {"splits": {"train": {"num_samples": 1}, "val": {"num_samples": 0}}}
    cfg = compose(["experiment=ptv3_scannet20", "data.root=/data/few"], run_dir=tmp_path)
    problems = preflight(cfg, manifest, cuda_available=False)
    assert len(problems) == 5, problems
    assert problems[0].startswith("data.splits.val=val holds no samples in data.root=/data/few")
    assert problems[1].startswith("data.splits.test=val holds no samples")
    assert "trainer.batch_size=12 exceeds the 8 training samples" in problems[2]  # 1 scene x loop 8
    assert "trainer.device_batch_size=3 does not divide the global batch of 8" in problems[3]
    assert "trainer.precision=fp16 needs a CUDA device" in problems[4]
    fixed = _overrides(problems)
    assert fixed == ["data.splits.val=train", "data.splits.test=train", "trainer.batch_size=8",
                     "trainer.device_batch_size=2", "trainer.precision=bf16"]
    assert preflight(compose(["experiment=ptv3_scannet20", "data.root=/data/few", *fixed], run_dir=tmp_path),
                     manifest, cuda_available=False) == []
    on_gpu = compose(["experiment=ptv3_scannet20", "data.root=/data/few", "trainer=gpu"], run_dir=tmp_path)
    assert preflight(on_gpu, manifest, cuda_available=True) == problems[:4]  # fp16 is fine on a CUDA device


def test_preflight_objects_empty_holdout_missing_test_and_cuda(tmp_path: Path) -> None:
    manifest = {"splits": {"train": {"files": [{"num_samples": 1}, {"num_samples": 0}]}}}
    cfg = compose(["experiment=pointnet2_ssg_modelnet40", "data.root=/data/one", "trainer=gpu"], run_dir=tmp_path)
    problems = preflight(cfg, manifest, cuda_available=False)
    assert [p.split(" -> ")[1] for p in problems] == ["data.splits.test=train",
                                                      "data.splits.val=train (validate on the training samples)",
                                                      "trainer.batch_size=1", "trainer=cpu"]
    assert "is not a split of data.root=/data/one" in problems[0]
    fixed = _overrides(problems)
    assert preflight(compose(["experiment=pointnet2_ssg_modelnet40", "data.root=/data/one", "trainer=gpu", *fixed],
                             run_dir=tmp_path), manifest, cuda_available=False) == []
