"""The gradient sources' parts on their own: the decisions, the accumulators, the pre-pass."""

import re

import keras

import numpy as np
import pytest
import tensorflow as tf

import mtl
from mtl.step import decisions, parts, task_jacobian


def _built(name, **options):
    method = mtl.weighting.get(name, **options)
    method.build(["a", "b"], [1.0, 0.5])
    return method


def test_loss_decision_weights_are_the_derivative_of_the_methods_total():
    losses = tf.constant([2.0, 0.5])
    uncertainty = _built("uncertainty")
    uncertainty.log_variances.assign([0.5, -1.0])
    weights, same, (log_variance_gradient,) = decisions.LossDecision(
        uncertainty).decide(losses)
    s = np.array([0.5, -1.0])
    fixed = np.array([1.0, 0.5])
    np.testing.assert_allclose(weights.numpy(), fixed * np.exp(-s), rtol=1e-6)
    assert same is weights
    # d/ds of w (exp(-s) L + s) = w (1 - exp(-s) L): the whole batch's gradient, once.
    np.testing.assert_allclose(log_variance_gradient.numpy(),
                               fixed * (1 - np.exp(-s) * losses.numpy()), rtol=1e-6)
    # Divided by the replicas: each computes it whole and the optimizer sums them.
    _, _, (halved,) = decisions.LossDecision(uncertainty).decide(losses, num_replicas=2)
    np.testing.assert_allclose(halved.numpy(), log_variance_gradient.numpy() / 2, rtol=1e-6)


def test_loss_decision_of_geometric_mean_is_its_gradient():
    losses = tf.constant([2.0, 0.5])
    weights, _, _ = decisions.LossDecision(_built("gls")).decide(losses)
    # G = (L_a^1 L_b^0.5)^(1/1.5); dG/dL_t = G w_t / (W L_t).
    g = (2.0 ** 1.0 * 0.5 ** 0.5) ** (1 / 1.5)
    np.testing.assert_allclose(weights.numpy(), [g * 1.0 / (1.5 * 2.0), g * 0.5 / (1.5 * 0.5)],
                               rtol=1e-5)


def test_which_methods_must_see_the_whole_batch_first():
    assert not decisions.LossDecision(_built("equal")).needs_whole_batch
    assert not decisions.LossDecision(_built("rlw")).needs_whole_batch
    for name in ("uncertainty", "dwa", "gls", "famo"):
        assert decisions.LossDecision(_built(name)).needs_whole_batch, name


def test_rep_decision_weights_the_shared_rows_and_leaves_the_heads_plain():
    fixed = tf.constant([1.0, 0.5])
    gramian = tf.constant([[1.0, 0.0], [0.0, 4.0]])
    shared, plain, method_gradients = decisions.RepDecision(
        _built("mgda"), fixed).decide(tf.constant([1.0, 1.0]), gramian)
    # MGDA on orthogonal rows of norms 1 and 2: w = (0.8, 0.2).
    np.testing.assert_allclose(shared.numpy(), [0.8, 0.2 * 0.5], rtol=1e-5)
    np.testing.assert_array_equal(plain.numpy(), fixed.numpy())
    assert method_gradients == []


def test_summed_accumulator_adds_micro_batches_and_resets():
    strategy = tf.distribute.get_strategy()
    accumulator = parts.accumulator(strategy, [[2], [1]], micro_batches=2)
    assert isinstance(accumulator, parts.Summed)

    @tf.function
    def run():
        accumulator.reset()
        accumulator.add([tf.constant([1.0, 2.0]), tf.constant([3.0])])
        accumulator.add([tf.constant([10.0, 20.0]), tf.constant([30.0])])
        return accumulator.total_of(0), accumulator.local()[1]

    total, local = run()
    np.testing.assert_array_equal(total.numpy(), [11.0, 22.0])
    np.testing.assert_array_equal(local.numpy(), [33.0])
    one = parts.accumulator(strategy, [[2]], micro_batches=1)
    assert isinstance(one, parts.PassThrough)


