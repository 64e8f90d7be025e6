"""Suites, cells and launchers: every shipped suite composes into trainer configs; the SLURM launcher renders
its job script; the suite format's rules (cell names, sweeps, override order, fidelity, identity) hold."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from pcbench.bench.launchers import auto_threads, cpu_count, launcher_kind, render_slurm_script
from pcbench.bench.record import config_sha256
from pcbench.bench.suite import (
    SuiteError,
    cell_config,
    cell_identity,
    check_sweep_keys,
    compose_bench,
    expand_suite,
    format_override,
)
from pcbench.train.config import group_options

REPO = Path(__file__).resolve().parents[2]
SUITES = group_options("suite")
PAPER = ["modelnet40", "scanobjectnn_pb_t50_rs", "scannet20", "scannet200"]
EXPERIMENTS = set(group_options("experiment"))


def test_the_issue_suites_are_shipped() -> None:
    assert {"quickstart", "smoke", *PAPER} <= set(SUITES)


def _entries(suite: str) -> list[tuple[str, str]]:
    bench = compose_bench([f"suite={suite}"])
    return [(suite, e) for e in bench.suite.models]


@pytest.mark.parametrize(("suite", "entry"), [pair for s in SUITES for pair in _entries(s)])
def test_every_cell_of_every_suite_composes(suite: str, entry: str, tmp_path: Path) -> None:
    bench = compose_bench([f"suite={suite}", f"data_dir={tmp_path}", f"shared_data={tmp_path / 'shared'}"])
    exp = bench.suite.models[entry].get("experiment")
    if exp is not None and exp not in EXPERIMENTS:
        pytest.skip(f"recipe {exp} is not in conf/experiment/ yet (issue 9 adds the paper recipes); the runner "
                    "refuses the suite naming it (test_missing_recipe_is_refused)")
    with open_dict(bench):
        bench.suite.models = {entry: bench.suite.models[entry]}
    cells = expand_suite(bench)
    assert cells, entry
    for cell in cells:
        cfg, choices = cell_config(cell, tmp_path / cell.name)
        d = bench.suite.datasets[cell.dataset]
        assert choices["data"] == d.data, f"{cell.name}: composes data={choices['data']}, the suite says {d.data}"
        assert cfg.data.root == str(Path(str(d.root))) and cfg.seed == cell.seed
        assert cfg.paths.run_dir == str((tmp_path / cell.name).resolve())
        from pcbench.models import model_task

        assert model_task(cfg.model) == cfg.data.task, cell.name
        if exp is not None:
            assert choices["experiment"] == exp and cell.recipe == exp and cell.fidelity == "reference"
        else:
            assert cell.fidelity == "pcbench variant"
    if suite in PAPER:
        assert sorted({c.seed for c in cells}) == [0, 1, 2]


def test_missing_recipe_is_refused() -> None:
    bench = compose_bench(["suite=modelnet40"])
    with open_dict(bench):
        bench.suite.models.pointnet2_ssg.experiment = "no_such_recipe"
    with pytest.raises(SuiteError, match=r"suite.models.pointnet2_ssg.experiment='no_such_recipe' is not in "
                                         r"conf/experiment/ \(recipes: \[.*pointnet2_ssg_modelnet40"):
        expand_suite(bench)


def test_quickstart_covers_every_family_on_both_tasks() -> None:
    cells = expand_suite(compose_bench(["suite=quickstart"]))
    models = {c.entry for c in cells}
    for family in ("pointnet2_ssg", "pct", "ptv1", "ptv2", "ptv3"):
        assert {f"{family}_cls", f"{family}_seg"} <= models, family
    assert {"sparse_resnet_cls", "minkunet14a_seg"} <= models  # the voxel backbones
    assert {c.dataset_label for c in cells} == {"synthetic-modelnet40", "synthetic-scannet20"}
    assert all(c.fidelity == "pcbench variant" for c in cells)
    swept = [c for c in cells if c.variant]
    assert [c.variant for c in swept] == ["points=256", "points=512", "k=4", "k=8", "k=16"]
    assert [c.name for c in swept] == ["objects-pointnet2_ssg_cls-points256-s0", "objects-pointnet2_ssg_cls-points512-s0",
                                       "objects-pct_cls-k4-s0", "objects-pct_cls-k8-s0", "objects-pct_cls-k16-s0"]
    assert [c.sweep for c in swept] == [{"data.num_points": 256}, {"data.num_points": 512}, {"model.k": 4},
                                        {"model.k": 8}, {"model.k": 16}]
    assert all(not c.sweep for c in cells if not c.variant)


def _suite(**models) -> OmegaConf:
    bench = compose_bench(["suite=quickstart"])
    with open_dict(bench):
        bench.suite.models = models
        bench.suite.seeds = [0, 1]
    return bench


def test_cells_are_models_x_datasets_x_sweeps_x_seeds_with_overrides_in_order() -> None:
    bench = _suite(pct_cls={"datasets": ["objects"], "train": ["model.k=4", "optim.lr=0.1"],
                            "sweep": {"k": {"key": "model.k", "values": [8, 16]},
                                      "pts": {"key": "data.num_points", "values": [128, 256, 512]}}})
    with open_dict(bench):
        bench.overrides = ["trainer.max_steps=3"]
        bench.device = "cpu"
    cells = expand_suite(bench)
    assert len(cells) == 2 * 3 * 2
    assert cells[0].name == "objects-pct_cls-k8-pts128-s0" and cells[-1].name == "objects-pct_cls-k16-pts512-s1"
    c = cells[0]
    assert c.variant == "k=8 pts=128"
    o = list(c.overrides)
    # suite train < dataset train < entry train < swept values < runner overrides < seed, data.root
    assert o.index("optim=adamw") < o.index("optim.lr=0.005") < o.index("optim.lr=0.1") < o.index("model.k=8")
    assert o.index("model.k=4") < o.index("model.k=8") < o.index("trainer=cpu") < o.index("trainer.max_steps=3")
    assert o[-2:] == ["seed=0", f"data.root={Path(str(bench.suite.datasets.objects.root))}"]
    cfg, _ = cell_config(c, "/tmp/x")
    assert cfg.model.k == 8 and cfg.optim.lr == 0.1 and cfg.data.num_points == 128 and cfg.trainer.max_steps == 3


def test_sweeps_by_config_key_cross_models_and_seeds_with_one_identity_per_value(tmp_path: Path) -> None:
    bench = _suite(pct_cls={"datasets": ["objects"], "train": ["model.k=4"], "sweep": {"model.k": [8, 16, 32]}},
                   ptv1_cls={"datasets": ["objects"]})
    with open_dict(bench):
        bench.suite.sweep = {"optim.lr": [0.01, 0.1]}  # suite-wide: every model entry, crossed with its own sweep
    cells = expand_suite(bench)
    pct = [c for c in cells if c.entry == "pct_cls"]
    ptv1 = [c for c in cells if c.entry == "ptv1_cls"]
    assert len(pct) == 2 * 3 * 2 and len(ptv1) == 2 * 2  # lr x k x seeds; lr x seeds
    assert pct[0].name == "objects-pct_cls-lr0.01-k8-s0" and pct[-1].name == "objects-pct_cls-lr0.1-k32-s1"
    assert pct[0].variant == "lr=0.01 k=8" and pct[0].sweep == {"optim.lr": 0.01, "model.k": 8}
    assert [c.seed for c in pct[:2]] == [0, 1] and pct[0].sweep == pct[1].sweep
    assert {c.name: c.sweep for c in ptv1}["objects-ptv1_cls-lr0.1-s1"] == {"optim.lr": 0.1}
    check_sweep_keys(bench, cells)
    shas: dict[tuple, set[str]] = {}
    for c in pct:
        cfg, _ = cell_config(c, tmp_path / c.name)
        assert cfg.model.k == c.sweep["model.k"] and cfg.optim.lr == c.sweep["optim.lr"]  # the sweep wins over train
        shas.setdefault(tuple(sorted(c.sweep.items())), set()).add(config_sha256(cell_identity(cfg, c.probe)))
    # each value is its own configuration; the seeds of one value differ only by seed
    assert len(shas) == 6 and all(len(v) == 2 for v in shas.values())
    assert len(set().union(*shas.values())) == 12


def test_sweep_tags_use_the_whole_key_where_last_parts_collide() -> None:
    bench = _suite(pct_cls={"datasets": ["objects"], "sweep": {"model.dropout": [0.1], "eval.dropout": [0.2]}})
    with open_dict(bench):
        bench.suite.seeds = [0]
    (cell,) = expand_suite(bench)
    assert cell.name == "objects-pct_cls-model.dropout0.1-eval.dropout0.2-s0"
    assert cell.sweep == {"model.dropout": 0.1, "eval.dropout": 0.2}


@pytest.mark.parametrize(("sweep", "match"), [
    ({"model.neighbours": [8, 16]}, r"suite.models.pct_cls.sweep: 'model.neighbours' is not a key of the trainer config "
                                    r"of model entry 'pct_cls' \(model=pct_cls, dataset objects\); .*model has keys "),
    ({"model.kk": [8]}, r"'model.kk' is not a key of .*'pct_cls'.*did you mean model.k\?"),
    ({"nosuch.k": [8]}, r"'nosuch.k' is not a key of .*'pct_cls'.*'nosuch' is not a config node"),
])
def test_a_swept_key_the_config_lacks_names_the_key_and_the_model(sweep: dict, match: str) -> None:
    bench = _suite(pct_cls={"datasets": ["objects"], "sweep": sweep})
    cells = expand_suite(bench)  # expanding does not compose; the plan's check does, once per entry and dataset
    with pytest.raises(SuiteError, match=match):
        check_sweep_keys(bench, cells)


def test_a_suite_wide_swept_key_one_model_lacks_is_refused_naming_that_model() -> None:
    bench = _suite(pct_cls={"datasets": ["objects"]}, ptv1_cls={"datasets": ["objects"]})
    with open_dict(bench):
        bench.suite.sweep = {"model.k": [8, 16]}  # PCT has k, PTv1 has neighbors
    with pytest.raises(SuiteError, match=r"suite.sweep: 'model.k' is not a key of the trainer config of model entry "
                                         r"'ptv1_cls' \(model=ptv1_cls"):
        check_sweep_keys(bench, expand_suite(bench))


def test_the_plan_checks_swept_keys_before_composing_cells() -> None:
    from pcbench.bench.runner import make_plan

    bench = _suite(pct_cls={"datasets": ["objects"], "sweep": {"model.neighbours": [8]}})
    with pytest.raises(SuiteError, match=r"'model.neighbours' is not a key .* model entry 'pct_cls'"):
        make_plan(bench, None)


@pytest.mark.parametrize(("entry", "suite_sweep", "match"), [
    ({"sweep": {"model.k": []}}, None, r"suite.models.pct_cls.sweep.model.k is empty; give at least one value"),
    ({"sweep": {"model.k": 8}}, None, r"suite.models.pct_cls.sweep.model.k=8 must be a list of values, e.g. "
                                      r"model.k: \[8, 16\]"),
    ({"sweep": {"+model.k": [8]}}, None, r"sweep key '\+model.k' is not a dotted trainer config key"),
    ({"sweep": {"k": {"key": "model/k", "values": [8]}}}, None, r"sweep key 'model/k' is not a dotted"),
    ({"sweep": [8, 16]}, None, r"suite.models.pct_cls.sweep must map config keys to values"),
    ({"sweep": {"model.k": [8]}}, {"model.k": [16]}, r"suite.models.pct_cls: \['model.k'\] swept twice"),
    ({"sweep": {"k": {"key": "model.k", "values": [8]}, "k2": {"key": "model.k", "values": [16]}}}, None,
     r"\['model.k'\] swept twice"),
])
def test_malformed_sweeps_are_refused(entry: dict, suite_sweep: dict | None, match: str) -> None:
    bench = _suite(pct_cls={"datasets": ["objects"], **entry})
    if suite_sweep is not None:
        with open_dict(bench):
            bench.suite.sweep = suite_sweep
    with pytest.raises(SuiteError, match=match):
        expand_suite(bench)


def test_a_runner_override_of_a_swept_key_is_refused() -> None:
    bench = _suite(pct_cls={"datasets": ["objects"], "sweep": {"model.k": [8, 16]}})
    with open_dict(bench):
        bench.overrides = ["trainer.max_steps=3", "model.k=4"]  # would make both sweep points one configuration
    with pytest.raises(SuiteError, match=r"overrides= sets \['model.k'\], which suite.models.pct_cls sweeps"):
        expand_suite(bench)


def test_identity_ignores_placement_but_not_what_is_computed(tmp_path: Path) -> None:
    cell = expand_suite(_suite(pct_cls={"datasets": ["objects"]}))[0]
    cfg, _ = cell_config(cell, tmp_path / "a")
    base = config_sha256(cell_identity(cfg, cell.probe))
    placed = cfg.copy()
    with open_dict(placed):
        placed.trainer.threads, placed.trainer.num_workers, placed.resume = 1, 7, True
        placed.paths.run_dir, placed.logger.tensorboard = "/elsewhere", True
    assert config_sha256(cell_identity(placed, cell.probe)) == base
    changed = cfg.copy()
    changed.optim.lr = 0.5
    assert config_sha256(cell_identity(changed, cell.probe)) != base
    assert config_sha256(cell_identity(cfg, {**cell.probe, "repeats": 9})) != base  # probe settings count too


def test_fidelity_reference_only_for_a_recipe_with_placement_overrides() -> None:
    bench = compose_bench(["suite=modelnet40", "device=gpu", "threads=4"])
    only = ["*-pointnet2_ssg-*"]
    assert {c.fidelity for c in expand_suite(bench, only)} == {"reference"}
    with open_dict(bench):
        bench.overrides = ["trainer.num_workers=4", "trainer.accelerator=cuda", "eval.save_predictions=true"]
    assert {c.fidelity for c in expand_suite(bench, only)} == {"reference"}
    with open_dict(bench):
        bench.overrides = ["trainer.max_epochs=1"]
    assert {c.fidelity for c in expand_suite(bench, only)} == {"pcbench variant"}
    with open_dict(bench):
        bench.suite.models.pointnet2_ssg.fidelity = "exact"
    with pytest.raises(SuiteError, match=r"fidelity='exact'; use one of \('reference', 'pcbench variant'\)"):
        expand_suite(bench, only)


@pytest.mark.parametrize(("models", "match"), [
    ({"pct_cls": {"datasets": ["nowhere"]}}, r"suite.models.pct_cls.datasets names 'nowhere', which is not a key of "
                                             r"suite.datasets \(\['objects', 'rooms'\]\)"),
    ({"pct_cls": {"datasets": []}}, r"suite.models.pct_cls.datasets is empty"),
    ({"no_model": {"datasets": ["objects"]}}, r"model='no_model' is not a conf/model option"),
    ({"pct_cls": {"datasets": ["objects"], "train": ["model.k"]}}, r"\['model.k'\], which are not key=value"),
    ({"pct_cls": {"datasets": ["objects"], "sweep": {"k": {"values": [1]}}}},
     r"suite.models.pct_cls.sweep.k must be \{key: <trainer override key>, values: \[...\]\}"),
    ({"pct_cls": {"datasets": ["objects"], "sweep": {"k": {"key": "model.k", "values": []}}}},
     r"sweep.k.values is empty"),
    ({"pct_cls": {"datasets": ["objects"], "trian": ["model.k=8"]}},  # a typo would drop the overrides silently
     r"suite.models.pct_cls has unknown key\(s\) \['trian'\]; its keys are model, experiment, datasets, train"),
    ({"pct_cls": {"datasets": ["objects", "objects"]}}, r"makes the cells \['objects-pct_cls-s0', 'objects-pct_cls-s1'\] "
                                                        r"more than once"),
])
def test_malformed_suites_name_the_key_and_the_fix(models: dict, match: str) -> None:
    with pytest.raises(SuiteError, match=match):
        expand_suite(_suite(**models))


def test_bad_seeds_and_missing_root() -> None:
    bench = _suite(pct_cls={"datasets": ["objects"]})
    with open_dict(bench):
        bench.suite.seeds = []
    with pytest.raises(SuiteError, match=r"seeds=\[\]; give a list of integers"):
        expand_suite(bench)
    bench = compose_bench(["suite=scannet200"])
    with open_dict(bench):
        bench.suite.datasets.scannet200.root = None
    with pytest.raises(SuiteError, match=r"suite.datasets.scannet200.root is not set"):
        expand_suite(bench)


def test_only_selects_cells_by_glob() -> None:
    bench = compose_bench(["suite=quickstart"])
    cells = expand_suite(bench)
    assert [c.name for c in expand_suite(bench, ["rooms-pt*"])] == ["rooms-ptv1_seg-s0", "rooms-ptv2_seg-s0",
                                                                    "rooms-ptv3_seg-s0"]
    assert expand_suite(bench, []) == cells
    with pytest.raises(SuiteError, match=r"only=\['nothing\*'\] matches none of the cells of suite quickstart"):
        expand_suite(bench, ["nothing*"])
    # an entry none of whose cells is selected is not checked: part of a suite runs while other recipes are missing
    with open_dict(bench):
        bench.suite.models.pct_cls.experiment = "no_such_recipe"
    assert len(expand_suite(bench, ["rooms-*"])) == 6
    with pytest.raises(SuiteError, match="no_such_recipe"):
        expand_suite(bench, ["objects-pct*"])


def test_format_override_round_trips_through_hydra() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = [3, 0.05, True, None, "z-trans", "a b", [8, 16], [[0.1], [0.2]], ["x", "y z"]]
    parsed = OverridesParser.create().parse_overrides([format_override("k", v) for v in values])
    assert [p.value() for p in parsed] == values


# ---------------------------------------------------------------------------------------------- launchers
def test_parallel_launcher_is_joblib_with_bounded_jobs_and_threads_split() -> None:
    bench = compose_bench(["suite=smoke", "hydra/launcher=parallel"])
    assert launcher_kind(bench.hydra.launcher) == "joblib" and bench.hydra.launcher.n_jobs == 2
    assert auto_threads(bench.hydra.launcher) == max(1, cpu_count() // 2)
    with open_dict(bench):
        bench.hydra.launcher.n_jobs = 10 * cpu_count()
    assert auto_threads(bench.hydra.launcher) == 1
    basic = compose_bench(["suite=smoke", "hydra/launcher=basic"]).hydra.launcher
    assert launcher_kind(basic) == "basic" and auto_threads(basic) is None
    # the quickstart picks the parallel launcher itself; the command line still chooses
    assert launcher_kind(compose_bench(["suite=quickstart"]).hydra.launcher) == "joblib"


def test_slurm_launcher_composes_and_renders_the_job_script(tmp_path: Path) -> None:
    bench = compose_bench(["suite=scannet20", f"out={tmp_path}", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                           "hydra.launcher.timeout_min=600", "hydra.launcher.account=proj1"])
    launcher = bench.hydra.launcher
    assert launcher_kind(launcher) == "slurm"
    script = render_slurm_script(launcher, 15)
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))
    assert flags["partition"] == "gpu" and flags["account"] == "proj1"
    assert flags["gpus-per-node"] == "1" and flags["ntasks-per-node"] == "1" and flags["cpus-per-task"] == "10"
    assert flags["time"] == "600" and flags["mem"] == "64GB"
    assert flags["array"] == "0-14%15" and flags["job-name"] == "pcbench-scannet20"
    assert flags["signal"].startswith("USR2@") or flags["signal"].startswith("USR1@")
    assert flags["output"].startswith(str(tmp_path / "bench" / "scannet20" / ".submitit"))
    assert re.search(r"^srun .*-m submitit\.core\._submit .*\.submitit", script, re.M), script
    with pytest.raises(ValueError, match="not the SLURM launcher"):
        render_slurm_script(compose_bench(["suite=smoke"]).hydra.launcher, 1)
    with open_dict(launcher):
        launcher.not_a_slurm_option = 1
    with pytest.raises(ValueError, match="not_a_slurm_option"):  # submitit validates the parameters itself
        render_slurm_script(launcher, 2)


def test_dry_run_prints_the_plan_and_the_sbatch_script(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    p = subprocess.run([sys.executable, "-m", "pcbench.bench", "suite=modelnet40", f"out={tmp_path}", "dry_run=true",
                        "device=gpu", "hydra/launcher=slurm", "hydra.launcher.partition=a100", "only=[*-pointnet2_ssg-*]"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "3 cells, 0 finished earlier (skipped), 3 to run with the slurm launcher" in p.stdout
    assert "modelnet40-pointnet2_ssg-s2" in p.stdout and "reference" in p.stdout
    assert "#SBATCH --partition=a100" in p.stdout and "#SBATCH --array=0-2%3" in p.stdout
    assert not (tmp_path / "bench").exists()  # a dry run writes no job folder


def test_sweep_on_the_command_line_is_refused(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pcbench.bench", "suite=quickstart,smoke", f"out={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "['suite=quickstart,smoke'] would be a Hydra sweep" in p.stderr


@pytest.mark.parametrize(("arg", "says"), [
    ("unknown_key=1", "pcbench-bench has no key 'unknown_key'; its keys: cell, data_dir, device, dry_run, only, ops, "
                      "out, overrides, prep_workers, report, results, shared_data, store_per_job, threads"),
    ("treads=2", "pcbench-bench has no key 'treads'; its keys: cell, data_dir, device"),
    ("suite.sedes=[1]", "'suite' has no key 'sedes'; its keys: datasets, description, models, name, probe, seeds, train"),
])
def test_runner_key_typos_list_the_runners_keys(arg: str, says: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from pcbench.cli.bench import main

    assert main(["suite=quickstart", arg, f"out={tmp_path}", "dry_run=true"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert "optim" not in err.split("\n", 2)[-1]  # not the trainer's keys (conf/train.yaml groups)


def test_typos_in_suite_dataset_and_probe_entries_are_refused() -> None:
    bench = _suite(pct_cls={"datasets": ["objects"]})
    with open_dict(bench):
        bench.suite.datasets.objects.rooot = "/data"
    with pytest.raises(SuiteError, match=r"suite.datasets.objects has unknown key\(s\) \['rooot'\]"):
        expand_suite(bench)
    bench = _suite(pct_cls={"datasets": ["objects"]})
    with open_dict(bench):
        bench.suite.probe = {"repeat": 3}
    with pytest.raises(SuiteError, match=r"suite.probe has unknown key\(s\) \['repeat'\]; its keys are batches"):
        expand_suite(bench)
