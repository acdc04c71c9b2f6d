import inspect
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl
from mtl import architectures
from mtl.training import model_record

SHAPE = (8, 16, 1)
CNN = {"filters": (4, 8), "dense": 16}
TASKS = ("left", "right", "sum")


def _heads():
    return {"left": mtl.heads.classification(10), "right": mtl.heads.classification(10),
            "sum": mtl.heads.regression(1)}


def _images(n=6, seed=0):
    return np.random.default_rng(seed).random((n,) + SHAPE, dtype=np.float32)


@pytest.fixture(scope="module")
def models():
    """Every architecture on an 8x16x1 image with small_cnn and three heads (do not train)."""
    keras.utils.set_random_seed(0)
    return {name: architectures.build(name, SHAPE, _heads(), backbone_config=CNN)
            for name in architectures.ARCHITECTURES}


def _train(model, x, targets, steps, learning_rate):
    """Plain Adam on sum_t MSE_t + sum(model.losses); every head is a regression head."""
    optimizer = keras.optimizers.Adam(learning_rate)
    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            loss = tf.add_n([tf.reduce_mean((outputs[t] - targets[t]) ** 2) for t in targets])
            if model.losses:
                loss += tf.add_n(model.losses)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    for _ in range(steps):
        step()


def _tasks_of(report, prefix):
    """{variable path: tasks using it} for the variables whose path starts with `prefix`."""
    found = {v.path: v.tasks for v in report.variables if v.path.startswith(prefix)}
    assert found, prefix
    return found


# --------------------------------------------------------------------------------- building
@pytest.mark.parametrize("name", list(architectures.ARCHITECTURES))
def test_every_architecture_outputs_the_heads_shapes_and_task_models_agree(models, name):
    model = models[name]
    x = _images()
    outputs = model(x)
    assert {t: tuple(outputs[t].shape) for t in TASKS} == {
        "left": (6, 10), "right": (6, 10), "sum": (6, 1)}
    for task in TASKS:
        np.testing.assert_allclose(model.task_model(task)(x).numpy(), outputs[task].numpy(),
                                   rtol=1e-6, atol=1e-6)
    spec = architectures.ARCHITECTURES[name]
    if name == "hps":
        assert model.architecture is None and spec.no_rep_reason is None
        assert isinstance(model.backbone, keras.Model) and set(model.heads) == set(TASKS)
    else:
        # A clause (messages add the architecture's name and the period).
        assert model.architecture is spec and spec.no_rep_reason[0].islower()
        assert not spec.no_rep_reason.endswith(".")


@pytest.mark.parametrize("name", [n for n in architectures.ARCHITECTURES if n != "hps"])
def test_layer_and_variable_names_are_deterministic_and_unique(name):
    def names(model, heads):
        head_ids = {id(v) for h in heads.values() for v in h.weights}
        paths = [v.path for v in model.weights if id(v) not in head_ids]
        return [layer.name for layer in model.layers if layer not in heads.values()], paths

    heads_a, heads_b = _heads(), _heads()
    layers_a, paths_a = names(architectures.build(name, SHAPE, heads_a, backbone_config=CNN),
                              heads_a)
    layers_b, paths_b = names(architectures.build(name, SHAPE, heads_b, backbone_config=CNN),
                              heads_b)
    assert layers_a == layers_b and paths_a == paths_b
    assert len(set(paths_a)) == len(paths_a)