def test_the_pre_pass_leaves_batchnorm_statistics_and_dropout_rng_as_one_pass_would():
    # The first update's forward passes see the same weights whatever the method, so after it
    # the moving statistics and the RNG state must not depend on whether a pre-pass ran.
    rng = np.random.RandomState(0)
    x = rng.randn(32, 6).astype(np.float32)
    y = {"a": (x[:, 0] > 0).astype(np.int64), "b": x[:, 1]}
    states = {}
    for method in ("equal", "uncertainty"):  # uncertainty with K=2 needs the pre-pass
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8)(inputs)
        hidden = keras.layers.BatchNormalization()(hidden)
        hidden = keras.layers.Dropout(0.3)(hidden)
        model = mtl.MultiTaskModel(keras.Model(inputs, hidden),
                                   {"a": mtl.heads.classification(2),
                                    "b": mtl.heads.regression(1)})
        tasks = [mtl.Task("a", loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True)), mtl.Task("b", loss="mse")]
        trainer = mtl.Trainer(model, tasks, optimizer="sgd", weighting=method,
                              grad_accum_steps=2)
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), steps=1)
        states[method] = [v.numpy() for v in mtl.step.layer_state(model)]
    assert len(states["equal"]) >= 3  # moving mean, moving variance, the dropout RNG state
    for got, want in zip(states["uncertainty"], states["equal"]):
        np.testing.assert_array_equal(got, want)


def test_per_layer_aggregation_on_a_one_layer_backbone_equals_the_whole():
    rng = np.random.RandomState(1)
    x = rng.randn(32, 6).astype(np.float32)
    y = {"a": x[:, 0], "b": x[:, 1] - x[:, 2], "c": -x[:, 3]}
    results = {}
    for granularity in ("all", "layer", "variable"):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        backbone = keras.Model(inputs, keras.layers.Dense(4, activation="tanh")(inputs))
        model = mtl.MultiTaskModel(backbone, {t: mtl.heads.regression(1) for t in "abc"})
        trainer = mtl.Trainer(model, [mtl.Task(t, loss="mse") for t in "abc"],
                              optimizer=keras.optimizers.SGD(0.1), weighting="mgda",
                              granularity=granularity)
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(), steps=3)
        results[granularity] = [v.numpy() for v in model.weights]
        assert len(trainer.group_methods) == {"all": 0, "layer": 1, "variable": 2}[granularity]
    for got, want in zip(results["layer"], results["all"]):
        np.testing.assert_array_equal(got, want)
    # Kernel and bias combined apart: another direction.
    assert any(not np.allclose(a, b) for a, b in zip(results["variable"], results["all"]))


def test_granularity_needs_a_gradient_method_in_exact_mode():
    with pytest.raises(mtl.UsageError, match="granularity='layer' groups the shared "
                                             "parameters' gradients; it needs gradient_mode"):
        mtl.TrainerOptions(granularity="layer", gradient_mode="rep")
    model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(4,)),
                               {"a": mtl.heads.regression(1), "b": mtl.heads.regression(1)})
    with pytest.raises(mtl.UsageError, match="applies to gradient-based weighting methods; "
                                             "'uncertainty' is loss-based"):
        mtl.Trainer(model, [mtl.Task("a", loss="mse"), mtl.Task("b", loss="mse")],
                    optimizer="sgd", weighting="uncertainty", granularity="layer")


@pytest.mark.parametrize("settings, weighting, mode, said", [
    (dict(jacobian_chunk_size=2), "uncertainty", "exact",
     "jacobian_chunk_size=2 shape the per-task gradients of gradient-based weighting methods; "
     "'uncertainty' is loss-based and computes none"),
    (dict(jacobian_dtype="bfloat16", jacobian_chunk_size=1), "equal", "exact",
     "jacobian_chunk_size=1 and jacobian_dtype='bfloat16' shape the per-task gradients of "
     "gradient-based weighting methods; 'equal' is loss-based"),
    (dict(jacobian_dtype="bfloat16"), "mgda", "rep",
     "jacobian_dtype='bfloat16' shape the per-task gradients of the shared variables (exact "
     "mode, or a jacobian_scope); gradient_mode='rep' computes them of the shared "
     "representation instead"),
    (dict(jacobian_chunk_size=1), "imtl", "rep", "jacobian_chunk_size=1 shape"),
])
def test_jacobian_settings_that_would_be_ignored_are_refused(settings, weighting, mode, said):
    """A chunk size or Jacobian dtype with a method or mode that computes no per-task gradients
    of the shared variables would do nothing: refused before anything is built."""
    model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(4,)),
                               {"a": mtl.heads.regression(1), "b": mtl.heads.regression(1)})
    with pytest.raises(mtl.UsageError, match=re.escape(said)):
        mtl.Trainer(model, [mtl.Task("a", loss="mse"), mtl.Task("b", loss="mse")],
                    optimizer="sgd", weighting=weighting, gradient_mode=mode, **settings)
    # The same settings with a gradient method in exact mode are taken.
    mtl.Trainer(model, [mtl.Task("a", loss="mse"), mtl.Task("b", loss="mse")],
                optimizer="sgd", weighting="mgda", **settings)


