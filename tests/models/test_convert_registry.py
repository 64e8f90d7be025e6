"""The published-checkpoint registry, ``pcbench-weights`` and ``pcbench-convert``: downloads through pooch from a
local ``file://`` URL (hash-checked), the offline ``file=`` path, and the errors a user can meet."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pcbench.cli import convert as convert_cli
from pcbench.cli import weights as weights_cli
from pcbench.models import create_model, list_models
from pcbench.models import zoo_registry as reg
from pcbench.models.convert import CONVERTERS, SOURCES, file_sha256
from pcbench.train.config import config_dir
from tests.models.test_convert import _PointNet2Ref, _randomise


@pytest.fixture
def yanx27_file(tmp_path: Path) -> Path:
    """A checkpoint in yanx27's layout (xyz-only SSG, 40 classes) with random weights."""
    path = tmp_path / "best_model.pth"
    torch.save({"epoch": 1, "model_state_dict": _randomise(_PointNet2Ref(False, False, 40), 3).state_dict()}, path)
    return path


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, yanx27_file: Path):
    """The yanx27 SSG entry pointed at the local file (right hash), and a copy with a wrong hash."""
    entry = replace(reg.PUBLISHED["pointnet2_ssg_cls.modelnet40.yanx27"], url=yanx27_file.as_uri(),
                    sha256=file_sha256(yanx27_file))
    bad = replace(entry, name="bad-hash", sha256="0" * 64)
    monkeypatch.setitem(reg.PUBLISHED, entry.name, entry)
    monkeypatch.setitem(reg.PUBLISHED, bad.name, bad)
    monkeypatch.setenv("PCBENCH_WEIGHTS", str(tmp_path / "cache"))
    return entry


def test_every_entry_is_complete_and_names_a_real_model_config() -> None:
    assert len(reg.PUBLISHED) >= 4
    for name, w in reg.PUBLISHED.items():
        assert w.name == name and w.model_config in list_models(), name
        assert w.url.startswith("https://") and w.dataset and w.licence and w.metric and w.protocol, name
        assert w.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", w.sha256), name
        assert 0 < w.value <= 100 and re.search(r"@ [0-9a-f]{7}", w.reference), name  # pinned source
        assert w.convertible == ((w.source, w.model_config) in CONVERTERS), name
        assert (config_dir() / "data" / f"{w.dataset}.yaml").is_file(), name  # a pcbench data config
    assert {w.source for w in reg.PUBLISHED.values() if w.convertible} == set(SOURCES) - {"pointcept"}  # no file URL yet


def test_fetch_downloads_with_the_hash_checked_and_converts(registered, tmp_path: Path, yanx27_file: Path) -> None:
    pytest.importorskip("pooch")
    out = reg.fetch_weights(registered.name)
    assert out.parent == tmp_path / "cache" and out.is_file()
    state = torch.load(out, weights_only=True)
    assert state["source"]["sha256"] == file_sha256(yanx27_file) and state["published"]["value"] == 92.2
    assert state["model_config"] == "pointnet2_ssg_cls" and state["in_channels"] == 0
    model = create_model("pointnet2_ssg_cls", 0, 40, weights=registered.name)  # by name: from the cache
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state["model"].items())
    with pytest.raises(ValueError, match="does not match the registered sha256"):
        reg.fetch_weights("bad-hash")


def test_offline_users_pass_the_file_they_have(registered, tmp_path: Path, yanx27_file: Path) -> None:
    out = reg.fetch_weights(registered.name, file=yanx27_file, folder=tmp_path / "here")
    assert out == tmp_path / "here" / f"{registered.name}.pt"
    assert torch.load(out, weights_only=True)["source"]["file"] == "best_model.pth"
    other = tmp_path / "other.pth"
    torch.save({"model_state_dict": _PointNet2Ref(False, False, 40).state_dict()}, other)
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} differs from the registered"):
        reg.fetch_weights(registered.name, file=other)
    with pytest.raises(ValueError, match="does not exist"):
        reg.fetch_weights(registered.name, file=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match=r"no published checkpoint named 'nope'"):
        reg.fetch_weights("nope")
    # Pointcept's PTv3 entry points at a Hugging Face folder: listed, converted by hand from the file inside
    with pytest.raises(ValueError, match=r"no converter from Pointcept \(a Hugging Face folder.* to ptv3_seg"):
        reg.fetch_weights("ptv3_seg.scannet20.pointcept")
    assert reg.PUBLISHED["minkunet34c_seg.scannet20.minkowski"].convertible


def test_weights_cli_lists_and_fetches(registered, capsys: pytest.CaptureFixture, yanx27_file: Path,
                                       tmp_path: Path) -> None:
    assert weights_cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in reg.PUBLISHED) and "listed only (no converter yet)" in listed
    assert weights_cli.main(["fetch", registered.name, f"file={yanx27_file}", f"dir={tmp_path / 'd'}"]) == 0
    assert (tmp_path / "d" / f"{registered.name}.pt").is_file()
    assert weights_cli.main(["fetch", "nope"]) == 2
    assert "no published checkpoint named 'nope'" in capsys.readouterr().err
    assert weights_cli.main(["get", "x"]) == 2


def test_convert_cli_writes_a_weights_only_checkpoint(capsys: pytest.CaptureFixture, yanx27_file: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "sub" / "ours.pt"
    argv = [f"src={yanx27_file}", "source=yanx27", "model=pointnet2_ssg_cls", f"out={out}"]
    assert convert_cli.main(argv) == 0
    assert "in_channels=0, num_classes=40" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["source"]["kind"] == "yanx27"
    assert convert_cli.main([f"src={yanx27_file}", "source=yanx27", "model=pointnet2_msg_cls", f"out={out}"]) == 2
    assert "shape mismatch: source 'sa1.mlp_convs.0.weight' (64, 3, 1, 1)" in capsys.readouterr().err
    assert convert_cli.main([f"src={yanx27_file}", "source=yanx27"]) == 2
    assert "missing model=, out=" in capsys.readouterr().err
    assert convert_cli.main(["list"]) == 0
    assert "pct_pytorch  -> pct_cls" in capsys.readouterr().out