def test_spec_defaults_are_the_builders_defaults():
    for name, spec in architectures.ARCHITECTURES.items():
        parameters = inspect.signature(spec.builder).parameters
        keywords = {p.name: p.default for p in parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert set(keywords) == {"backbone", "backbone_config", *spec.option_names}, name
        assert {o: keywords[o] for o in spec.option_names} == spec.defaults(), name
        assert all(o.source in ("paper", "official code", "ours") for o in spec.options), name
        assert keywords["backbone"] == "small_cnn" and spec.paper


def test_cross_stitch_and_mtan_run_a_resnet_backbone_block_by_block():
    keras.utils.set_random_seed(1)
    config = {"widths": (4, 8), "blocks_per_stage": 2}
    heads = {"a": mtl.heads.regression(1), "b": mtl.heads.regression(1)}
    # alpha_same=1: the units are the identity, so task a's column is a plain resnet.
    model = architectures.cross_stitch(SHAPE, heads, backbone="resnet", backbone_config=config,
                                       alpha_same=1.0)
    units = [layer.name for layer in model.layers
             if isinstance(layer, architectures.CrossStitch)]
    assert units == ["a_cross_stitch_0", "b_cross_stitch_0", "a_cross_stitch_1",
                     "b_cross_stitch_1"]  # one unit per stage end
    plain = mtl.backbones.resnet(SHAPE, **config)
    for layer in plain.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(f"a_{layer.name}").get_weights())
    x = _images(4)
    np.testing.assert_allclose(model(x)["a"].numpy(), heads["a"](plain(x)).numpy(),
                               rtol=1e-5, atol=1e-6)

    model = architectures.mtan(SHAPE, {"a": mtl.heads.regression(1)}, backbone="resnet",
                               backbone_config=config)
    masks = architectures.attention_model(model)(x)
    # Stage 0 at 8x16 with 4 channels, stage 1 at 4x8 with 8 channels.
    assert {k: tuple(v.shape) for k, v in masks.items()} == {
        "a_attention_0": (4, 8, 16, 4), "a_attention_1": (4, 4, 8, 8)}