def _chunk_run(chunk, weighting="upgrad", **settings):
    rng = np.random.RandomState(2)
    x = rng.randn(32, 6).astype(np.float32)
    y = {"a": x[:, 0], "b": x[:, 1] - x[:, 2], "c": -x[:, 3]}
    keras.utils.set_random_seed(0)
    backbone = mtl.backbones.mlp((6,), widths=(8, 4))
    model = mtl.MultiTaskModel(backbone, {t: mtl.heads.regression(1) for t in "abc"})
    trainer = mtl.Trainer(model, [mtl.Task(t, loss="mse") for t in "abc"],
                          optimizer=keras.optimizers.SGD(0.1), weighting=weighting,
                          jacobian_chunk_size=chunk, **settings)
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(), steps=3)
    return trainer, [v.numpy() for v in model.weights]


def test_jacobian_chunks_give_the_same_update_as_one_batched_jacobian():
    """jacobian_chunk_size=1 and 2 (of 3 tasks): a loop over the tasks with that many backward
    passes in flight; the weights after 3 updates equal those of one batched Jacobian (3, and
    the default, which batches every task of a model this small) to float32 round-off."""
    results = {}
    for chunk in (None, 1, 2, 3):
        trainer, results[chunk] = _chunk_run(chunk)
        assert trainer._steps.source.chunk_size == (chunk or 3)
    for chunk in (None, 1, 2):
        for got, want in zip(results[chunk], results[3]):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(w, 0) for w in results[1])


def test_the_default_chunk_keeps_the_per_task_passes_within_four_forward_passes():
    mb = 2 ** 20
    assert task_jacobian.MIN_CHUNK_BUDGET_BYTES == 256 * mb
    assert task_jacobian.CHUNK_BUDGET_FORWARD_PASSES == 4
    # Small activations: every task batched, up to the 256 MiB floor.
    assert task_jacobian.default_chunk_size(3, 10 * mb) == 3
    assert task_jacobian.default_chunk_size(40, 6 * mb) == 40
    # 40 tasks of 20 MB: 800 MB > 256 MiB -> 12 at once.
    assert task_jacobian.default_chunk_size(40, 20 * mb) == 12
    # Above the floor, four forward passes' worth: the 64x64 resnet's 232 MB at batch 32.
    assert task_jacobian.default_chunk_size(3, 232 * mb) == 3
    assert task_jacobian.default_chunk_size(4, 232 * mb) == 4
    assert task_jacobian.default_chunk_size(5, 232 * mb) == 4
    assert task_jacobian.default_chunk_size(40, 232 * mb) == 4
    assert task_jacobian.default_chunk_size(40, 1000 * mb) == 4


def test_activation_elements_count_every_layer_output_or_those_a_scope_reaches():
    backbone = mtl.backbones.mlp((6,), widths=(8, 4))
    model = mtl.MultiTaskModel(backbone, {t: mtl.heads.regression(1) for t in "ab"})
    # dense_0 8, dense_1 4; each head's Dense 1 (inputs are not counted).
    assert task_jacobian.activation_elements(backbone) == 8 + 4
    assert task_jacobian.activation_elements(model) == 8 + 4 + 1 + 1
    top = backbone.get_layer("dense_1").weights
    assert task_jacobian.activation_elements(model, top) == 4 + 1 + 1


