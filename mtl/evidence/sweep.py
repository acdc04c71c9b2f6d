"""Running many runs of an experiment script as subprocesses (scripts/run_baselines.py,
scripts/compare.py): what the runs are, which are already complete, and running the others,
one at a time or N at once.

    runs = [sweep.Run("stl_left_s0", [..., "--seed=0"]), ...]
    failures = sweep.run_all(runs, parallel=4, env=sweep.subprocess_env(ROOT),
                             log_dir="out/logs")

Each run is `python experiments/<name>.py --model_dir=<out>/<run> <flags>`; an experiment
resumes from its model_dir, so a run folder with a partial run continues where it stopped.
With N > 1 runs at once and GPUs visible (CUDA_VISIBLE_DEVICES's entries when it is set, else
those `nvidia-smi -L` lists), the k-th of the N slots runs its runs on GPU k mod G alone
(CUDA_VISIBLE_DEVICES=<that GPU>); without GPUs, N processes share the CPUs. Each finished
run's wall time goes to `<log_dir>/timings.jsonl` (mtl.evidence.timing).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

from mtl import runs as runs_lib
from mtl.config import Config
from mtl.errors import UsageError
from mtl.evidence.timing import record_time
from mtl.training import run_record


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: its folder name under the output folder and its command line."""

    name: str
    command: tuple


@dataclasses.dataclass(frozen=True)
class Failure:
    name: str
    status: int
    log: str | None


def experiment_script(name: str, experiments_dir: str) -> str:
    """`<experiments_dir>/<name>.py`, refused (UsageError) when it does not exist."""
    script = os.path.join(experiments_dir, f"{name}.py")
    if not os.path.exists(script):
        raise UsageError(f"--experiment={name!r}: no experiment script {script}.")
    return script


def experiment_tasks(name: str, experiments_dir: str) -> list[str]:
    """The task names of experiments/<name>.py (with the default config)."""
    experiment = runs_lib.load_experiment(name, experiments_dir)
    return [t.name for t in experiment.tasks(Config())]


def chosen_tasks(value: str | None, available: Sequence[str]) -> tuple:
    """The tasks a --tasks value names (comma-separated; None: every task of `available`)."""
    tasks = tuple(t.strip() for t in value.split(",") if t.strip()) if value else \
        tuple(available)
    if not tasks or [t for t in tasks if t not in available]:
        raise UsageError(f"--tasks={value!r}: the experiment's tasks are {list(available)}.")
    return tasks


def check_parallel(parallel: int) -> None:
    """Refuses a number of runs at once below 1."""
    if parallel < 1:
        raise UsageError(f"--parallel={parallel}: expected an int >= 1.")


def check_extra(extra: Sequence[str], own_flags: Sequence[str], program: str, why: str) -> None:
    """Refuses flags after `--` that would override what `program` sets for each run; `why`
    ends the message (what the program does instead)."""
    for flag in extra:
        name = "--" + flag.lstrip("-").split("=", 1)[0]  # absl takes -flag and --flag alike.
        if flag.startswith("-") and name in own_flags:
            raise UsageError(f"{flag!r} after `--`: {program} sets {', '.join(own_flags)} for "
                             f"each run itself {why}")


def is_complete(model_dir: str, experiment: str, config: Config, *,
                validation: bool = False) -> bool:
    """Whether `model_dir` holds a finished run of `experiment` made with `config`: results.json
    at step `config.train_steps` (with validation results when `validation`), and config.json
    recording the experiment and the same value of every setting that shapes a run (those in
    `Config.FREE_TO_CHANGE` may differ)."""
    results = run_record.read(os.path.join(model_dir, "results.json"))
    recorded = run_record.read(os.path.join(model_dir, "config.json"))
    if not results or not recorded or results.get("step") != config.train_steps:
        return False
    if validation and "validation" not in results:
        return False
    if recorded.pop("experiment", None) != experiment:
        return False
    # The experiment's own settings: checked by the experiment when the run resumes.
    recorded.pop("experiment_settings", None)
    changes = run_record.differences(recorded, config.to_json())
    return not [f for f in changes if f not in Config.FREE_TO_CHANGE]


