"""``pcbench-train`` / ``python -m pcbench.train`` and ``pcbench-eval``: thin entry points around fit / evaluate.

Under ``torchrun`` every rank runs this; rank 0 picks the run directory (Hydra would otherwise make one
timestamped folder per rank) and passes it to the others as ``hydra.run.dir``; ranks > 0 write no
``.hydra/`` folder and no logs.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["eval_main", "train_main"]


def _fail(msg: str) -> int:
    print(f"pcbench: error: {msg}", file=sys.stderr)
    return 2


def _has_override(argv: Sequence[str], key: str) -> bool:
    return any(a.split("=", 1)[0].lstrip("+") == key for a in argv)


def _torchrun_argv(argv: list[str]) -> list[str]:
    """Under torchrun: one run directory for all ranks (rank 0's choice), no .hydra/ output on other ranks."""
    from pcbench.train.distributed import broadcast_object, init_distributed, launched_by_torchrun

    if not launched_by_torchrun():
        return argv
    init_distributed()
    rank = int(os.environ["RANK"])
    if not _has_override(argv, "hydra.run.dir"):
        from pcbench.train.config import compose

        probe = compose([a for a in argv if not a.startswith("hydra.")], run_dir="/unused")
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        chosen = str(Path(str(probe.paths.output_root)) / str(probe.task_name) / stamp)
        argv = [*argv, f"hydra.run.dir={broadcast_object(chosen if rank == 0 else None)}"]
    if rank > 0:
        argv = [*argv, "hydra.output_subdir=null"]
    return argv


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcbench-train``; returns the exit status (2: configuration error)."""
    import hydra
    from omegaconf import DictConfig

    from pcbench import _malloc
    from pcbench.train.config import ConfigError, compose, config_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg") or a.startswith("--cfg") for a in argv):
        # glibc reads its tuning variables at start-up only: re-run this command with them (Linux CPU runs;
        # trainer.malloc=default opts out). fit() also applies mallopt in-process for Python callers.
        if not any(a == "trainer.malloc=default" for a in argv):
            _malloc.reexec_with_tuned_malloc([sys.executable, "-m", "pcbench.train", *argv])
        try:
            # Hydra's own flags (-m/--multirun, --config-name, ...) and hydra.* keys are Hydra's to check
            compose([a for a in argv if "=" in a and not a.startswith(("hydra.", "hydra/", "-"))], run_dir="/unused")
            argv = _torchrun_argv(argv)
        except ConfigError as err:
            return _fail(str(err))
    if not _has_override(argv, "hydra.output_subdir"):
        # fit writes .hydra/ itself once the run dir is locked and a resume is checked: a refused run must not
        # overwrite the config of the run that owns the folder
        argv = [*argv, "hydra.output_subdir=null"]
    status = {"code": 0}

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        from pcbench.train import fit
        from pcbench.train.errors import DivergedError

        try:
            fit(cfg)
        except ConfigError as err:
            status["code"] = _fail(str(err))
        except DivergedError as err:
            print(f"pcbench: error: {err}", file=sys.stderr)
            status["code"] = 1
        except KeyboardInterrupt:
            print(f"pcbench: interrupted; continue with resume=true hydra.run.dir={cfg.paths.run_dir}", file=sys.stderr)
            status["code"] = 130

    old = sys.argv
    sys.argv = [old[0], *argv]
    try:
        _app()
    finally:
        sys.argv = old
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return status["code"]


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcbench-eval checkpoint=<path> [key=value ...]`` (the run's stored config + overrides)."""
    from omegaconf import OmegaConf

    from pcbench.train.checkpoint import load_checkpoint
    from pcbench.train.config import ConfigError
    from pcbench.train.trainer import evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pcbench-eval checkpoint=<run dir>/checkpoints/best.pt [eval.split=test] "
              "[eval.save_predictions=true] [eval.save_probabilities=true] [eval.submission_dir=<dir>] "
              "[eval.submission_from=vote|plain] [eval.corruptions=modelnet_c] [tta=<name>] [data.root=<dir>] "
              "[key=value ...]\n"
              "Evaluates a checkpoint with the config stored in it; writes eval_<split>.json (and predictions/"
              "submission files) in the run directory (paths.run_dir=<dir> to choose another).\n"
              "eval.corruptions=modelnet_c: a classifier's OA under the seven ModelNet-C corruptions x severities "
              "1-5, mCE and relative mCE (vs DGCNN); pcbench regenerates the corruptions from the prepared test "
              "split (the released ModelNet-C h5 files are not read).")
        return 0 if argv else 2
    kv = [a for a in argv if "=" in a]
    bad = [a for a in argv if "=" not in a]
    if bad:
        return _fail(f"arguments must be key=value, got {bad}; see pcbench-eval --help")
    ckpt = next((a.split("=", 1)[1] for a in kv if a.startswith("checkpoint=")), None)
    if ckpt is None:
        return _fail("checkpoint=<path of a .pt file written by pcbench-train> is required")
    try:
        state = load_checkpoint(ckpt)
        if "config" not in state:
            raise ConfigError(f"{ckpt} holds no config; evaluate it from Python with pcbench.train.evaluate")
        cfg = OmegaConf.create(state["config"])
        OmegaConf.set_struct(cfg, True)
        overrides = [a for a in kv if not a.startswith("checkpoint=")]
        tta = [a for a in overrides if a.startswith("tta=")]
        overrides = [a for a in overrides if not a.startswith("tta=")]
        if tta:
            from pcbench.train.config import compose

            picked = compose([tta[-1]], run_dir="/unused").tta
            with __import__("omegaconf").open_dict(cfg):
                cfg.tta = picked
        run_dir = Path(ckpt).resolve().parent.parent
        with __import__("omegaconf").open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
            cfg.trainer.strategy = "single"
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        except Exception as err:  # noqa: BLE001 - omegaconf raises several key errors
            raise ConfigError(f"{err}; check the key names (they are those of the run's .hydra/config.yaml)") from err
        evaluate(cfg, ckpt)
    except ConfigError as err:
        return _fail(str(err))
    return 0
