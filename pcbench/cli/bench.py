"""``pcbench-bench suite=<name> [key=value ...]`` (and ``python -m pcbench.bench``): run a benchmark suite.

Plans the suite in this process (expands the cells, composes each cell's trainer config, looks its hash up in
the results store), prepares the suite's datasets with the real preparers, then hands the cells still to run
to Hydra as one multirun over ``cell=...`` with ``pcbench.bench.runner.cell_job`` as the task function, so
``hydra/launcher=...`` decides where they run. Afterwards it merges per-job stores (``store_per_job=true``),
writes the leaderboard report of the whole store and prints where it is.

Exit status: 0 every cell finished (or is being run by another runner on the same store, which the progress
lines name), 1 some cell failed (recorded with its error and log; the others ran),
2 the suite could not start (bad key, missing data), 130 interrupted (finished cells are kept: run the same
command again to resume).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

PROG = "pcbench-bench"
PATH_KEYS = ("out", "results", "report", "data_dir", "shared_data", "ops")


def _usage() -> str:
    from pcbench.train.config import config_dir, group_options  # noqa: PLC0415

    suites = ", ".join(group_options("suite"))
    return f"""usage: {PROG} suite=<name> [key=value ...] [hydra/launcher=<basic|parallel|slurm>] [hydra.launcher.<key>=...]

Run a benchmark suite: every cell (model x dataset x swept options x seed) is trained and evaluated by the
shared trainer, probed for efficiency and recorded in the results store; the leaderboard report is written at
the end. Re-running the same command skips finished cells, so a killed suite resumes.

suites ({config_dir() / 'suite'}): {suites}
keys (conf/bench.yaml): out=<dir> results=<store.sqlite> report=<dir> data_dir=<dir> shared_data=<dir>
  device=<cpu|gpu> threads=N overrides='["trainer.max_epochs=1"]' only='[glob,...]' store_per_job=true
  ops=<ops.json> dry_run=true; suite keys as suite.<key>=..., e.g. suite.seeds=[0,1,2]
  suite.datasets.<key>.root=<prepared folder>
launchers: basic (default, in this process), parallel (joblib, hydra.launcher.n_jobs=2), slurm (submitit:
  hydra.launcher.partition=... gpus_per_node=... timeout_min=...), submitit_local"""


def _fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _check_args(argv: Sequence[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    from pcbench.train.config import ConfigError  # noqa: PLC0415

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments must be key=value (Hydra overrides), got {bad}; see {PROG} --help")
    try:
        parsed = OverridesParser.create().parse_overrides(list(argv))
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors
        raise ConfigError(f"cannot parse the arguments: {err}") from err
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps:
        raise ConfigError(f"{sweeps} would be a Hydra sweep; {PROG} runs one suite configuration per command and "
                          "launches the suite's cells itself (put sweeps in the suite: suite.models.<m>.sweep)")


def _absolute_paths(bench, argv: list[str]) -> list[str]:  # noqa: ANN001 - a composed DictConfig
    """The job overrides: the user's, with every path key replaced by its absolute resolved value."""
    out = [a for a in argv if a.split("=", 1)[0].lstrip("+") not in PATH_KEYS]
    for key in PATH_KEYS:
        val = bench.get(key)
        if val is not None:
            out.append(f"{key}={Path(str(val)).expanduser().resolve()}")
    return out