def subprocess_env(root: str, environ: Mapping[str, str] | None = None) -> dict:
    """The environment of the runs: this one, with `root` first on PYTHONPATH (the runs import
    the same `mtl` as this program)."""
    environ = dict(os.environ if environ is None else environ)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, environ.get("PYTHONPATH")) if p)
    return environ


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs runs may use: CUDA_VISIBLE_DEVICES's entries when it is set (up to the first
    negative one, as CUDA reads it: "" and "-1" hide every GPU), else one per line of
    `nvidia-smi -L`; [] when there are none or nvidia-smi is not installed. TensorFlow is not
    imported for this."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        gpus = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry or entry.startswith("-"):
                break
            gpus.append(entry)
        return gpus
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    count = sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    return [str(i) for i in range(count)]


def run_all(runs: Sequence[Run], *, parallel: int = 1, env: Mapping[str, str] | None = None,
            log_dir: str | None = None, keep_going: bool = False,
            gpus: Sequence[str] = (), say: Callable[[str], None] = print) -> list[Failure]:
    """Runs `runs` in order, `parallel` at a time; returns the failed ones (exit status != 0).

    Each run's output goes to `<log_dir>/<name>.log` (appended: a resumed run keeps what it
    wrote before), or to this process's stdout and stderr when `log_dir` is None (one run at a
    time only). With `gpus` and `parallel` > 1, slot k (0 <= k < parallel) runs on
    `gpus[k % len(gpus)]` alone, with memory growth on where slots share a GPU. After a failure
    no new run starts unless `keep_going`; runs already started finish.
    """
    check_parallel(parallel)
    if log_dir is None and parallel > 1:
        raise ValueError("run_all: runs at once need a log_dir (their outputs would mix).")
    env = dict(os.environ if env is None else env)
    pending, active, failures = list(runs), {}, []
    total, started = len(pending), 0
    try:
        while pending or active:
            while pending and len(active) < parallel and (keep_going or not failures):
                slot = min(set(range(parallel)) - set(active))
                run = pending.pop(0)
                started += 1
                active[slot] = _start(run, slot, env, log_dir, parallel, gpus,
                                      f"[{started}/{total}]", say)
            if not active:
                break
            for slot, (run, process, log, start) in list(active.items()):
                status = process.poll()
                if status is None:
                    continue
                del active[slot]
                if log is not None:
                    log.close()
                seconds = time.monotonic() - start
                if status == 0:
                    say(f"<== {run.name}: done in {seconds:.0f} s")
                    if log_dir is not None:
                        record_time(log_dir, run.name, seconds, parallel)
                    continue
                where = os.path.join(log_dir, f"{run.name}.log") if log_dir else None
                failures.append(Failure(run.name, status, where))
                say(f"<== {run.name}: FAILED with exit status {status} after {seconds:.0f} s"
                    + (f"; its output: {where}\n{_tail(where)}" if where else ""))
            if active:
                time.sleep(0.2)
    finally:
        # Interrupted (Ctrl-C, an error here): each run still going gets SIGTERM, on which an
        # experiment saves a checkpoint and stops, so the same command resumes it.
        for run, process, log, _ in active.values():
            if process.poll() is None:
                process.terminate()
        for run, process, log, _ in active.values():
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
            if log is not None:
                log.close()
    return failures


def _start(run: Run, slot: int, env: dict, log_dir: str | None, parallel: int,
           gpus: Sequence[str], counter: str, say):
    run_env = dict(env)
    where = ""
    if gpus and parallel > 1:
        run_env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        where = f" on GPU {run_env['CUDA_VISIBLE_DEVICES']}"
        if parallel > len(gpus):  # Several TF processes on one GPU: none may take all memory.
            run_env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    say(f"==> {counter} {run.name}{where}: {' '.join(run.command)}")
    log = None
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        log = open(os.path.join(log_dir, f"{run.name}.log"), "a")
        log.write(f"==> {' '.join(run.command)}\n")
        log.flush()
    sys.stdout.flush()
    process = subprocess.Popen(list(run.command), env=run_env,
                               stdout=log, stderr=subprocess.STDOUT if log else None)
    return run, process, log, time.monotonic()


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
