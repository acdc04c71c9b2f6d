#!/usr/bin/env python
"""Many-tasks benchmark: the cost of the gradient methods as the number of tasks grows.

On a celeb_a-style model (the resnet backbone on --sweep_image_size square RGB images, one binary
head per task, random data), for each task count of --tasks_sweep: the time per step and the peak
memory (resident set on CPU; the allocator's peak on a GPU) of each variant, as a ratio to equal
weighting at the same task count:

  equal             equal weighting
  exact/unchunked   --sweep_method in exact mode, one batched Jacobian of all tasks
  exact/chunked     exact mode, the default task chunks (or --sweep_chunk_size)
  exact/backward    exact mode's Gramian (every shared layer) with the weights applied by one
                    more backward pass (the partial-Jacobian path at full scope)
  partial           partial Jacobians: one variant partial/<scope> per --sweep_scope
  rep               rep mode (the Gramian of the representation's gradients)

Each (tasks, variant) runs in its own process (a process's peak memory only grows). Writes the
table to --out (JSON) and, with matplotlib installed, the plot of both ratios next to it (.png).

    python scripts/benchmark_tasks.py --tasks_sweep=3,12,40 --batch_size=32 --steps=3 \\
        --repeats=3 --out=docs/benchmark_tasks_cpu.json

Absolute times depend on the machine and its load; compare ratios from one run. A flag value
that is not known (a variant, a task count) prints `error: ...` and exits with status 2 before
anything is built. The step time of one model's variants: scripts/benchmark.py.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

import mtl  # noqa: E402
from mtl import cli  # noqa: E402

from benchmark_common import machine, timed_interleaved, validate_list, write_json  # noqa: E402

#: The many-task variants: (description, Trainer settings given T).
SWEEP_VARIANTS = {
    "equal": "equal weighting",
    "exact/unchunked": "exact mode, one batched Jacobian of all tasks",
    "exact/chunked": "exact mode, the default task chunks",
    "exact/backward": "exact mode's Gramian (every shared layer) with the weights applied by "
                      "one more backward pass (the partial-Jacobian path at full scope)",
    "partial": "partial Jacobians (one variant partial/<scope> per --sweep_scope)",
    "rep": "rep mode (the Gramian of the representation's gradients)",
}

#: A jacobian_scope "top:N" beyond any model's shared layers.
ALL_LAYERS = 10 ** 6
FLAGS = flags.FLAGS
flags.DEFINE_list("tasks_sweep", ["3", "12", "40"], "Task counts of the cost curve.")
flags.DEFINE_list("sweep_variants", list(SWEEP_VARIANTS), "Variants to run at each task count.")
flags.DEFINE_string("sweep_method", "mgda", "Gradient method of the variants.")
flags.DEFINE_list("sweep_scope", ["top:1", "top:2"], "jacobian_scope of the partial variants "
                  "(one variant partial/<scope> each).")
flags.DEFINE_integer("sweep_chunk_size", None, "jacobian_chunk_size of the exact/chunked "
                     "variant (unset: the default).", lower_bound=1)
flags.DEFINE_integer("sweep_image_size", 64, "Image side of the model.", lower_bound=8)
flags.DEFINE_integer("batch_size", 64, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 50, "Timed steps per repetition.", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed repetitions (the median is reported).", lower_bound=1)
flags.DEFINE_string("out", "benchmark_results/benchmark_tasks.json",
                    "Where to write the JSON table (the plot goes next to it).")
flags.DEFINE_string("sweep_child", None, "Internal: run one TASKS:VARIANT of the sweep and "
                    "print its measurement.")

validate_list("sweep_variants", lambda v: v in SWEEP_VARIANTS, f"some of {list(SWEEP_VARIANTS)}")
validate_list("tasks_sweep", lambda v: v.isdigit() and int(v) >= 1, "task counts >= 1")


def sweep_settings(variant: str, num_tasks: int) -> dict:
    """Trainer settings of a variant at `num_tasks` tasks."""
    method = {"weighting": FLAGS.sweep_method}
    if variant.startswith("partial/"):
        return dict(method, jacobian_scope=variant.split("/", 1)[1],
                    jacobian_chunk_size=FLAGS.sweep_chunk_size)
    return {"equal": {},
            "exact/unchunked": dict(method, jacobian_chunk_size=num_tasks),
            "exact/chunked": dict(method, jacobian_chunk_size=FLAGS.sweep_chunk_size),
            # top:N past the model's shared layers: the scope is every one of them.
            "exact/backward": dict(method, jacobian_scope=f"top:{ALL_LAYERS}",
                                   jacobian_chunk_size=FLAGS.sweep_chunk_size),
            "rep": dict(method, gradient_mode="rep")}[variant]


class RssSampler:
    """The largest resident set size seen while training (sampled every 5 ms from a thread),
    apart from the process's all-time peak, which includes building the graphs."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = None

    @staticmethod
    def current_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def __enter__(self):
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak_mb = max(self.peak_mb, self.current_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def sweep_child(spec: str) -> dict:
    """Builds and times one (tasks, variant) of the sweep in this process: its time per step
    (median, min, max over --repeats calls of --steps steps) and this process's peak memory."""
    count, variant = spec.split(":", 1)
    num_tasks = int(count)
    size = FLAGS.sweep_image_size
    keras.utils.set_random_seed(0)
    names = [f"attribute_{i}" for i in range(num_tasks)]
    model = mtl.architectures.build("hps", (size, size, 3),
                                    {n: mtl.heads.binary(1) for n in names}, backbone="resnet")
    tasks = [mtl.Task(n, loss=keras.losses.BinaryCrossentropy(from_logits=True))
             for n in names]
    rng = tf.random.Generator.from_seed(0)
    batches = 4
    images = rng.uniform([batches, FLAGS.batch_size, size, size, 3])
    labels = {n: tf.cast(rng.uniform([batches, FLAGS.batch_size, 1]) < 0.5, tf.float32)
              for n in names}
    data = tf.data.Dataset.from_tensor_slices((images, labels)).cache().repeat()
    trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.SGD(1e-3),
                          log_every=10 ** 9, checkpoint_every=None,
                          steps_per_loop=FLAGS.steps, **sweep_settings(variant, num_tasks))
    run = lambda n: trainer.fit(data, steps=trainer.global_step + n)  # noqa: E731
    run(1)  # tracing and graph optimisation (their memory is the process peak's, not a step's)
    sampler = RssSampler()
    with sampler:
        seconds = timed_interleaved({variant: run}, FLAGS.steps, FLAGS.repeats,
                                    {variant: 1})[variant]
    result = {"tasks": num_tasks, "variant": variant,
              "ms_per_step": seconds[0] * 1e3, "ms_min": seconds[1] * 1e3,
              "ms_max": seconds[2] * 1e3, "training_peak_rss_mb": sampler.peak_mb,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
              "jacobian_chunk_size": getattr(trainer._steps.source, "chunk_size", None)}
    if tf.config.list_physical_devices("GPU"):
        result["gpu_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return result


def child_command(count: str, variant: str) -> list[str]:
    """This program measuring one (tasks, variant) with this run's settings."""
    return [sys.executable, os.path.abspath(__file__), f"--sweep_child={count}:{variant}",
            f"--batch_size={FLAGS.batch_size}", f"--steps={FLAGS.steps}",
            f"--repeats={FLAGS.repeats}", f"--sweep_method={FLAGS.sweep_method}",
            f"--sweep_scope={','.join(FLAGS.sweep_scope)}",
            f"--sweep_image_size={FLAGS.sweep_image_size}"] + (
                [f"--sweep_chunk_size={FLAGS.sweep_chunk_size}"]
                if FLAGS.sweep_chunk_size else [])


def tasks_sweep() -> list[dict]:
    """Runs every (tasks, variant) of the sweep in its own process; ratios to equal."""
    rows = []
    for count in FLAGS.tasks_sweep:
        variants = [v for v in FLAGS.sweep_variants if v != "equal"]
        if "partial" in variants:
            at = variants.index("partial")
            variants[at:at + 1] = [f"partial/{scope}" for scope in FLAGS.sweep_scope]
        for variant in ["equal"] + variants:
            done = subprocess.run(child_command(count, variant), capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"{count}:{variant} failed:\n{done.stderr[-3000:]}")
            row = json.loads(lines[-1])
            rows.append(row)
            print(f"tasks={count} {variant}: {row['ms_per_step']:.0f} ms/step, "
                  f"peak {row['peak_rss_mb']:.0f} MB", flush=True)
    for row in rows:
        equal = next(r for r in rows if r["tasks"] == row["tasks"] and r["variant"] == "equal")
        row["time_vs_equal"] = row["ms_per_step"] / equal["ms_per_step"]
        row["memory_vs_equal"] = row["peak_rss_mb"] / equal["peak_rss_mb"]
        if "gpu_peak_mb" in row:
            row["gpu_memory_vs_equal"] = row["gpu_peak_mb"] / equal["gpu_peak_mb"]
    return rows


def format_sweep(rows) -> str:
    lines = ["| tasks | variant | ms/step (median) | min | max | time vs equal | peak memory MB "
             "| memory vs equal |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        memory = r.get("gpu_peak_mb", r["peak_rss_mb"])
        ratio = r.get("gpu_memory_vs_equal", r["memory_vs_equal"])
        lines.append(f"| {r['tasks']} | {r['variant']} | {r['ms_per_step']:.0f} | "
                     f"{r['ms_min']:.0f} | {r['ms_max']:.0f} | {r['time_vs_equal']:.2f}x | "
                     f"{memory:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def plot_sweep(rows, path: str) -> bool:
    """Time and memory vs tasks, one line per variant, as ratios to equal (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        for axis, key in zip(axes, ("time_vs_equal", "memory_vs_equal")):
            axis.plot([r["tasks"] for r in mine], [r[key] for r in mine], marker="o",
                      label=variant)
    for axis, title in zip(axes, ("time per step vs equal", "peak memory vs equal")):
        axis.set_xlabel("tasks")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main(argv):
    del argv
    if FLAGS.sweep_child:
        print(json.dumps(sweep_child(FLAGS.sweep_child)))
        return
    rows = tasks_sweep()
    print(format_sweep(rows))
    write_json(FLAGS.out, {"machine": machine(), "batch_size": FLAGS.batch_size,
                           "image_size": FLAGS.sweep_image_size, "method": FLAGS.sweep_method,
                           "scopes": FLAGS.sweep_scope, "steps": FLAGS.steps,
                           "repeats": FLAGS.repeats, "results": rows})
    plot = os.path.splitext(FLAGS.out)[0] + ".png"
    if plot_sweep(rows, plot):
        print(f"wrote {plot}")
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
