import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl


def _model():
    keras.utils.set_random_seed(1)
    backbone = mtl.backbones.mlp((6,), widths=(8,))
    return mtl.MultiTaskModel(backbone, {"a": mtl.heads.classification(3),
                                         "b": mtl.heads.regression(1)})


def _shared_conv_models():
    keras.utils.set_random_seed(2)
    conv = keras.layers.Conv2D(2, 3, name="shared_conv")
    m1 = keras.Sequential([keras.Input((5, 5, 1)), conv, keras.layers.Flatten(),
                           keras.layers.Dense(3)], name="m1")
    m2 = keras.Sequential([keras.Input((5, 5, 1)), conv, keras.layers.Flatten(),
                           keras.layers.Dense(1)], name="m2")
    return conv, m1, m2


def test_outputs_are_keyed_by_task_and_backbone_is_one_node():
    model = _model()
    out = model(tf.zeros([4, 6]))
    assert set(out) == {"a", "b"}
    assert out["a"].shape == (4, 3) and out["b"].shape == (4, 1)
    assert model.task_names == ("a", "b")
    # The backbone is one layer of the joint model, called once.
    assert sum(layer is model.backbone for layer in model.layers) == 1
    assert len(model.backbone._inbound_nodes) == 1


def test_task_model_shares_layer_objects():
    model = _model()
    task_model = model.task_model("a")
    assert isinstance(task_model, keras.Model)
    assert any(layer is model.backbone for layer in task_model.layers)
    joint = {id(v) for v in model.trainable_variables}
    assert {id(v) for v in task_model.trainable_variables} <= joint
    x = tf.random.normal([2, 6])
    np.testing.assert_allclose(task_model(x).numpy(), model(x)["a"].numpy(), rtol=1e-6)
    assert model.task_model("a") is task_model
    with pytest.raises(KeyError, match="No task 'c'.*'a', 'b'"):
        model.task_model("c")


def test_shared_variables_get_gradients_from_every_head_and_heads_only_their_own():
    model = _model()
    x = tf.random.normal([5, 6])
    backbone_vars = model.backbone.trainable_variables
    head_vars = {t: model.heads[t].trainable_variables for t in model.task_names}
    for task in model.task_names:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x)[task] ** 2)
        grads = tape.gradient(loss, {"backbone": backbone_vars, **head_vars})
        assert all(g is not None and float(tf.norm(g)) > 0 for g in grads["backbone"]), task
        assert all(g is not None for g in grads[task])
        other = "b" if task == "a" else "a"
        assert all(g is None for g in grads[other]), f"{other} head got {task}'s gradient"


def test_from_models_keeps_one_copy_of_the_shared_kernel():
    conv, m1, m2 = _shared_conv_models()
    model = mtl.MultiTaskModel.from_models({"one": m1, "two": m2})
    kernels = [v for v in model.trainable_variables if "shared_conv" in v.path]
    assert len(kernels) == 2  # kernel and bias, once each
    assert model.task_model("one") is m1 and model.backbone is None
    assert len(model.trainable_variables) == 6


def test_from_models_trains_shared_kernel_with_the_summed_gradient():
    conv, m1, m2 = _shared_conv_models()
    model = mtl.MultiTaskModel.from_models({"one": m1, "two": m2})
    x = tf.random.normal([4, 5, 5, 1], seed=3)
    y1 = tf.constant([0, 1, 2, 1])
    y2 = tf.random.normal([4, 1], seed=4)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    mse = keras.losses.MeanSquaredError()
    with tf.GradientTape(persistent=True) as tape:
        l1 = ce(y1, m1(x))
        l2 = mse(y2, m2(x))
    g1 = tape.gradient(l1, conv.kernel)
    g2 = tape.gradient(l2, conv.kernel)
    lr = 0.1
    expected = conv.kernel.numpy() - lr * (g1.numpy() + g2.numpy())
    head1_before = m1.layers[-1].kernel.numpy()

    trainer = mtl.Trainer(model, [mtl.Task("one", loss=ce), mtl.Task("two", loss="mse")],
                          optimizer=keras.optimizers.SGD(lr))
    trainer.fit(tf.data.Dataset.from_tensors((x, {"one": y1, "two": y2})).repeat(), steps=1)
    np.testing.assert_allclose(conv.kernel.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(m1.layers[-1].kernel.numpy(), head1_before)
    assert trainer.global_step == 1


def test_from_models_rejects_different_inputs():
    m1 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    m2 = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="same inputs; model 'b' takes"):
        mtl.MultiTaskModel.from_models({"a": m1, "b": m2})


def test_sharing_report_counts_shared_parameters():
    conv, m1, m2 = _shared_conv_models()
    report = mtl.sharing_report(mtl.MultiTaskModel.from_models({"one": m1, "two": m2}))
    conv_params = 3 * 3 * 1 * 2 + 2
    assert {v.path.split("/")[-2] for v in report.shared} == {"shared_conv"}
    assert all(v.tasks == ("one", "two") for v in report.shared)
    assert report.params_saved == conv_params
    assert report.num_params_separate - report.num_params == conv_params
    assert "saved by sharing: 20" in str(report)


