"""Run-time records of a sweep: each finished run's wall time, appended as one JSON line to
`<log_dir>/timings.jsonl` with the machine it ran on, and the sums a comparison report shows.

    record_time("out/logs", "hps_equal_s0", 812.4, parallel=2)
    run_time("out/logs", ["hps_equal_s0", ...])  # {"seconds", "runs", "of_runs", ...}
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import time
from typing import Sequence

TIMINGS = "timings.jsonl"


@functools.lru_cache(maxsize=None)
def machine() -> str:
    """This machine in a few words: its CPU model and core count, and its GPUs (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    gpus = []
    if shutil.which("nvidia-smi") is not None:
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                     timeout=60)
            gpus = [line.split(":", 1)[1].split("(")[0].strip()
                    for line in listing.stdout.splitlines() if line.startswith("GPU ")]
        except (OSError, subprocess.SubprocessError, IndexError):
            gpus = []
    if gpus:
        text += ", " + ", ".join(f"{gpus.count(g)} x {g}" for g in dict.fromkeys(gpus))
    return text + ", " + platform.system()


def record_time(log_dir: str, name: str, seconds: float, parallel: int) -> None:
    """Appends a finished run's wall time to `<log_dir>/timings.jsonl` (one JSON line per run
    and attempt: a resumed run's line counts its last part only)."""
    line = {"run": name, "seconds": round(seconds, 1), "parallel": parallel,
            "machine": machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(log_dir, TIMINGS), "a") as f:
        f.write(json.dumps(line) + "\n")


def read_times(log_dir: str) -> dict:
    """{run: [line, ...]} from `<log_dir>/timings.jsonl` (empty when there is none)."""
    times = {}
    try:
        with open(os.path.join(log_dir, TIMINGS)) as f:
            for text in f:
                if text.strip():
                    line = json.loads(text)
                    times.setdefault(line["run"], []).append(line)
    except FileNotFoundError:
        pass
    return times


def run_time(log_dir: str, names: Sequence[str]) -> dict:
    """The wall time of the runs `names` from `<log_dir>/timings.jsonl`: summed over runs (and
    over the parts of a resumed run), with the machines and how many runs shared them at once.
    {"seconds", "runs" (those with a record), "of_runs", "parallel": [...], "machines": [...]}"""
    times = read_times(log_dir)
    lines = [line for name in names for line in times.get(name, [])]
    return {"seconds": round(sum(line["seconds"] for line in lines), 1),
            "runs": sum(name in times for name in names), "of_runs": len(names),
            "parallel": sorted({line["parallel"] for line in lines}),
            "machines": sorted({line["machine"] for line in lines})}
