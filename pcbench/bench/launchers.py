"""What the runner needs to know about Hydra's launcher: which kind it is, threads per job, the SLURM job script.

The launchers themselves are Hydra's (``hydra/launcher``): ``basic`` (in-process, one cell after another),
``parallel`` (``conf/hydra/launcher/parallel.yaml``: hydra-joblib-launcher with a bounded number of jobs) and
``slurm`` (``conf/hydra/launcher/slurm.yaml``: hydra-submitit-launcher, one SLURM array task per cell);
``submitit_local`` runs the same submitit path as local processes.

Jobs of the joblib launcher run in loky worker processes of the runner; :func:`die_with_runner` makes such a
worker end when the runner dies (killed, crashed), so no orphan goes on training and writing into run dirs
that a re-run resumes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["RUNNER_PID_ENV", "auto_threads", "cpu_count", "die_with_parent", "die_with_runner", "launcher_kind",
           "render_slurm_script"]

#: The runner (pcbench-bench) puts its pid here before launching; its worker processes inherit it.
RUNNER_PID_ENV = "PCBENCH_RUNNER_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launcher_kind(launcher: DictConfig) -> str:
    """"basic", "joblib", "slurm", "submitit_local" or the launcher's class name."""
    target = str(launcher.get("_target_", ""))
    cls = target.rsplit(".", 1)[-1]
    if "hydra_submitit_launcher" in target:
        return "slurm" if cls == "SlurmLauncher" else "submitit_local"
    return {"BasicLauncher": "basic", "JoblibLauncher": "joblib"}.get(cls, cls or "unknown")


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> str:
    """End this process (SIGTERM) when ``parent_pid``, its parent now, dies; returns the mechanism used.

    Linux: ``prctl(PR_SET_PDEATHSIG)``, delivered by the kernel the moment the parent exits. Elsewhere (or if
    prctl fails): a daemon thread that polls ``os.getppid()`` every ``poll_s`` seconds (a dead parent's
    children are re-parented). Either way, a parent already gone when this is called ends the process now.
    """
    how = "watchdog"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    if how == "watchdog":
        def watch() -> None:
            while True:
                threading.Event().wait(poll_s)
                if os.getppid() != parent_pid:
                    os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="pcbench-parent-watchdog", daemon=True).start()
    return how


_ARMED: dict[int, str] = {}  # parent pid -> mechanism: a reused worker process arms once


def die_with_runner() -> str | None:
    """In a worker process of the runner (its parent's pid is ``$PCBENCH_RUNNER_PID``), arm
    :func:`die_with_parent`; returns the mechanism, or None in the runner itself or outside a runner."""
    runner = os.environ.get(RUNNER_PID_ENV, "")
    if not runner.isdigit() or int(runner) == os.getpid() or os.getppid() != int(runner):
        return None
    if int(runner) not in _ARMED:
        _ARMED[int(runner)] = die_with_parent(int(runner))
    return _ARMED[int(runner)]


def auto_threads(launcher: DictConfig) -> int | None:
    """torch threads per cell when ``threads`` is not set: CPUs / parallel jobs for the joblib launcher.

    torch's intra-op threads degrade badly when several processes compete for the same cores, so parallel
    local jobs share the cores instead of each taking all of them. None: keep torch's default.
    """
    if launcher_kind(launcher) != "joblib":
        return None
    jobs = int(launcher.get("n_jobs", -1))
    cpus = cpu_count()
    jobs = cpus if jobs < 1 else jobs
    return max(1, cpus // jobs)


def render_slurm_script(launcher: DictConfig, num_jobs: int) -> str:
    """The sbatch script hydra-submitit-launcher would submit for ``num_jobs`` cells (one array), not submitted.

    Parameters are translated exactly as the launcher does (generic names such as ``timeout_min``,
    ``gpus_per_node`` and ``mem_gb`` to sbatch's) and validated by submitit itself.
    """
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf  # noqa: PLC0415
    from submitit.slurm import slurm  # noqa: PLC0415

    class _Renderer(slurm.SlurmExecutor):
        """The launcher's executor without its check for a local ``srun``: it only writes the script text."""

        @classmethod
        def affinity(cls) -> int:
            return 1

    if launcher_kind(launcher) != "slurm":
        raise ValueError(f"hydra/launcher is {launcher_kind(launcher)}, not the SLURM launcher; choose "
                         "hydra/launcher=slurm to render a SLURM job script")
    params: dict[str, Any] = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_", None)
    folder = Path(str(params.pop("submitit_folder")))
    executor = _Renderer(folder, max_num_timeout=int(params.pop("max_num_timeout", 0)))
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    specific = {k: v for k, v in params.items() if k not in generic}
    converted = executor._convert_parameters({k: v for k, v in params.items() if k in generic})
    executor.update_parameters(**converted, **specific)
    return slurm._make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder,
                                     map_count=num_jobs if num_jobs > 1 else None, **executor.parameters)