def test_bad_heads():
    backbone = mtl.backbones.mlp((6,), widths=(8,))
    with pytest.raises(ValueError, match="non-empty dict"):
        mtl.MultiTaskModel(backbone, {})
    with pytest.raises(TypeError, match="backbone must be a keras.Model"):
        mtl.MultiTaskModel(lambda x: x, {"a": mtl.heads.regression()})


def test_add_heads_shares_the_trained_layers():
    model = _model()
    bigger = model.add_heads({"c": mtl.heads.regression(2)})
    assert bigger.task_names == ("a", "b", "c")
    assert bigger.backbone is model.backbone and bigger.heads["a"] is model.heads["a"]
    x = tf.random.normal([3, 6])
    np.testing.assert_allclose(bigger(x)["a"].numpy(), model(x)["a"].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="task 'a' already has a head"):
        model.add_heads({"a": mtl.heads.regression(1)})


def test_heads_say_what_they_output():
    assert mtl.heads.kind_of(mtl.heads.classification(3)) == "classification"
    assert mtl.heads.kind_of(mtl.heads.binary(2)) == "binary"
    assert mtl.heads.kind_of(mtl.heads.multi_label(4)) == "binary"
    assert mtl.heads.kind_of(mtl.heads.regression(1)) == "regression"
    assert mtl.heads.kind_of(keras.layers.Dense(3)) is None
    assert mtl.heads.outputs_logits(mtl.heads.classification(3))
    assert not mtl.heads.outputs_logits(mtl.heads.regression(1))


def test_a_marked_head_saves_and_loads(tmp_path):
    head = mtl.heads.classification(3, hidden=(4,))
    x = tf.random.normal([2, 5])
    expected = head(x).numpy()
    path = str(tmp_path / "head.keras")
    head.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-6)
    assert len(loaded.weights) == len(head.weights) == 4  # The mark adds no state.


@pytest.mark.parametrize("units", [0, 2.5, True, "3"])
def test_head_size_must_be_an_int(units):
    with pytest.raises(ValueError, match=rf"classification head: the number of outputs must be "
                                         rf"an int >= 1; got {units!r}"):
        mtl.heads.classification(units)


def test_head_size_may_be_a_numpy_int():
    assert mtl.heads.classification(np.int64(3))(tf.zeros([2, 4])).shape == (2, 3)


def test_head_given_as_an_int():
    backbone = mtl.backbones.mlp((6,), widths=(8,))
    with pytest.raises(TypeError, match=r"heads: task 'a' maps to 10 of type int; expected a Keras "
                                        r"layer .* such as mtl.heads.classification\(10\)"):
        mtl.MultiTaskModel(backbone, {"a": 10, "b": mtl.heads.regression(1)})


def test_head_with_several_outputs():
    class Split(keras.layers.Layer):
        def call(self, x):
            return [x[:, :2], x[:, 2:]]

    backbone = mtl.backbones.mlp((6,), widths=(8,))
    with pytest.raises(ValueError, match=r"head 'a' returns list of 2 outputs; expected one "
                                         r"tensor per task"):
        mtl.MultiTaskModel(backbone, {"a": Split()})


def test_from_models_with_a_model_of_several_outputs():
    inputs = keras.Input((6,))
    two = keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(1)(inputs)])
    with pytest.raises(ValueError, match=r"from_models: model 'a' has 2 outputs "
                                         r"\[\(None, 3\), \(None, 1\)\]; expected one output per "
                                         r"task"):
        mtl.MultiTaskModel.from_models({"a": two})


def test_the_architecture_call_and_heads_are_given_at_construction_and_read_only():
    inputs = keras.Input((4,))
    heads = {"a": keras.layers.Dense(1), "b": keras.layers.Dense(2)}
    shared = keras.layers.Dense(3)(inputs)
    outputs = {task: head(shared) for task, head in heads.items()}
    args = {"architecture": "x", "input_shape": [4], "backbone": "mlp", "backbone_config": {},
            "options": {"n": 1}}
    model = mtl.MultiTaskModel.from_outputs(inputs, outputs, architecture_args=args,
                                            architecture_heads=heads)
    assert model.architecture_args == args and model.architecture_heads == heads
    model.architecture_args["options"]["n"] = 2  # A copy: the model's record stays.
    assert model.architecture_args["options"] == {"n": 1}
    with pytest.raises(AttributeError):
        model.architecture_args = {}
    plain = mtl.MultiTaskModel.from_outputs(inputs, outputs)
    assert plain.architecture_args is None and plain.architecture_heads is None
    hard = mtl.MultiTaskModel(mtl.backbones.mlp((4,), widths=(3,)), {"a": mtl.heads.regression(1)})
    assert hard.architecture_args is None and hard.architecture_heads is None
    with pytest.raises(mtl.UsageError, match=r"architecture_args was given without "
                                             r"architecture_heads"):
        mtl.MultiTaskModel.from_outputs(inputs, outputs, architecture_args=args)
    with pytest.raises(mtl.UsageError, match=r"architecture_heads has the tasks \['a'\]; "
                                             r"expected the outputs' \['a', 'b'\]"):
        mtl.MultiTaskModel.from_outputs(inputs, outputs, architecture_args=args,
                                        architecture_heads={"a": heads["a"]})