def test_mtan_with_masks_at_one_is_the_backbone_with_the_tasks_tail():
    keras.utils.set_random_seed(2)
    heads = {"a": mtl.heads.regression(1), "b": mtl.heads.regression(1)}
    model = architectures.mtan(SHAPE, heads, backbone_config=CNN)
    for layer in model.layers:
        if isinstance(layer, architectures.AttentionMask):  # sigmoid(0 x + 50) == 1 in float32
            layer.conv2.kernel.assign(tf.zeros_like(layer.conv2.kernel))
            layer.conv2.bias.assign(tf.fill(layer.conv2.bias.shape, 50.0))
    plain = mtl.backbones.small_cnn(SHAPE, **CNN)
    trunk = model.get_layer("small_cnn")
    for layer in plain.layers:
        if layer.weights:
            source = trunk.get_layer(layer.name) if layer.name.startswith("conv_") else \
                model.get_layer(f"b_{layer.name}")
            layer.set_weights(source.get_weights())
    x = _images(4)
    np.testing.assert_allclose(model(x)["b"].numpy(), heads["b"](plain(x)).numpy(),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ gates
def test_gates_are_distributions_over_experts_one_per_task(models):
    x = _images()
    expected = {
        "mmoe": {f"gate_{t}": 4 for t in TASKS},
        "cgc": {f"gate_{t}": 2 for t in TASKS},  # its own expert and the shared one
        "dselect_k": {f"gate_{t}": 4 for t in TASKS},
        # Level 0: task gates over 1 + 1 experts, the shared gate over all 3 + 1; level 1 (the
        # last) has no shared gate.
        "ple": {**{f"level{j}_gate_{t}": 2 for j in (0, 1) for t in TASKS},
                "level0_gate_shared": 4},
    }
    for name, sizes in expected.items():
        gates = architectures.gate_model(models[name])(x)
        assert {g: tuple(v.shape) for g, v in gates.items()} == {
            g: (6, n) for g, n in sizes.items()}, name
        for gate, value in gates.items():
            value = value.numpy()
            assert value.min() >= 0.0, (name, gate)
            np.testing.assert_allclose(value.sum(axis=1), 1.0, atol=1e-6, err_msg=gate)


@pytest.mark.parametrize("name", ["hps", "cross_stitch", "mtan"])
def test_gate_model_refuses_a_model_without_gates(models, name):
    with pytest.raises(mtl.UsageError, match=r"has no gates; expected a model built as one of "
                                             r"\['mmoe', 'cgc', 'ple', 'dselect_k'\]"):
        architectures.gate_model(models[name])
    if name != "mtan":
        with pytest.raises(mtl.UsageError, match="has no attention masks; expected .*'mtan'"):
            architectures.attention_model(models[name])


@pytest.mark.parametrize("name, options, expert", [
    ("mmoe", {"num_experts": 1}, "expert_0"),
    ("cgc", {"num_shared_experts": 1, "num_task_experts": 0}, "shared_expert_0"),
    ("dselect_k", {"num_experts": 2, "k": 2}, None),
])
def test_one_task_and_one_expert_is_the_single_task_model(name, options, expert):
    keras.utils.set_random_seed(3)
    head = mtl.heads.regression(1, hidden=(4,))
    model = architectures.build(name, SHAPE, {"a": head}, backbone_config=CNN, **options)
    x = _images(5)
    if expert is None:  # dselect_k needs 2 experts: make them equal, any gate gives expert 0.
        model.get_layer("expert_1").set_weights(model.get_layer("expert_0").get_weights())
        expert = "expert_0"
    plain = mtl.backbones.small_cnn(SHAPE, **CNN)
    plain.set_weights(model.get_layer(expert).get_weights())
    np.testing.assert_allclose(model(x)["a"].numpy(), head(plain(x)).numpy(),
                               rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------- DSelect-k
@pytest.mark.parametrize("gamma, t, expected", [
    (1.0, -1.0, 0.0), (1.0, -0.5, 0.0), (1.0, -0.25, 0.15625), (1.0, 0.0, 0.5),
    (1.0, 0.25, 0.84375), (1.0, 0.5, 1.0), (1.0, 3.0, 1.0),
    (2.0, 0.5, 0.84375), (2.0, -0.9, 0.00725), (2.0, 1.0, 1.0),
])
def test_smooth_step_matches_its_formula(gamma, t, expected):
    # -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 inside (-gamma/2, gamma/2), 0 below, 1 above; e.g.
    # gamma=2, t=-0.9: -0.25 * -0.729 + 0.75 * -0.9 + 0.5 = 0.00725.
    assert float(architectures.smooth_step(tf.constant(t), gamma)) == pytest.approx(
        expected, abs=1e-6)


def _dselect_k(num_experts, k, entropy_weight, seed=4):
    keras.utils.set_random_seed(seed)
    heads = {"a": mtl.heads.regression(1), "b": mtl.heads.regression(1)}
    return architectures.dselect_k((6,), heads, backbone="mlp", backbone_config={"widths": (8,)},
                                   num_experts=num_experts, k=k, entropy_weight=entropy_weight)


def test_dselect_k_adds_its_regularisers_to_model_losses_in_training():
    x = np.random.default_rng(5).normal(size=(16, 6)).astype(np.float32)
    model = _dselect_k(num_experts=4, k=2, entropy_weight=0.5)
    model(x, training=True)
    # At init z ~ 0, S(z) ~ 1/2: each of the k selectors is near uniform over the n experts, so
    # the entropy term is near weight * k * log(n) per task (one loss per task gate).
    losses = [float(l) for l in model.losses]
    assert len(losses) == 2 and min(losses) > 0
    assert losses == pytest.approx([0.5 * 2 * math.log(4)] * 2, rel=2e-3)
    model(x, training=False)
    assert model.losses == []

    # 3 experts: 2 bits, codes 0..2 are experts, code 3 none. With z = 0 exactly (S = 1/2),
    # a selector puts 1/4 on each code: the gates sum to 3/4, each selector's entropy is
    # -3/4 log(1/4 + 1e-6), and the reachability term is k * (1/(3/4 + 1e-6) - 1) = 2/3.
    model = _dselect_k(num_experts=3, k=2, entropy_weight=0.5)
    for gate in ("gate_a", "gate_b"):
        layer = model.get_layer(gate)
        for weight in (layer.z_kernel, layer.z_bias):
            weight.assign(tf.zeros_like(weight))
    model(x, training=True)
    entropy = 0.5 * 2 * -0.75 * math.log(0.25 + 1e-6)
    assert sorted(float(l) for l in model.losses) == pytest.approx(
        sorted([2 * (1 / (0.75 + 1e-6) - 1)] * 2 + [entropy] * 2), rel=1e-5)
    gates = architectures.gate_model(model)(x)
    np.testing.assert_allclose(gates["gate_a"].numpy().sum(axis=1), 0.75, rtol=1e-6)


def test_dselect_k_gates_have_at_most_k_nonzero_entries_after_training():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    targets = {"a": x.sum(axis=1, keepdims=True), "b": x[:, :1] - x[:, 1:2]}
    model = _dselect_k(num_experts=5, k=2, entropy_weight=1.0)
    before = architectures.gate_model(model)(x)
    assert all((g.numpy() > 0).sum(axis=1).min() == 5 for g in before.values())
    _train(model, x, targets, steps=600, learning_rate=0.05)
    for name, gate in architectures.gate_model(model)(x).items():
        gate = gate.numpy()
        assert (gate >= 0).all()
        assert (gate > 0).sum(axis=1).max() <= 2, name  # exact zeros elsewhere
        # 5 experts is not a power of 2: the reachability term moved every selector onto an
        # expert, so the gates sum to 1 again.
        np.testing.assert_allclose(gate.sum(axis=1), 1.0, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------ sharing
def test_sharing_report_experts_are_shared_gates_and_task_experts_are_not(models):
    everyone = set(TASKS)
    for name in ("mmoe", "dselect_k"):
        report = mtl.sharing_report(models[name])
        for e in range(4):
            assert all(set(ts) == everyone
                       for ts in _tasks_of(report, f"expert_{e}/").values()), name
        for t in TASKS:
            assert all(ts == (t,) for ts in _tasks_of(report, f"gate_{t}/").values()), name

    report = mtl.sharing_report(models["cgc"])
    assert all(set(ts) == everyone for ts in _tasks_of(report, "shared_expert_0/").values())
    for t in TASKS:
        assert all(ts == (t,) for ts in _tasks_of(report, f"{t}_expert_0/").values())
        assert all(ts == (t,) for ts in _tasks_of(report, f"gate_{t}/").values())

    # PLE: level 0's task experts also feed the shared gate, hence level 1's shared expert and
    # every task; the last level's task experts and every task gate are their task's own.
    report = mtl.sharing_report(models["ple"])
    for prefix in ("level0_left_expert_0/", "level0_gate_shared/", "level1_shared_expert_0/"):
        assert all(set(ts) == everyone for ts in _tasks_of(report, prefix).values()), prefix
    for t in TASKS:
        for prefix in (f"level1_{t}_expert_0/", f"level0_gate_{t}/", f"level1_gate_{t}/"):
            assert all(ts == (t,) for ts in _tasks_of(report, prefix).values()), prefix


# --------------------------------------------------------------------------- cross-stitch
def test_cross_stitch_alphas_start_at_the_papers_values_and_learn():
    keras.utils.set_random_seed(7)
    heads = {t: mtl.heads.regression(1) for t in TASKS}
    model = architectures.cross_stitch(SHAPE, heads, backbone_config=CNN)
    units = {layer.name: layer for layer in model.layers
             if isinstance(layer, architectures.CrossStitch)}
    # small_cnn: after pool_0, pool_1 and features.
    assert sorted(units) == sorted(f"{t}_cross_stitch_{u}" for t in TASKS for u in range(3))
    for name, unit in units.items():
        expected = [0.9 if name.startswith(t) else 0.05 for t in TASKS]  # 0.1 / (3 - 1)
        np.testing.assert_allclose(unit.alpha.numpy(), expected, rtol=1e-7)
    two = architectures.cross_stitch(SHAPE, {"a": mtl.heads.regression(1),
                                             "b": mtl.heads.regression(1)}, backbone_config=CNN)
    np.testing.assert_allclose(two.get_layer("b_cross_stitch_0").alpha.numpy(), [0.1, 0.9])

    before = {name: unit.alpha.numpy().copy() for name, unit in units.items()}
    x = _images(8)
    targets = {t: np.random.default_rng(i).normal(size=(8, 1)).astype(np.float32)
               for i, t in enumerate(TASKS)}
    _train(model, x, targets, steps=5, learning_rate=1e-2)
    for name, unit in units.items():
        assert np.abs(unit.alpha.numpy() - before[name]).max() > 1e-3, name


def test_cross_stitch_copies_reach_every_task_through_the_units(models):
    model = models["cross_stitch"]
    report = mtl.sharing_report(model)
    everyone = set(TASKS)
    for t in TASKS:
        # Task t's copy feeds every task through the units (alpha_ts != 0): shared by all.
        for prefix in (f"{t}_conv_0/", f"{t}_features/", f"{t}_cross_stitch_0/",
                       f"{t}_cross_stitch_1/"):
            assert all(set(ts) == everyone for ts in _tasks_of(report, prefix).values()), prefix
        # The last unit's row t feeds task t's head only.
        assert _tasks_of(report, f"{t}_cross_stitch_2/") == {f"{t}_cross_stitch_2/alpha": (t,)}
    # And the gradients agree: the left loss reaches the right copy, not the right's last row.
    right_conv = model.get_layer("right_conv_0").kernel
    right_last = model.get_layer("right_cross_stitch_2").alpha
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(_images(), training=True)["left"] ** 2)
    grad_conv, grad_last = tape.gradient(loss, [right_conv, right_last])
    assert float(tf.norm(grad_conv)) > 0 and grad_last is None


# ------------------------------------------------------------------------------------ MTAN
def test_mtan_masks_lie_in_0_1_and_become_task_specific_with_training():
    keras.utils.set_random_seed(8)
    model = architectures.mtan(SHAPE, {t: mtl.heads.regression(1) for t in TASKS},
                               backbone_config=CNN)
    report = mtl.sharing_report(model)
    assert all(set(ts) == set(TASKS) for ts in _tasks_of(report, "conv_").values())  # trunk
    for t in TASKS:
        for prefix in (f"{t}_attention_0/", f"{t}_carry_0/", f"{t}_attention_1/",
                       f"{t}_features/"):
            assert all(ts == (t,) for ts in _tasks_of(report, prefix).values()), prefix
    # Start every task's attention and carry layers from the left task's weights: equal masks.
    for t in ("right", "sum"):
        for layer in ("attention_0", "carry_0", "attention_1"):
            model.get_layer(f"{t}_{layer}").set_weights(
                model.get_layer(f"left_{layer}").get_weights())
    x = _images(8)
    masks = architectures.attention_model(model)
    start = {k: v.numpy() for k, v in masks(x).items()}
    for j in (0, 1):
        np.testing.assert_array_equal(start[f"left_attention_{j}"], start[f"sum_attention_{j}"])
    targets = {t: np.random.default_rng(i).normal(size=(8, 1)).astype(np.float32) * (i + 1)
               for i, t in enumerate(TASKS)}
    _train(model, x, targets, steps=10, learning_rate=1e-2)
    after = {k: v.numpy() for k, v in masks(x).items()}
    assert set(after) == {f"{t}_attention_{j}" for t in TASKS for j in (0, 1)}
    for name, mask in after.items():
        assert mask.min() >= 0.0 and mask.max() <= 1.0, name
    for j in (0, 1):
        for t in ("right", "sum"):
            assert np.abs(after[f"left_attention_{j}"] - after[f"{t}_attention_{j}"]).max() > 1e-4


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, kwargs, message", [
    ("moe", {}, r"Unknown architecture 'moe'; expected one of \['hps', 'mmoe', 'cgc', 'ple', "
                r"'dselect_k', 'cross_stitch', 'mtan'\]"),
    ("mmoe", {"num_expert": 3},
     r"Architecture 'mmoe' takes no option 'num_expert'; its options are \['num_experts'\]"),
    ("hps", {"num_experts": 3}, r"'hps' takes no option 'num_experts'; its options are \[\]"),
    ("mmoe", {"num_experts": 0}, r"mmoe: num_experts must be an int >= 1; got 0"),
    ("mmoe", {"num_experts": 2.0}, r"mmoe: num_experts must be an int >= 1; got 2.0"),
    ("cgc", {"num_shared_experts": 0, "num_task_experts": 0},
     r"cgc: each task's gate needs at least one expert; got num_shared_experts=0 and "
     r"num_task_experts=0 \(expected a sum >= 1\)"),
    ("ple", {"num_levels": 0}, r"ple: num_levels must be an int >= 1; got 0"),
    ("dselect_k", {"num_experts": 4, "k": 5},
     r"dselect_k: k \(the most experts a task's gate selects\) must be <= num_experts = 4; "
     r"got k=5"),
    ("dselect_k", {"num_experts": 1, "k": 1}, r"dselect_k: num_experts must be an int >= 2; got 1"),
    ("dselect_k", {"gamma": 0.0}, r"dselect_k: gamma must be a number > 0.0 and finite; got 0.0"),
    ("dselect_k", {"entropy_weight": -1.0},
     r"dselect_k: entropy_weight must be a number >= 0.0 and finite; got -1.0"),
    ("cross_stitch", {"alpha_same": 1.5},
     r"cross_stitch: alpha_same must be a number >= 0.0 and <= 1.0; got 1.5"),
    ("mtan", {"batch_norm": "yes"}, r"mtan: batch_norm must be True or False; got 'yes'"),
    ("mtan", {"backbone": "mlp"},
     r"mtan: backbone 'mlp' is not supported \(attention masks act on convolutional feature "
     r"maps, stage by stage\); expected one of \['small_cnn', 'resnet'\]"),
    ("cross_stitch", {"backbone": "mobilenet_v2"},
     r"cross_stitch: backbone 'mobilenet_v2' is not supported .*; expected one of \['mlp', "
     r"'small_cnn', 'resnet'\]"),
    ("mmoe", {"backbone": "vgg"}, r"mmoe: unknown backbone 'vgg'; expected one of \['mlp', "),
    ("mmoe", {"backbone_config": {"name": "x"}},
     r"mmoe: backbone_config must not set 'name' .*; got name='x'"),
])
def test_build_errors_name_what_was_given_and_what_was_expected(name, kwargs, message):
    with pytest.raises(mtl.UsageError, match=message):
        architectures.build(name, SHAPE, _heads(), **kwargs)


