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

Variants are built and warmed up first, then timed in turn (interleaved) `--repeats` times, so
that a change in the machine's load falls on all of them alike.

    python scripts/benchmark.py                                   # CPU, multi_digits, small_cnn
    python scripts/benchmark.py --weighting=all --out=bench.json  # + per-method step cost
    python scripts/benchmark.py --variants=step_cost              # K and mode costs vs the floor
    python scripts/benchmark.py --variants=architectures          # each architecture vs hps
    python scripts/benchmark.py --strategy=mirrored --num_gpus=2  # on a GPU workstation

Absolute times depend on the machine and its load; compare ratios from one run. A flag value
that is not known (a task, a weighting method, a variant, a backbone, a strategy) prints
`error: ...` and exits with status 2 before anything is built. The cost of many tasks (time and
memory against the number of tasks): scripts/benchmark_tasks.py.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

import mtl  # noqa: E402
from mtl import cli  # noqa: E402
from mtl.data import multi_digits  # noqa: E402

from benchmark_common import machine, timed_interleaved, validate_list, write_json  # noqa: E402

TASKS = ("left", "right", "sum")
VARIANTS = ("mtl", "mtl/steps_per_loop=1", "mtl/steps_per_loop=N", "mtl/jit_compile",
            "mtl/bfloat16", "mtl/float16", "mtl/grad_accum", "keras_fit", "keras_fit/spe=10",
            "naive_per_task", "bare_step", "mtl/pipeline")

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

CE = keras.losses.SparseCategoricalCrossentropy


def _weighting_variant(name: str):
    """(method, mode, K) of `weighting/<method>/<exact|rep>[/K=2]`, else None."""
    parts = name.split("/")
    if parts[0] == "weighting" and len(parts) in (3, 4) and parts[1] in mtl.weighting.METHODS \
            and parts[2] in ("exact", "rep") and parts[3:] in ([], ["K=2"]):
        return parts[1], parts[2], 2 if parts[3:] == ["K=2"] else 1
    return None


validate_list("tasks", lambda v: v in TASKS, f"some of {list(TASKS)}")
validate_list("weighting", lambda v: v == "all" or v in mtl.weighting.METHODS,
              f"'all' or some of {sorted(mtl.weighting.METHODS)}")
validate_list("variants", lambda v: v in VARIANTS or v in ("step_cost", "architectures")
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


def variant_names() -> list[str]:
    """The variants --variants names, in order ('step_cost' and 'architectures' spelled out)."""
    names = list(STEP_COST) if FLAGS.variants == ["step_cost"] else list(FLAGS.variants)
    if names == ["architectures"]:
        names = [f"architecture/{a}" for a in mtl.architectures.ARCHITECTURES]
    return names


def builders(strategy, memory, names) -> dict:
    """{variant: build() -> run_steps(n)}: the fixed variants and those of `names` that name an
    architecture or a weighting method (architecture/<name>, weighting/<method>/<mode>[/K=2])."""
    batch, n = FLAGS.batch_size, FLAGS.steps_per_loop
    built = {
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
    for name in names:
        if name.startswith("architecture/"):
            built[name] = (lambda a=name.split("/", 1)[1]: mtl_variant(
                strategy, memory, architecture=a, steps_per_loop=n))
        parsed = _weighting_variant(name)
        if parsed is not None:
            method, mode, k = parsed
            built[name] = (lambda m=method, g=mode, k=k: mtl_variant(
                strategy, in_memory_data(batch // k), weighting=m, gradient_mode=g,
                steps_per_loop=n, grad_accum_steps=k))
    return built


def add_weighting_methods(names: list, built: dict, strategy, memory) -> None:
    """Appends to `names` (and `built`) every mode of each --weighting method, with
    weighting/equal/exact first when it is not there yet (the methods' time vs equal)."""
    n = FLAGS.steps_per_loop
    methods = sorted(mtl.weighting.METHODS) if FLAGS.weighting == ["all"] else FLAGS.weighting
    for method in methods:
        cls = mtl.weighting.METHODS[method]
        modes = ["exact"] + (["rep"] if getattr(cls, "supports_rep", False) else [])
        for mode in modes:
            built[f"weighting/{method}/{mode}"] = (
                lambda m=method, g=mode: mtl_variant(strategy, memory, weighting=m,
                                                     gradient_mode=g, steps_per_loop=n))
            names.append(f"weighting/{method}/{mode}")
    if methods and "weighting/equal/exact" not in names:
        names.insert(0, "weighting/equal/exact")
        built["weighting/equal/exact"] = lambda: mtl_variant(strategy, memory,
                                                             steps_per_loop=n)


def with_ratios(seconds: dict) -> dict:
    """{variant: its row}: ms per step (median, min, max), examples/s and the time ratios to
    mtl, to equal weighting (weighting/ variants), to bare_step and to hps (architecture/)."""
    results = {name: {"ms_per_step": s * 1e3, "ms_min": low * 1e3, "ms_max": high * 1e3,
                      "examples_per_sec": FLAGS.batch_size / s}
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
    return results


def main(argv):
    del argv
    strategy = mtl.distribute.get_strategy(FLAGS.strategy, num_gpus=FLAGS.num_gpus,
                                           cpu_replicas=FLAGS.cpu_replicas)
    memory = in_memory_data(FLAGS.batch_size)
    names = variant_names()
    built = builders(strategy, memory, names)
    unknown = [v for v in names if v not in built]
    if unknown:
        raise mtl.UsageError(f"Unknown variant {unknown[0]!r}; choose from {sorted(built)}.")
    add_weighting_methods(names, built, strategy, memory)
    # The real pipeline is timed after one epoch, once its cache holds the decoded examples
    # (the steady state of a run); the first epoch also reads and decodes the TFRecords.
    warmups = {"mtl/pipeline": 12_000 // FLAGS.batch_size + 10}
    seconds = timed_interleaved({name: built[name]() for name in names}, FLAGS.steps,
                                FLAGS.repeats, warmups)
    results = with_ratios(seconds)
    print(format_table(results))
    write_json(FLAGS.out, {"machine": machine(), "strategy": FLAGS.strategy,
                           "replicas": strategy.num_replicas_in_sync,
                           "batch_size": FLAGS.batch_size, "backbone": FLAGS.backbone,
                           "tasks": FLAGS.tasks, "steps_per_loop": FLAGS.steps_per_loop,
                           "results": results})
    print(f"wrote {FLAGS.out}")


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