def _launch(job_argv: list[str]) -> None:
    """Hydra multirun of ``cell_job`` with ``job_argv`` (the configured launcher runs the jobs)."""
    import hydra  # noqa: PLC0415

    from pcbench.bench.runner import cell_job  # noqa: PLC0415
    from pcbench.train.config import config_dir  # noqa: PLC0415

    old = sys.argv
    sys.argv = [PROG, "--multirun", *job_argv]
    try:
        hydra.main(config_path=str(config_dir()), config_name="bench", version_base="1.3")(cell_job)()
    finally:
        sys.argv = old


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pcbench-bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(_usage())
        return 0
    argv = [a for a in argv if a not in ("-m", "--multirun")]
    from pcbench import _malloc  # noqa: PLC0415

    # glibc reads its tuning variables at start-up only: run this command again with them (Linux); every
    # in-process cell, joblib worker and local submitit job inherits them (trainer.malloc=default opts out).
    if not any("trainer.malloc=default" in a or a.lower() == "dry_run=true" for a in argv):
        _malloc.reexec_with_tuned_malloc([sys.executable, "-m", "pcbench.bench", *argv])
    import signal  # noqa: PLC0415

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)  # kill / a scheduler's cancel: record the running cell as interrupted
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted: finished cells are kept; run the same command again to resume",
              file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    from pcbench.bench import runner  # noqa: PLC0415
    from pcbench.bench.launchers import auto_threads, launcher_kind, render_slurm_script  # noqa: PLC0415
    from pcbench.bench.report import write_report  # noqa: PLC0415
    from pcbench.bench.store import ResultStore  # noqa: PLC0415
    from pcbench.bench.suite import SuiteError, compose_bench  # noqa: PLC0415
    from pcbench.train.config import ConfigError  # noqa: PLC0415

    t0 = time.time()
    try:
        _check_args(argv)
        bench = compose_bench(argv)
        job_argv = _absolute_paths(bench, argv)
        bench = compose_bench(job_argv)
        launcher = bench.hydra.launcher
        kind = launcher_kind(launcher)
        results = Path(str(bench.results))
        if results.exists() or not bench.dry_run:
            with ResultStore(results) as store:
                plan = runner.make_plan(bench, store)
        else:  # a dry run creates nothing
            plan = runner.make_plan(bench, None)
    except (ConfigError, SuiteError, ValueError) as err:
        return _fail(str(err))
    sweep_dir = Path(str(bench.hydra.sweep.dir))
    threads = int(bench.threads) if bench.get("threads") else auto_threads(launcher)
    runner.say(f"[{PROG}] suite {plan.suite}: {len(plan.cells)} cells, {len(plan.finished)} finished earlier "
               f"(skipped), {len(plan.todo)} to run with the {kind} launcher"
               f"{f', {threads} torch thread(s) each' if threads else ''}; store {results}")
    if bench.dry_run:
        for c in plan.cells:
            state = "finished" if c in plan.finished else "to run"
            runner.say(f"  {c.name:<60} {plan.hashes[c.name][:12]}  {state:<9} {c.fidelity:<16} {c.recipe}")
        if kind == "slurm" and plan.todo:
            runner.say(f"[{PROG}] sbatch script for the {len(plan.todo)} cells (not submitted):\n"
                       + render_slurm_script(launcher, len(plan.todo)))
        return 0
    failed_now = 0
    if plan.todo:
        try:
            actions = runner.prepare_datasets(bench, plan.todo, workers=int(bench.prep_workers))
        except (SuiteError, ValueError) as err:
            return _fail(str(err))
        for key, what in actions.items():
            runner.say(f"[{PROG}] dataset {key}: {what}")
        started = time.time()
        store_per_job = bool(bench.store_per_job)
        plan.write(sweep_dir, started, store_per_job, str(results))
        extra = [f"cell={','.join(c.name for c in plan.todo)}"] + ([f"threads={threads}"] if threads else [])
        bar = None
        if kind == "basic" and sys.stdout.isatty():
            from tqdm import tqdm  # noqa: PLC0415

            bar = runner._BAR = tqdm(total=len(plan.todo), desc=f"suite {plan.suite}", unit="cell", file=sys.stdout,
                                     dynamic_ncols=True)
        import os  # noqa: PLC0415

        from pcbench.bench.launchers import RUNNER_PID_ENV  # noqa: PLC0415

        os.environ[RUNNER_PID_ENV] = str(os.getpid())  # joblib workers inherit it and die with this process
        try:
            if kind in ("basic", "joblib"):  # their jobs print their progress lines on this console
                _launch([*job_argv, *extra])
            else:
                with runner.Monitor(sweep_dir):
                    _launch([*job_argv, *extra])
        except SystemExit as err:  # Hydra reports its own errors and exits
            if err.code not in (0, None):
                return _fail(f"Hydra's launcher stopped with exit status {err.code} (see the message above)")
        finally:
            if bar is not None:
                bar.close()
                runner._BAR = None
        with ResultStore(results) as store:
            if store_per_job:
                for job_store in sorted(sweep_dir.glob(f"*/{runner.JOB_STORE}")):
                    with ResultStore(job_store, create=False, wal=False) as js:
                        store.import_records(js.records())
            mine = {plan.hashes[c.name] for c in plan.todo}
            since = runner.Progress(sweep_dir).plan["started_iso"]
            recent = [r for r in store.records(suite=plan.suite) if r["config_sha256"] in mine
                      and (r.get("started_at") or "") >= since]
            done = {r["config_sha256"] for r in recent if r["status"] == "finished"}
            failed = {r["config_sha256"] for r in recent if r["status"] == "failed"} - done
            failed_now = len(failed)
            # our claims are released by now: any left on these cells belong to another runner that has them
            others = {c["config_sha256"] for c in store.claims()} & (mine - done - failed)
            runner.say(f"[{PROG}] suite {plan.suite}: {len(done)} finished, {failed_now} failed, "
                       + (f"{len(others)} being run by another runner, " if others else "")
                       + f"{len(mine) - len(done) - failed_now - len(others)} not run, in "
                       f"{runner._fmt_s(time.time() - started)}")
    with ResultStore(results) as store:
        records = store.records()
    try:
        paths = write_report(records, Path(str(bench.report)), ops=bench.get("ops"),
                             title=f"pcbench leaderboard ({results.name})", source=str(results))
    except ValueError as err:
        return _fail(f"the cells ran but the report failed: {err}")
    runner.say(f"[{PROG}] report of {len(records)} records in {results}:\n  {paths['md']}\n  {paths['html']}\n"
               f"  {paths['csv']}\n[{PROG}] done in {runner._fmt_s(time.time() - t0)}")
    return 1 if failed_now else 0


if __name__ == "__main__":
    raise SystemExit(main())
