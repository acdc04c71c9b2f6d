"""Trains `mtl.Trainer` and the plain reference (`tests/oracle.py`) on the same update batches for
each case given, and prints one JSON line per case with how far apart they end.

    python combination_matrix.py CASES_JSON

A case: {"replicas" (1: one device; 2: 2 mirrored logical CPUs), "method", "mode" (exact|rep),
"k" (micro-batches), "reg" (L2 on a shared layer), "frozen" (backbone frozen), "dropout" (a
Dropout layer in the backbone), "optimizer", "granularity", "clip" (clip_norm=CLIP_NORM), "chunk"
(jacobian_chunk_size), "scope" (N of jacobian_scope="top:N"), "arch" (a soft-sharing
architecture of `mtl.architectures` with MLP experts; "hps": the backbone and heads)}. Each
line also gives the case's "seconds" (to balance the cases between processes). The update
batch is 16 examples; task "a" misses labels (placeholder -1, sample weight 0), task "c" has no
label at all in some micro-batches. Run as a subprocess: the 2 logical CPUs are set up before
TensorFlow starts; one-device cases run on the first.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtl  # noqa: E402
import oracle  # noqa: E402

UPDATE_BATCH = 16
UPDATES = 3
TASKS = [("a", "sparse_ce", 1.0), ("b", "mse", 0.5), ("c", "sparse_ce", 1.0)]
CLIP_NORM = 0.3  # below the update gradients' norms here: the clipping is active


def data():
    rng = np.random.RandomState(0)
    n = UPDATE_BATCH * UPDATES
    x = rng.randn(n, 6).astype(np.float32)
    labels = {"a": rng.randint(0, 3, n).astype(np.int64),
              "b": (x[:, :1].sum(1) + 0.1 * rng.randn(n)).astype(np.float32),
              "c": (x[:, 1] > 0).astype(np.int64)}
    weights = {"a": (rng.rand(n) > 0.3).astype(np.float32),
               "b": np.ones(n, np.float32),
               # c: labelled only in the first half of every update batch, with fractional
               # weights (a micro-batch of 4 or 8 at the end has no label for c).
               "c": np.where(np.arange(n) % UPDATE_BATCH < 6, 0.5 + rng.rand(n), 0.0
                             ).astype(np.float32)}
    labels["a"] = np.where(weights["a"] > 0, labels["a"], -1)  # a placeholder, never read
    return x, labels, weights


#: Small options for the soft-sharing architectures (experts are 8-unit MLPs).
ARCH_OPTIONS = {"mmoe": {"num_experts": 2}, "cgc": {}, "ple": {"expert_units": 8},
                "dselect_k": {"num_experts": 3, "k": 2, "entropy_weight": 1e-2},
                "cross_stitch": {}}


def build_model(case):
    if case["arch"] != "hps":
        heads = {"a": mtl.heads.classification(3), "b": mtl.heads.regression(1),
                 "c": mtl.heads.classification(2)}
        return mtl.architectures.build(case["arch"], (6,), heads, backbone="mlp",
                                       backbone_config={"widths": (8,)},
                                       **ARCH_OPTIONS[case["arch"]])
    inputs = keras.Input((6,))
    regularizer = keras.regularizers.L2(0.05) if case["reg"] else None
    hidden = keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer)(inputs)
    if case["dropout"]:
        hidden = keras.layers.Dropout(0.5)(hidden)
    hidden = keras.layers.Dense(8, activation="tanh")(hidden)
    backbone = keras.Model(inputs, hidden, name="backbone")
    return mtl.MultiTaskModel(backbone, {"a": mtl.heads.classification(3),
                                         "b": mtl.heads.regression(1),
                                         "c": mtl.heads.classification(2)})


def optimizer(name):
    if name == "sgd":
        return keras.optimizers.SGD(0.1, momentum=0.5)
    # epsilon 1e-4, not 1e-7: Adam divides by sqrt(v) + epsilon, which turns float32 round-off
    # in a near-zero gradient component (an iterative solver's last digits) into a full step.
    return keras.optimizers.Adam(0.02, epsilon=1e-4)


def run_case(strategy, case):
    x, labels, weights = data()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(case)
        tasks = [mtl.Task(name, loss=("mse" if kind == "mse" else
                                      keras.losses.SparseCategoricalCrossentropy(
                                          from_logits=True)), weight=w)
                 for name, kind, w in TASKS]
        trainer = mtl.Trainer(model, tasks, optimizer=optimizer(case["optimizer"]),
                              weighting=case["method"], gradient_mode=case["mode"],
                              grad_accum_steps=case["k"], steps_per_loop=UPDATES,
                              strategy=strategy, granularity=case["granularity"],
                              clip_norm=CLIP_NORM if case["clip"] else None,
                              jacobian_chunk_size=case["chunk"],
                              jacobian_scope=(f"top:{case['scope']}" if case["scope"] else None),
                              fine_tuning=mtl.FineTuning(freeze_backbone=case["frozen"]))
    initial = [w.numpy() for w in model.weights]
    micro = UPDATE_BATCH // case["k"]
    dataset = tf.data.Dataset.from_tensor_slices((x, labels, weights)).batch(
        micro, drop_remainder=True)
    trainer.fit(dataset, steps=UPDATES)

    keras.utils.set_random_seed(0)
    reference = build_model(case)
    reference.set_weights(initial)
    if case["frozen"]:
        reference.backbone.trainable = False
    method = mtl.weighting.get(case["method"])
    method.build([n for n, _, _ in TASKS], [w for _, _, w in TASKS])
    group_methods = None
    if case["granularity"] == "layer":
        group_methods = {}
        for v in (reference.backbone.weights if reference.backbone is not None else []):
            layer = v.path.rsplit("/", 1)[0]
            if layer not in group_methods:
                group_methods[layer] = mtl.weighting.get(case["method"])
                group_methods[layer].build([n for n, _, _ in TASKS], [w for _, _, w in TASKS])
    batches = [(x[i:i + UPDATE_BATCH], {k: v[i:i + UPDATE_BATCH] for k, v in labels.items()},
                {k: tf.constant(v[i:i + UPDATE_BATCH]) for k, v in weights.items()})
               for i in range(0, len(x), UPDATE_BATCH)]
    clipped = []
    oracle.reference_updates(reference, TASKS, method, optimizer(case["optimizer"]), batches,
                             mode=case["mode"], frozen_backbone=case["frozen"],
                             group_methods=group_methods,
                             clip_norm=CLIP_NORM if case["clip"] else None, clipped=clipped,
                             scope_top=case["scope"])

    def relative(got, want):
        return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-3))

    weight_error = max(relative(a.numpy(), b.numpy())
                       for a, b in zip(model.weights, reference.weights))
    pairs = list(zip(trainer.weighting.variables, method.variables))
    if group_methods:  # the groups' state, layer by layer (the same order in both models)
        assert len(trainer.group_methods) == len(group_methods)
        for ours, reference_method in zip(trainer.group_methods.values(), group_methods.values()):
            pairs += list(zip(ours.variables, reference_method.variables))
    state_error = max([relative(np.asarray(a.numpy(), np.float64),
                                np.asarray(b.numpy(), np.float64))
                       for a, b in pairs] or [0.0])
    moved = max(float(np.max(np.abs(w.numpy() - i))) for w, i in zip(model.weights, initial))
    backbone_ids = {id(v) for v in (model.backbone.weights if model.backbone else [])}
    frozen_kept = all(np.array_equal(w.numpy(), i) for w, i in zip(model.weights, initial)
                      if id(w) in backbone_ids) if case["frozen"] else None
    return {**case, "weight_error": weight_error, "state_error": state_error, "moved": moved,
            "frozen_kept": frozen_kept, "clipped": sum(clipped),
            "finite": all(bool(np.all(np.isfinite(w.numpy()))) for w in model.weights)}


def main():
    cases = json.loads(sys.argv[1])
    strategies = {2: mtl.distribute.get_strategy("mirrored", cpu_replicas=2),
                  1: tf.distribute.OneDeviceStrategy("/cpu:0")}
    for case in cases:
        strategy = strategies[case.pop("replicas")]
        replicas = strategy.num_replicas_in_sync
        case = {"mode": "exact", "k": 1, "reg": False, "frozen": False, "dropout": False,
                "optimizer": "sgd", "granularity": "all", "clip": False, "arch": "hps",
                "chunk": None, "scope": None, **case}
        start = time.perf_counter()
        try:
            result = run_case(strategy, case)
        except Exception as e:  # reported, so one case does not hide the others
            result = {**case, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        result["seconds"] = round(time.perf_counter() - start, 2)  # to balance the two processes
        print(json.dumps({"replicas": replicas, **result}), flush=True)


if __name__ == "__main__":
    main()
