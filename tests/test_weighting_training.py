"""Weighting methods train multi_digits (the real small_cnn model, 20 steps) inside the real
step, on one device and on 2 mirrored replicas, to the same weights: the per-task gradients (or
Gramian) are all-reduced before a method combines them, and random methods draw the same numbers
on every replica. Every method on 2 replicas against the one-device reference is in the
combination matrix (tests/test_combinations.py, a small model); here a representative set on a
convolutional model: methods that draw random numbers (rlw, pcgrad, graddrop), that keep state
(famo, moco, uncertainty's variables) and a Gramian method in both modes (mgda)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl
import worker_processes

STEPS = 20
REAL_MODEL_METHODS = ("famo", "graddrop", "mgda", "moco", "pcgrad", "rlw", "uncertainty")


@pytest.fixture(scope="module")
def runs(digits_data_dir):
    # Two worker processes, half of the methods each, to use both cores.
    methods = sorted(REAL_MODEL_METHODS)
    halves = [methods[0::2], methods[1::2]]
    return worker_processes.json_lines(
        "weighting_mirrored.py", [[digits_data_dir, str(STEPS), ",".join(half)]
                                  for half in halves], timeout=900)


def test_every_method_runs_in_exact_and_where_possible_rep_mode(runs):
    seen = {(r["method"], r["mode"]) for r in runs}
    assert {m for m, _ in seen} == set(REAL_MODEL_METHODS)
    assert {m for m, mode in seen if mode == "rep"} == {"graddrop", "mgda"}
    # Rep mode where the method's paper or official code defines it (MGDA-UB, IMTL-G,
    # Aligned-MTL-UB, GradNorm at the last shared layer, GradDrop's masks).
    assert {name for name, cls in mtl.weighting.METHODS.items()
            if getattr(cls, "supports_rep", False)} == {"aligned_mtl", "graddrop", "gradnorm",
                                                        "imtl", "mgda"}


def test_no_nan_and_mirrored_equals_one_device(runs):
    for r in runs:
        assert r["finite"], r
        assert r["moved"] > 0.1, r
        # float32 sums in another order across replicas; weights themselves are ~0.5.
        assert r["max_abs_diff"] < 1e-5, r


CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _trainer(weighting, **kwargs):
    keras.utils.set_random_seed(0)
    model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(8,)),
                               {"a": mtl.heads.classification(3), "b": mtl.heads.regression(1)})
    return mtl.Trainer(model, [mtl.Task("a", loss=CE), mtl.Task("b", loss="mse")],
                       optimizer=keras.optimizers.SGD(0.1), weighting=weighting, **kwargs)


def _data():
    rng = np.random.RandomState(0)
    x = rng.randn(16, 6).astype(np.float32)
    return tf.data.Dataset.from_tensors(
        (x, {"a": (x[:, 0] > 0).astype(np.int64), "b": x[:, 1].copy()})).repeat()


def test_heads_get_their_plain_gradient_and_shared_variables_the_methods_direction():
    trainer = _trainer("mgda")
    model = trainer.model
    x, y = next(iter(_data()))
    before = {id(v): v.numpy() for v in model.trainable_variables}
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=True)
        la = CE(y["a"], out["a"])
        lb = tf.reduce_mean((out["b"][:, 0] - y["b"]) ** 2)
    shared = model.backbone.trainable_variables
    ja = tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(la, shared)], 0)
    jb = tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(lb, shared)], 0)
    expected_dir = mtl.weighting.get("mgda").__class__()
    expected_dir.build(["a", "b"], [1.0, 1.0])
    direction = expected_dir.aggregate(tf.stack([ja, jb])).numpy()
    head_a = model.heads["a"].trainable_variables
    grad_head_a = tape.gradient(la, head_a)
    trainer.fit(_data(), steps=1)
    got = np.concatenate([(before[id(v)] - v.numpy()).ravel() / 0.1 for v in shared])
    np.testing.assert_allclose(got, direction, rtol=1e-4, atol=1e-6)
    for v, g in zip(head_a, grad_head_a):
        np.testing.assert_allclose((before[id(v)] - v.numpy()) / 0.1, g.numpy(), rtol=1e-4,
                                   atol=1e-6)


def test_method_state_is_checkpointed(tmp_path):
    trainer = _trainer("famo", model_dir=str(tmp_path), checkpoint_every=3)
    trainer.fit(_data(), steps=3)
    logits = trainer.weighting.logits.numpy()
    assert not np.allclose(logits, 0.0)
    resumed = _trainer("famo", model_dir=str(tmp_path))
    np.testing.assert_array_equal(resumed.weighting.logits.numpy(), logits)


@pytest.mark.parametrize("method", ["famo", "nash_mtl", "moco"])
def test_a_stateful_method_resumed_from_its_checkpoint_goes_on_as_the_uninterrupted_run(
        tmp_path, method):
    """FAMO's logits, its loss history and its own optimizer, Nash-MTL's weights and MoCo's
    tracked gradients (a [T, P] buffer created empty) and weights: 2 + 2 resumed steps end
    where 4 steps end, bitwise (a kill -9 between them: tests/test_reliability.py)."""
    straight = _trainer(method)
    straight.fit(_data(), steps=4)
    _trainer(method, model_dir=str(tmp_path), checkpoint_every=2).fit(_data(), steps=2)
    resumed = _trainer(method, model_dir=str(tmp_path), checkpoint_every=2)
    assert resumed.global_step == 2
    resumed.fit(_data(), steps=4)
    state = [v for v in resumed.weighting.variables]
    assert state, f"{method} keeps no state"
    for got, want in zip(state + resumed.model.weights,
                         list(straight.weighting.variables) + straight.model.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy(),
                                      err_msg=getattr(got, "path", got.name))


def test_rep_mode_errors():
    with pytest.raises(ValueError, match=r"gradient_mode='rep' is not defined for weighting "
                                         r"'nash_mtl': the official code"):
        _trainer("nash_mtl", gradient_mode="rep")
    with pytest.raises(ValueError, match="Unknown weighting method 'pcgard'"):
        _trainer("pcgard")
    with pytest.raises(ValueError, match="takes no option 'alpha'"):
        mtl.weighting.get("pcgrad", alpha=1.0)


def test_diagnostics_report_weights_gradient_norms_and_cosines(tmp_path):
    trainer = _trainer("equal", model_dir=str(tmp_path), diagnostics_every=2)
    history = trainer.fit(_data(), steps=4)
    assert [r["step"] for r in history.diagnostics] == [2, 4]
    record = history.diagnostics[-1]
    assert record["a/weight"] == 1.0 and record["b/weight"] == 1.0
    assert -1.0 <= record["cosine/a__b"] <= 1.0
    # The reported norms are those of each task's gradient on the backbone for that batch.
    x, y = next(iter(_data()))
    model = trainer.model
    with tf.GradientTape() as tape:
        loss_a = CE(y["a"], model(x)["a"])
    grads = tape.gradient(loss_a, model.backbone.trainable_variables)
    norm = float(tf.sqrt(sum(tf.reduce_sum(g ** 2) for g in grads)))
    assert record["a/grad_norm"] == pytest.approx(norm, rel=1e-4)
    tags = set()
    import glob
    for path in glob.glob(str(tmp_path / "train" / "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"diagnostics/a/weight", "diagnostics/b/grad_norm", "diagnostics/cosine/a__b"} <= tags


def test_diagnostics_are_skipped_when_nothing_is_shared():
    keras.utils.set_random_seed(0)
    model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(8,)),
                               {"a": mtl.heads.classification(3)})
    trainer = mtl.Trainer(model, [mtl.Task("a", loss=CE)], optimizer="sgd", diagnostics_every=1)
    history = trainer.fit(_data(), steps=2)
    assert history.diagnostics == [] and trainer.global_step == 2


def test_rep_mode_moves_the_backbone_by_the_methods_weighted_gradient():
    trainer = _trainer("mgda", gradient_mode="rep")
    model = trainer.model
    x, y = next(iter(_data()))
    shared = model.backbone.trainable_variables
    before = [v.numpy() for v in shared]
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=True)
        losses = [CE(y["a"], out["a"]), tf.reduce_mean((out["b"][:, 0] - y["b"]) ** 2)]
    grads = [tape.gradient(loss, shared) for loss in losses]
    trainer.fit(_data(), steps=1)
    w = trainer.weighting.weights().numpy()  # the weights the step used, Task.weight included
    assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-4  # MGDA: a convex combination
    for i, v in enumerate(shared):
        expected = before[i] - 0.1 * (w[0] * grads[0][i].numpy() + w[1] * grads[1][i].numpy())
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-4, atol=1e-6)