@pytest.mark.parametrize("weighting, k", [("mgda", 1), ("upgrad", 2)])
def test_a_bfloat16_jacobian_keeps_the_direction_to_about_three_digits(weighting, k):
    """jacobian_dtype="bfloat16" stores the per-task gradients in half the memory (K = 2: the
    micro-batches' sums too). Measured on this model (3 SGD updates): the weights' change
    differs from float32's by < 1% of its size and points the same way (cosine > 0.9999)."""
    trainer32, full = _chunk_run(None, weighting, grad_accum_steps=k)
    trainer16, half = _chunk_run(None, weighting, jacobian_dtype="bfloat16", grad_accum_steps=k)
    assert trainer16._steps.source.jacobian_dtype == tf.bfloat16
    if k > 1:
        assert trainer16._steps.source.parts.variables[0].dtype == tf.bfloat16
    keras.utils.set_random_seed(0)
    start = [v.numpy() for v in mtl.MultiTaskModel(
        mtl.backbones.mlp((6,), widths=(8, 4)),
        {t: mtl.heads.regression(1) for t in "abc"}).weights]
    moved32 = np.concatenate([(w - s).ravel() for w, s in zip(full, start)])
    moved16 = np.concatenate([(w - s).ravel() for w, s in zip(half, start)])
    cosine = moved32 @ moved16 / (np.linalg.norm(moved32) * np.linalg.norm(moved16))
    assert cosine > 0.9999
    relative = np.linalg.norm(moved16 - moved32) / np.linalg.norm(moved32)
    assert 0 < relative < 1e-2  # rounded, so different, but close
    assert trainer16.record()["jacobian_dtype"] == "bfloat16"
    assert trainer32.record()["jacobian_dtype"] is None


def _scope_run(scope, weighting="mgda"):
    rng = np.random.RandomState(2)
    x = rng.randn(32, 6).astype(np.float32)
    y = {"a": x[:, 0], "b": x[:, 1] - x[:, 2], "c": -x[:, 3]}
    keras.utils.set_random_seed(0)
    backbone = mtl.backbones.mlp((6,), widths=(8, 4))
    model = mtl.MultiTaskModel(backbone, {t: mtl.heads.regression(1) for t in "abc"})
    trainer = mtl.Trainer(model, [mtl.Task(t, loss="mse") for t in "abc"],
                          optimizer=keras.optimizers.SGD(0.1), weighting=weighting,
                          jacobian_scope=scope)
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(), steps=3)
    return trainer, [v.numpy() for v in model.weights]


def test_a_jacobian_scope_of_every_shared_layer_is_exact_mode_and_a_smaller_one_is_not():
    """Partial Jacobian descent: with the scope = every shared layer it is exact mode (the same
    Gramian, the same weighted gradient); with the last layer only it is another update."""
    _, exact = _scope_run(None)
    trainer, whole = _scope_run("top:2")
    assert [v.path for v in trainer._steps.source.scope] == [
        "dense_0/kernel", "dense_0/bias", "dense_1/kernel", "dense_1/bias"]
    for got, want in zip(whole, exact):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    trainer, top = _scope_run("dense_1")
    assert [v.path for v in trainer._steps.source.scope] == ["dense_1/kernel", "dense_1/bias"]
    assert max(float(np.abs(a - b).max()) for a, b in zip(top, exact)) > 1e-3
    assert trainer.record()["jacobian_scope"] == "dense_1"


@pytest.mark.parametrize("settings, message", [
    ({"jacobian_scope": "top:0"},
     r"jacobian_scope='top:0': expected 'all' \(every shared variable\), 'top:N'"),
    ({"jacobian_scope": "top:1", "gradient_mode": "rep"},
     r"it needs gradient_mode='exact' and granularity='all'"),
    ({"jacobian_scope": "conv_9"}, r"jacobian_scope names layer 'conv_9', which has no variable "
                                   r"shared by several tasks; the shared layers are \['dense_0'"),
    ({"jacobian_scope": "top:1", "weighting": "graddrop"},
     r"jacobian_scope applies to methods whose weights come from the Gramian .*'graddrop' is "
     r"not one"),
])
def test_bad_jacobian_scopes_are_refused_before_training(settings, message):
    settings = {"weighting": "mgda", **settings}
    backbone = mtl.backbones.mlp((6,), widths=(8, 4))
    model = mtl.MultiTaskModel(backbone, {t: mtl.heads.regression(1) for t in "ab"})
    with pytest.raises(mtl.UsageError, match=message):
        mtl.Trainer(model, [mtl.Task(t, loss="mse") for t in "ab"], optimizer="sgd", **settings)
