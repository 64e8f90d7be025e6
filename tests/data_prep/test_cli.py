"""pcbench-prep command line: help, option parsing, --check, exit codes, --verify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import cli
from data_prep import synthetic_objects as S

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_raw")
    S.write_modelnet_normal_resampled(root, train=1, test=1, seed=0, points=300)
    S.write_scanobjectnn(root / "so", train=1, test=1, seed=0, variants=("OBJ_BG",))
    return root


def test_top_level_help_lists_datasets(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("scannet", "scanobjectnn", "modelnet40", "modelnet10"):
        assert name in out
    assert cli.main([]) == 2


@pytest.mark.parametrize("dataset", list(cli.DATASETS))
def test_dataset_help_explains_every_option(dataset, capsys):
    assert cli.main([dataset, "--help"]) == 0
    out = capsys.readouterr().out
    mod, fixed = cli.load_preparer(dataset)
    for key, opt in mod.OPTIONS.items():
        if key in fixed:
            assert f"  {key}=" not in out  # fixed by the dataset name, not offered
        else:
            assert f"  {key}=<" in out and f"default {opt.default!r}" in out
    assert "--check" in out and "--workers" in out and f"pcbench-prep {dataset} raw=" in out


@pytest.mark.parametrize("argv,msg", [
    (["shapenet", "raw=/x", "out=/y"], "unknown dataset 'shapenet'.*use one of scannet, scanobjectnn"),
    (["modelnet40", "raw=/x", "out=/y", "pts=3"], "unknown option pts='3'.*modelnet40 --help"),
    (["modelnet40", "raw=/x", "out=/y", "points=lots"], "cannot read points='lots' as int"),
    (["modelnet40", "raw=/x", "out=/y", "oops"], "argument 'oops' is not key=value"),
    (["modelnet10", "raw=/x", "out=/y", "num_classes=40"], "num_classes is fixed by the dataset name 'modelnet10'"),
    (["modelnet40", "out=/y"], "raw=<folder with the official files> is required"),
    (["modelnet40", "raw=/x"], "out=<output folder> is required"),
    (["modelnet40", "raw=/nonexistent/mn", "out=/tmp/never"], "nonexistent/mn: raw: folder not found"),
    (["modelnet40", "--verify"], "--verify needs out="),
])
def test_bad_arguments_exit_2_with_a_reason(argv, msg, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pcbench-prep: error: ")
    import re

    assert re.search(msg, err), err


def test_check_reports_without_writing(raw, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["modelnet40", "--check", f"raw={raw}", f"out={out}"]) == 0
    assert "ready to prepare" in capsys.readouterr().out
    assert not out.exists()
    assert cli.main(["scanobjectnn", "--check", f"raw={raw / 'so'}", "variant=PB_T50_RS"]) == 1
    text = capsys.readouterr().out
    assert "variant: none of the PB_T50_RS files of split=main_split is here" in text
    assert "training_objectdataset_augmentedrot_scale75.h5" in text and "1 problems found" in text


def test_prepare_exit_codes_and_verify(raw, tmp_path, capsys):
    out = tmp_path / "mn"
    argv = ["modelnet40", f"raw={raw}", f"out={out}", "points=64", "sampling=random", "--workers", "1"]
    assert cli.main(argv) == 0
    assert "10 samples written" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "2 already done and skipped" in capsys.readouterr().out
    assert cli.main(["modelnet40", "--verify", f"out={out}"]) == 0
    shard = out / "train/shard_00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte
    shard.write_bytes(bytes(data))
    assert cli.main(["modelnet40", "--verify", f"out={out}"]) == 1
    assert "sha256 differs" in capsys.readouterr().out
    # one bad object: exit 1 at the end, the others are written
    bad = raw.parent / "bad_raw"
    import shutil

    shutil.copytree(raw / "modelnet40_normal_resampled", bad / "modelnet40_normal_resampled")
    (bad / "modelnet40_normal_resampled/table/table_0001.txt").write_text("1,2,3\n")
    out2 = tmp_path / "mn2"
    assert cli.main(["modelnet40", f"raw={bad}", f"out={out2}", "points=64", "--workers", "1"]) == 1
    text = capsys.readouterr().out
    assert "FAILED 1:" in text and "table_0001.txt: rows: line 1 has 3 comma-separated values" in text
    assert "9 samples written" in text


def test_console_entry_point_runs_as_a_module(raw, tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep.cli", "modelnet10", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "allow_missing=<true/false>" in r.stdout
    r = subprocess.run([sys.executable, "-m", "data_prep.cli", "modelnet10", f"raw={raw}", f"out={tmp_path / 'o'}",
                        "points=32", "sampling=random", "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "modelnet10: 10 samples written" in r.stdout


@pytest.mark.parametrize("dataset,n", [("modelnet40", 160), ("scanobjectnn", 50), ("scannet", 7)])
def test_raw_synthetic_quickstart(dataset, n, tmp_path, capsys):
    from data_prep.common import read_manifest, verify_outputs

    out = tmp_path / dataset
    extra = ["points=64", "sampling=random"] if dataset.startswith("modelnet") else []
    assert cli.main([dataset, "raw=synthetic", f"out={out}", *extra, "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "wrote synthetic" in text and (out / "synthetic_raw").is_dir()
    m = read_manifest(out)
    assert m["dataset"] == dataset and verify_outputs(out) == []
    assert sum(v["num_samples"] for v in m["splits"].values()) == n
