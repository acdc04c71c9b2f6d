"""What the two benchmark programs share (scripts/benchmark.py, the step time of each variant,
and scripts/benchmark_tasks.py, the cost of many tasks): interleaved timing, the list-flag check,
the machine line and writing the JSON table. Imported by them as `benchmark_common` (a program's
own folder is first on sys.path); it defines no flags.
"""

import json
import os
import statistics
import time

import tensorflow as tf
from absl import flags


def timed_interleaved(runners, steps, repeats, warmups):
    """runners: {name: run_steps(n)}. Warms each up, then times every one in turn `repeats`
    times; returns {name: (median, min, max) seconds per step over the repetitions}."""
    for name, run_steps in runners.items():
        run_steps(warmups.get(name) or max(steps // 5, 2))  # tracing and compilation
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run_steps in runners.items():
            start = time.perf_counter()
            run_steps(steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def validate_list(flag: str, known, expected: str) -> None:
    """Refuses, when the flags are parsed, a value of list flag `flag` that `known` rejects."""
    def check(values):
        unknown = [v for v in values if not known(v)]
        if unknown:
            raise flags.ValidationError(f"unknown value {unknown[0]!r}; expected {expected}")
        return True

    flags.register_validator(flag, check)


def machine() -> str:
    """The JSON tables' "machine": the CPU core count and the number of GPUs."""
    gpus = tf.config.list_physical_devices("GPU")
    return f"{os.cpu_count()} CPU cores" + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU")


def write_json(path: str, table: dict) -> None:
    """Writes `table` to `path` (indented), creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