def test_a_task_name_that_clashes_with_the_architectures_names_is_refused():
    with pytest.raises(mtl.UsageError, match=r"cgc: the tasks \['shared', 'a'\] give two layers "
                                             r"the name 'shared_expert_0'; rename the task"):
        architectures.cgc(SHAPE, {"shared": mtl.heads.regression(1),
                                  "a": mtl.heads.regression(1)}, backbone_config=CNN)


# A plain Keras model of every layer mtl.architectures registers (AttentionMask, SoftmaxGate,
# DSelectKGate, ExpertMixture, CrossStitch), recorded by the single-module mtl/architectures.py:
# its configs name the classes "mtl>SoftmaxGate", ..., under the module "mtl.architectures".
LAYERS_RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                             "architecture_layers_record")


def test_a_record_of_the_layers_written_before_the_package_split_rebuilds_them():
    """The registered names are the format: the record rebuilds, and with the weights it was
    checked with (variable i: sin(1 + 7 i + arange(size)) / 2), gives the outputs it gave."""
    model = model_record.rebuild_model(model_record.read_model_record(LAYERS_RECORD))
    assert [v.path for v in model.variables] == [
        "mask/conv1/kernel", "mask/conv1/bias", "mask/conv2/kernel", "mask/conv2/bias",
        "softmax_gate/kernel", "softmax_gate/bias", "dselect_gate/z_kernel",
        "dselect_gate/z_bias", "dselect_gate/w_kernel", "dselect_gate/w_bias",
        "left_cross_stitch/alpha", "right_cross_stitch/alpha"]
    assert isinstance(model.get_layer("dselect_gate"), architectures.DSelectKGate)
    for i, v in enumerate(model.variables):
        size = int(np.prod(v.shape))
        v.assign(np.reshape(np.sin(np.arange(size, dtype=np.float32) + 1.0 + 7 * i) / 2, v.shape))
    x = np.array([[[[0.5, -1.0]]], [[[2.0, 0.25]]]], np.float32)
    outputs = model(x, training=False)
    np.testing.assert_array_equal(
        np.asarray(outputs["left"], np.float64),
        [[0.291806697845459, -0.34061360359191895], [0.8505187034606934, 0.15498507022857666]])
    np.testing.assert_array_equal(
        np.asarray(outputs["right"], np.float64),
        [[0.013229615986347198, 0.082918182015419],
         [-0.12164062261581421, 0.011097773909568787]])


def test_ple_task_experts_below_the_last_level_are_shared_by_every_task():
    """They feed their level's shared gate: the weighting methods combine their task gradients
    (README, Architectures); the last level's task experts and every task gate are one task's."""
    model = mtl.architectures.build("ple", (6,), {"a": mtl.heads.regression(1),
                                                  "b": mtl.heads.regression(1)},
                                    backbone="mlp", num_levels=2)
    tasks = {v.path: v.tasks for v in mtl.sharing_report(model).variables}
    assert tasks["level0_a_expert_0/dense_0/kernel"] == ("a", "b")
    assert tasks["level0_b_expert_0/dense_1/kernel"] == ("a", "b")
    assert tasks["level0_gate_a/kernel"] == ("a",)
    assert tasks["level1_a_expert_0/kernel"] == ("a",)
    assert tasks["level1_shared_expert_0/kernel"] == ("a", "b")
