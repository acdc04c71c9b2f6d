#!/usr/bin/env python
"""Step-time benchmark: mtl.Trainer against the loops users would pick instead.

One process, one model, the same data and global batch for every variant; after a warm-up, each
variant trains `--steps` steps `--repeats` times and the median time per step is reported (with the
fastest and slowest repetition beside it, so a noisy run shows), with the ratio to `mtl.Trainer` in
its default settings (ratio > 1: slower than mtl):

  mtl                    mtl.Trainer, defaults (10 steps per compiled call)
  mtl/steps_per_loop=1   one step per compiled call
  mtl/steps_per_loop=N   N (--steps_per_loop) steps inside one compiled call
  mtl/jit_compile        XLA for forward + backward
  mtl/bfloat16, float16  mixed precision (float16 with dynamic loss scaling)
  mtl/grad_accum=2       two micro-batches of half the batch per update (same examples/step)
  keras_fit              Keras model.fit on the same multi-output model, same losses and loss
                         weights, Keras defaults (steps_per_execution=1)
  keras_fit/spe=10       the same with steps_per_execution=10 (mtl's default steps per loop)
  naive_per_task         one Keras model per task sharing the backbone layer objects, each
                         trained with its own fit call in turn on the same batches
  bare_step              a bare compiled GradientTape step called in a Python loop (the floor)
  mtl/pipeline           mtl.Trainer fed by the real TFDS pipeline instead of in-memory tensors
                         (timed after one epoch, when its cache is full)
  weighting/<method>/<mode>[/K=2]
                         mtl.Trainer with a weighting method in exact or rep mode, with one
                         micro-batch per update or two of half the batch (the same examples
                         per update); `--weighting` adds every mode of the methods named
  architecture/<name>    mtl.Trainer (equal weighting) on a soft-sharing architecture of
                         `mtl.architectures` with its default options, experts built from
                         --backbone; `--variants=architectures` times all of them, with
                         time vs hps
  --variants=step_cost   the cost of one semantics: bare_step, equal, an adaptive loss method
                         (uncertainty: with K=2 it needs a forward pre-pass over the update), an
                         exact Jacobian method and a rep-mode method (mgda), each with K=1, 2
  --tasks_sweep=3,12,40  the cost of many tasks, on a celeb_a-style model (the resnet backbone
                         on 64x64x3 images, one binary head per task, random data): time per
                         step and peak memory (resident set on CPU; the allocator's peak on a
                         GPU) of equal weighting, --sweep_method in exact mode (one Jacobian of
                         all tasks, and the default task chunks), a partial
                         Jacobian (--sweep_scope) and rep mode, each as a ratio to equal at the
                         same task count. Each (tasks, variant) runs in its own process (a
                         process's peak memory only grows); a plot goes next to --out

Variants are built and warmed up first, then timed in turn (interleaved) `--repeats` times, so
that a change in the machine's load falls on all of them alike.

    python scripts/benchmark.py                                   # CPU, multi_digits, small_cnn
    python scripts/benchmark.py --weighting=all --out=bench.json  # + per-method step cost
    python scripts/benchmark.py --variants=step_cost              # K and mode costs vs the floor
    python scripts/benchmark.py --variants=architectures          # each architecture vs hps
    python scripts/benchmark.py --strategy=mirrored --num_gpus=2  # on a GPU workstation
    python scripts/benchmark.py --tasks_sweep=3,12,40 --batch_size=32 --steps=3 --repeats=3

Absolute times depend on the machine and its load; compare ratios from one run. A flag value
that is not known (a task, a weighting method, a variant, a backbone, a strategy) prints
`error: ...` and exits with status 2 before anything is built.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

import mtl  # noqa: E402
from mtl import cli  # noqa: E402
from mtl.data import multi_digits  # noqa: E402

TASKS = ("left", "right", "sum")
VARIANTS = ("mtl", "mtl/steps_per_loop=1", "mtl/steps_per_loop=N", "mtl/jit_compile",
            "mtl/bfloat16", "mtl/float16", "mtl/grad_accum", "keras_fit", "keras_fit/spe=10",
            "naive_per_task", "bare_step", "mtl/pipeline")

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
flags.DEFINE_enum("backbone", "small_cnn", sorted(mtl.backbones.BUILDERS), "Backbone builder.")
flags.DEFINE_list("tasks", list(TASKS), "multi_digits tasks.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 50, "Timed steps per repetition.", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed repetitions (the median is reported).", lower_bound=1)
flags.DEFINE_integer("steps_per_loop", 50, "N for mtl/steps_per_loop=N and the knob variants.",
                     lower_bound=1)
flags.DEFINE_list("variants", list(VARIANTS), "Variants to run ('step_cost': the cost of one "
                  "semantics; weighting/<method>/<exact|rep>[/K=2]: one method).")
flags.DEFINE_list("weighting", [], "Weighting methods to time ('all' for every method).")
flags.DEFINE_enum("strategy", "default", mtl.distribute.STRATEGIES, "Distribution strategy name.")
flags.DEFINE_integer("num_gpus", None, "GPUs for --strategy=mirrored.", lower_bound=1)
flags.DEFINE_integer("cpu_replicas", None, "Logical CPU replicas for --strategy=mirrored.",
                     lower_bound=1)
flags.DEFINE_string("data_dir", None, "TFDS data folder.")
flags.DEFINE_string("out", "benchmark_results/benchmark.json", "Where to write the JSON table.")
flags.DEFINE_list("tasks_sweep", [], "Task counts for the many-task cost curve (e.g. 3,12,40).")
flags.DEFINE_list("sweep_variants", list(SWEEP_VARIANTS), "Variants of --tasks_sweep.")
flags.DEFINE_string("sweep_method", "mgda", "Gradient method of the --tasks_sweep variants.")
flags.DEFINE_list("sweep_scope", ["top:1", "top:2"], "jacobian_scope of the sweep's partial "
                  "variants (one variant partial/<scope> each).")
flags.DEFINE_integer("sweep_chunk_size", None, "jacobian_chunk_size of the sweep's "
                     "exact/chunked variant (unset: the default).", lower_bound=1)
flags.DEFINE_integer("sweep_image_size", 64, "Image side of the --tasks_sweep model.",
                     lower_bound=8)
flags.DEFINE_string("sweep_child", None, "Internal: run one TASKS:VARIANT of the sweep and "
                    "print its measurement.")

CE = keras.losses.SparseCategoricalCrossentropy


def _weighting_variant(name: str):
    """(method, mode, K) of `weighting/<method>/<exact|rep>[/K=2]`, else None."""
    parts = name.split("/")
    if parts[0] == "weighting" and len(parts) in (3, 4) and parts[1] in mtl.weighting.METHODS \
            and parts[2] in ("exact", "rep") and parts[3:] in ([], ["K=2"]):
        return parts[1], parts[2], 2 if parts[3:] == ["K=2"] else 1
    return None


def _validate_list(flag: str, known, expected: str) -> None:
    """Refuses, when the flags are parsed, a value of list flag `flag` that `known` rejects."""
    def check(values):
        unknown = [v for v in values if not known(v)]
        if unknown:
            raise flags.ValidationError(f"unknown value {unknown[0]!r}; expected {expected}")
        return True

    flags.register_validator(flag, check)


_validate_list("tasks", lambda v: v in TASKS, f"some of {list(TASKS)}")
_validate_list("sweep_variants", lambda v: v in SWEEP_VARIANTS, f"some of {list(SWEEP_VARIANTS)}")
_validate_list("tasks_sweep", lambda v: v.isdigit() and int(v) >= 1, "task counts >= 1")
_validate_list("weighting", lambda v: v == "all" or v in mtl.weighting.METHODS,
               f"'all' or some of {sorted(mtl.weighting.METHODS)}")
_validate_list("variants", lambda v: v in VARIANTS or v in ("step_cost", "architectures")
               or _weighting_variant(v) is not None
               or (v.startswith("architecture/")
                   and v.split("/", 1)[1] in mtl.architectures.ARCHITECTURES),
               f"'step_cost', 'architectures', or some of {list(VARIANTS)}, "
               "weighting/<method>/<exact|rep>[/K=2] and architecture/<name>")


def task_specs():
    specs = {"left": (lambda: mtl.heads.classification(10), lambda: CE(from_logits=True), 1.0),
             "right": (lambda: mtl.heads.classification(10), lambda: CE(from_logits=True), 1.0),
             "sum": (lambda: mtl.heads.regression(1, hidden=(64,)),
                     lambda: keras.losses.MeanSquaredError(), 0.1)}
    return {name: specs[name] for name in FLAGS.tasks}


def build_model(seed=0, architecture="hps"):
    keras.utils.set_random_seed(seed)
    return mtl.architectures.build(architecture, multi_digits.IMAGE_SHAPE,
                                   {t: head() for t, (head, _, _) in task_specs().items()},
                                   backbone=FLAGS.backbone)


def mtl_tasks():
    return [mtl.Task(t, loss=loss(), weight=w) for t, (_, loss, w) in task_specs().items()]


def in_memory_data(batch_size):
    """A few distinct batches of real multi_digits examples, as tensors, repeated."""
    ds = multi_digits.load("train", batch_size=batch_size, training=True, tasks=FLAGS.tasks,
                           data_dir=FLAGS.data_dir, seed=0)
    batches = list(ds.take(8))
    stacked = tf.nest.map_structure(lambda *t: tf.stack(t), *batches)
    return tf.data.Dataset.from_tensor_slices(stacked).cache().repeat()


STEP_COST = ["bare_step", "weighting/equal/exact", "weighting/equal/exact/K=2",
             "weighting/uncertainty/exact",
             "weighting/uncertainty/exact/K=2", "weighting/mgda/exact",
             "weighting/mgda/exact/K=2", "weighting/mgda/rep", "weighting/mgda/rep/K=2"]


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


def mtl_variant(strategy, data, policy="float32", weighting="equal", architecture="hps",
                **trainer_args):
    keras.mixed_precision.set_global_policy(policy)
    try:
        with strategy.scope():
            model = build_model(architecture=architecture)
            trainer = mtl.Trainer(model, mtl_tasks(), optimizer=keras.optimizers.Adam(1e-3),
                                  weighting=weighting, strategy=strategy, log_every=10 ** 9,
                                  checkpoint_every=None, **trainer_args)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    def run(n):
        trainer.fit(data, steps=trainer.global_step + n)

    return run


def keras_fit_variant(strategy, data, steps_per_execution=1):
    with strategy.scope():
        model = build_model()
        specs = task_specs()
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss={t: loss() for t, (_, loss, _) in specs.items()},
                      loss_weights={t: w for t, (_, _, w) in specs.items()},
                      steps_per_execution=steps_per_execution)
    iterator_data = data

    def run(n):
        model.fit(iterator_data, steps_per_epoch=n, epochs=1, verbose=0)

    return run


def naive_variant(strategy, data):
    with strategy.scope():
        joint = build_model()
        specs = task_specs()
        models = {}
        for t, (_, loss, w) in specs.items():
            models[t] = keras.Model(joint.inputs, joint.task_model(t).outputs)
            models[t].compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss())
    per_task = {t: data.map(lambda x, y, t=t: (x, y[t])) for t in specs}

    def run(n):
        for t, model in models.items():  # each task in turn, n steps each
            model.fit(per_task[t], steps_per_epoch=n, epochs=1, verbose=0)

    return run


def bare_variant(strategy, data):
    model = build_model()
    specs = task_specs()
    losses = {t: loss() for t, (_, loss, _) in specs.items()}
    weights = {t: w for t, (_, _, w) in specs.items()}
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    iterator = iter(data)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            total = tf.add_n([weights[t] * losses[t](y[t], out[t]) for t in specs])
        grads = tape.gradient(total, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return total

    def run(n):
        for _ in range(n):
            x, y = next(iterator)
            step(x, y)
        step(x, y).numpy()  # wait for the device

    return run


# --------------------------------------------------------------------- many-task cost curve
def sweep_settings(variant: str, num_tasks: int) -> dict:
    """Trainer settings of a --tasks_sweep variant at `num_tasks` tasks."""
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
        import threading

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
    import resource

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


def tasks_sweep() -> list[dict]:
    """Runs every (tasks, variant) of the sweep in its own process; ratios to equal."""
    import subprocess
    import sys

    rows = []
    for count in FLAGS.tasks_sweep:
        variants = [v for v in FLAGS.sweep_variants if v != "equal"]
        if "partial" in variants:
            at = variants.index("partial")
            variants[at:at + 1] = [f"partial/{scope}" for scope in FLAGS.sweep_scope]
        for variant in ["equal"] + variants:
            command = [sys.executable, os.path.abspath(__file__), f"--sweep_child={count}:{variant}",
                       f"--batch_size={FLAGS.batch_size}", f"--steps={FLAGS.steps}",
                       f"--repeats={FLAGS.repeats}", f"--sweep_method={FLAGS.sweep_method}",
                       f"--sweep_scope={','.join(FLAGS.sweep_scope)}",
                       f"--sweep_image_size={FLAGS.sweep_image_size}"] + (
                           [f"--sweep_chunk_size={FLAGS.sweep_chunk_size}"]
                           if FLAGS.sweep_chunk_size else [])
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
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
    if FLAGS.tasks_sweep:
        rows = tasks_sweep()
        print(format_sweep(rows))
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump({"machine": machine(), "batch_size": FLAGS.batch_size,
                       "image_size": FLAGS.sweep_image_size, "method": FLAGS.sweep_method,
                       "scopes": FLAGS.sweep_scope, "steps": FLAGS.steps,
                       "repeats": FLAGS.repeats, "results": rows}, f, indent=2)
        if plot_sweep(rows, os.path.splitext(FLAGS.out)[0] + ".png"):
            print(f"wrote {os.path.splitext(FLAGS.out)[0]}.png")
        print(f"wrote {FLAGS.out}")
        return
    strategy = mtl.distribute.get_strategy(FLAGS.strategy, num_gpus=FLAGS.num_gpus,
                                           cpu_replicas=FLAGS.cpu_replicas)
    batch = FLAGS.batch_size
    memory = in_memory_data(batch)
    n = FLAGS.steps_per_loop
    builders = {
        "mtl": lambda: mtl_variant(strategy, memory),
        "mtl/steps_per_loop=1": lambda: mtl_variant(strategy, memory, steps_per_loop=1),
        "mtl/steps_per_loop=N": lambda: mtl_variant(strategy, memory, steps_per_loop=n),
        "mtl/jit_compile": lambda: mtl_variant(strategy, memory, steps_per_loop=n,
                                               jit_compile=True),
        "mtl/bfloat16": lambda: mtl_variant(strategy, memory, policy="mixed_bfloat16",
                                            steps_per_loop=n),
        "mtl/float16": lambda: mtl_variant(strategy, memory, policy="mixed_float16",
                                           steps_per_loop=n),
        "mtl/grad_accum": lambda: mtl_variant(strategy, in_memory_data(batch // 2),
                                              steps_per_loop=n, grad_accum_steps=2),
        "keras_fit": lambda: keras_fit_variant(strategy, memory),
        "keras_fit/spe=10": lambda: keras_fit_variant(strategy, memory, steps_per_execution=10),
        "naive_per_task": lambda: naive_variant(strategy, memory),
        "bare_step": lambda: bare_variant(strategy, memory),
        "mtl/pipeline": lambda: mtl_variant(strategy, multi_digits.load(
            "train", batch_size=batch, training=True, tasks=FLAGS.tasks,
            data_dir=FLAGS.data_dir, seed=0)),
    }
    # The real pipeline is timed after one epoch, once its cache holds the decoded examples
    # (the steady state of a run); the first epoch also reads and decodes the TFRecords.
    warmups = {"mtl/pipeline": 12_000 // batch + 10}
    names = STEP_COST if FLAGS.variants == ["step_cost"] else list(FLAGS.variants)
    if names == ["architectures"]:
        names = [f"architecture/{a}" for a in mtl.architectures.ARCHITECTURES]
    for name in names:
        if name.startswith("architecture/"):
            builders[name] = (lambda a=name.split("/", 1)[1]: mtl_variant(
                strategy, memory, architecture=a, steps_per_loop=n))
    for name in names:
        parsed = _weighting_variant(name)
        if parsed is not None:
            method, mode, k = parsed
            builders[name] = (lambda m=method, g=mode, k=k: mtl_variant(
                strategy, in_memory_data(batch // k), weighting=m, gradient_mode=g,
                steps_per_loop=n, grad_accum_steps=k))
    unknown = [v for v in names if v not in builders]
    if unknown:
        raise mtl.UsageError(f"Unknown variant {unknown[0]!r}; choose from {sorted(builders)}.")
    methods = sorted(mtl.weighting.METHODS) if FLAGS.weighting == ["all"] else FLAGS.weighting
    for method in methods:
        cls = mtl.weighting.METHODS[method]
        modes = ["exact"] + (["rep"] if getattr(cls, "supports_rep", False) else [])
        for mode in modes:
            builders[f"weighting/{method}/{mode}"] = (
                lambda m=method, g=mode: mtl_variant(strategy, memory, weighting=m,
                                                     gradient_mode=g, steps_per_loop=n))
            names.append(f"weighting/{method}/{mode}")
    if methods and "weighting/equal/exact" not in names:
        names.insert(0, "weighting/equal/exact")
        builders["weighting/equal/exact"] = lambda: mtl_variant(strategy, memory,
                                                                steps_per_loop=n)
    seconds = timed_interleaved({name: builders[name]() for name in names}, FLAGS.steps,
                                FLAGS.repeats, warmups)
    results = {name: {"ms_per_step": s * 1e3, "ms_min": low * 1e3, "ms_max": high * 1e3,
                      "examples_per_sec": batch / s}
               for name, (s, low, high) in seconds.items()}
    base = results.get("mtl", next(iter(results.values())))["ms_per_step"]
    equal = results.get("weighting/equal/exact", results.get("mtl", {})).get("ms_per_step")
    bare = results.get("bare_step", {}).get("ms_per_step")
    hps = results.get("architecture/hps", {}).get("ms_per_step")
    for name, r in results.items():
        r["time_vs_mtl"] = r["ms_per_step"] / base
        if equal and name.startswith("weighting/"):
            r["time_vs_equal"] = r["ms_per_step"] / equal
        if bare:
            r["time_vs_bare_step"] = r["ms_per_step"] / bare
        if hps and name.startswith("architecture/"):
            r["time_vs_hps"] = r["ms_per_step"] / hps
    print(format_table(results))
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"machine": machine(), "strategy": FLAGS.strategy,
                   "replicas": strategy.num_replicas_in_sync, "batch_size": batch,
                   "backbone": FLAGS.backbone, "tasks": FLAGS.tasks,
                   "steps_per_loop": n, "results": results}, f, indent=2)
    print(f"wrote {FLAGS.out}")


def machine() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f"{os.cpu_count()} CPU cores" + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU")


def format_table(results) -> str:
    lines = ["| variant | ms/step (median) | min | max | examples/s | time vs mtl | time vs equal "
             "| time vs bare step | time vs hps |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        vs_equal = f"{r['time_vs_equal']:.2f}x" if "time_vs_equal" in r else ""
        vs_bare = f"{r['time_vs_bare_step']:.2f}x" if "time_vs_bare_step" in r else ""
        vs_hps = f"{r['time_vs_hps']:.2f}x" if "time_vs_hps" in r else ""
        lines.append(f"| {name} | {r['ms_per_step']:.2f} | {r['ms_min']:.2f} | "
                     f"{r['ms_max']:.2f} | {r['examples_per_sec']:.0f} | "
                     f"{r['time_vs_mtl']:.2f}x | {vs_equal} | {vs_bare} | {vs_hps} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
