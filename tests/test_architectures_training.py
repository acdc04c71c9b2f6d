"""The soft-sharing architectures with the rest of mtl: the experiment flags, training, resuming
from checkpoints, export, and the errors. (Their agreement with the plain reference, every
weighting method with mmoe and cross_stitch on one device and on 2 replicas, is in
test_combinations.py; what each architecture is, in test_architectures.py.)"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiment_scripts
import mtl
from mtl import architectures, experiment, export, flags, runs
from mtl.step import shared_variables
from mtl.training import model_record

# Small experts: the point is the wiring, not the accuracy.
SMALL = {"filters": (4,), "dense": 8}
ARCHITECTURES = ["mmoe", "cgc", "ple", "dselect_k", "cross_stitch", "mtan"]
IMAGE = (8, 16, 1)


def _heads():
    return {"left": mtl.heads.classification(10), "sum": mtl.heads.regression(1, hidden=(4,))}


def _tasks():
    return [mtl.Task("left", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
            mtl.Task("sum", loss="mse")]


def _data():
    rng = np.random.default_rng(0)
    x = rng.random((32, *IMAGE), dtype=np.float32)
    y = {"left": rng.integers(0, 10, 32), "sum": rng.random((32, 1), dtype=np.float32)}
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()


def _build(name):
    options = {"mmoe": {"num_experts": 2}, "dselect_k": {"num_experts": 2, "k": 1},
               "ple": {"expert_units": 8}}.get(name, {})
    return architectures.build(name, IMAGE, _heads(), backbone_config=SMALL, **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every architecture trained 4 steps with mgda (exact mode), checkpoints at 2 and 4:
    {name: (model_dir, [trained values of model.variables])}."""
    out = {}
    for name in ARCHITECTURES:
        model_dir = str(tmp_path_factory.mktemp(name))
        keras.utils.set_random_seed(3)
        model = _build(name)
        trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.Adam(1e-2),
                              weighting="mgda", model_dir=model_dir, checkpoint_every=2,
                              log_every=2, steps_per_loop=2)
        trainer.fit(_data(), steps=4)
        out[name] = model_dir, [v.numpy() for v in model.variables], model
    return out


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_trained_architecture_restores_bitwise_from_its_run_folder(trained, name):
    """model.json records the build call; the rebuilt model takes the checkpoint, every variable
    matched, and its outputs are the trained model's."""
    model_dir, values, model = trained[name]
    record = json.load(open(os.path.join(model_dir, "model.json")))
    assert record["kind"] == "architecture" and record["architecture"]["architecture"] == name
    run = runs.restore_model(model_dir)
    assert run.step == 4 and run.model.architecture.name == name
    assert len(run.model.variables) == len(values)
    for variable, value in zip(run.model.variables, values):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    x = np.random.default_rng(1).random((3, *IMAGE), dtype=np.float32)
    for task, output in run.model(x, training=False).items():
        np.testing.assert_array_equal(output.numpy(), model(x, training=False)[task].numpy())


def test_a_resumed_run_goes_on_as_the_uninterrupted_one(trained, tmp_path):
    """mmoe and cross_stitch: 2 steps, a new process-like Trainer from the folder, 2 more steps
    equal 4 steps at once (the method's state, optimizer and input position restored)."""
    for name in ("mmoe", "cross_stitch"):
        _, values, _ = trained[name]
        model_dir = str(tmp_path / name)
        for steps in (2, 4):
            keras.utils.set_random_seed(3)
            model = _build(name)
            trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.Adam(1e-2),
                                  weighting="mgda", model_dir=model_dir, checkpoint_every=2,
                                  log_every=2, steps_per_loop=2)
            trainer.fit(_data(), steps=steps)
        for variable, value in zip(model.variables, values):
            np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


@pytest.mark.parametrize("name", ["mmoe", "cross_stitch", "mtan"])
def test_export_gives_a_model_per_task_and_a_joint_one_equal_to_the_trained_model(
        trained, name, tmp_path):
    model_dir, _, model = trained[name]
    export.export_run(model_dir, str(tmp_path))
    x = np.random.default_rng(2).random((3, *IMAGE), dtype=np.float32)
    expected = model(x, training=False)
    joint = export.predict(export.load(str(tmp_path / "joint")), x)
    for task in ("left", "sum"):
        np.testing.assert_allclose(joint[task], expected[task], rtol=1e-6, atol=1e-6)
        alone = export.predict(export.load(str(tmp_path / task)), x)
        np.testing.assert_allclose(alone[task], expected[task], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_rep_mode_is_refused_naming_the_architecture_and_why(name):
    spec = architectures.get_spec(name)
    with pytest.raises(mtl.UsageError, match=rf"gradient_mode='rep' is not defined for the "
                                             rf"'{name}' architecture: .*gradient_mode='exact'"):
        mtl.Trainer(_build(name), _tasks(), optimizer="sgd", weighting="mgda",
                    gradient_mode="rep")
    assert spec.no_rep_reason


def test_the_gradient_methods_combine_what_more_than_one_task_uses(trained):
    """mmoe: the experts are shared (the method's Jacobian has their columns), each gate is
    one task's (its plain gradient)."""
    model = trained["mmoe"][2]
    shared = {v.path for v in shared_variables(model, ["left", "sum"])}
    assert any(p.startswith("expert_0/") for p in shared)
    assert any(p.startswith("expert_1/") for p in shared)
    assert not any("gate" in p for p in shared)
    report = mtl.sharing_report(model)
    assert {v.path for v in report.shared} == shared


# ------------------------------------------------------------------ flags and the experiment
@pytest.mark.parametrize("argv, message", [
    (["--architecture=moe"], r"--architecture='moe' is unknown; expected one of \['hps', "),
    (["--architecture=mmoe", "--architecture_options=experts=4"],
     r"architecture 'mmoe' takes no option 'experts'; its options are \['num_experts'\]"),
    (["--architecture=mtan", "--backbone=mlp"],
     r"--architecture=mtan does not take --backbone=mlp .*expected one of \['small_cnn', "),
    (["--architecture_options=num_experts"], r"--architecture_options='num_experts': "
                                             r"'num_experts' is not name=value"),
])
def test_bad_architecture_flags_are_refused_before_anything_runs(argv, message):
    from absl import flags as absl_flags
    from absl.testing import flagsaver

    flags.define_flags()
    with flagsaver.flagsaver():
        absl_flags.FLAGS(["prog", *argv])
        with pytest.raises(mtl.UsageError, match=message):
            flags.config_from_flags()


def test_bad_architecture_option_values_are_refused_before_training(tmp_path, digits_data_dir):
    config = flags.Config(model_dir=str(tmp_path / "run"), data_dir=digits_data_dir,
                          architecture="mmoe", architecture_options={"num_experts": 0},
                          train_steps=2)
    with pytest.raises(mtl.UsageError, match=r"num_experts.*0"):
        experiment.train_and_evaluate(experiment_scripts.load("multi_digits").EXPERIMENT,
                                      config)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("name", ["mmoe", "cross_stitch", "mtan"])
def test_multi_digits_trains_with_each_architecture(name, tmp_path, digits_data_dir):
    """The experiment script's own model builder with --architecture: trains, evaluates and
    checkpoints (small experts through --architecture_options where they have options)."""
    options = {"mmoe": {"num_experts": 2}}.get(name, {})
    config = flags.Config(model_dir=str(tmp_path), data_dir=digits_data_dir, train_steps=2,
                          eval_every=2, checkpoint_every=2, batch_size=8, eval_batch_size=8,
                          eval_steps=1, log_every=1, architecture=name,
                          architecture_options=options)
    results = experiment.train_and_evaluate(experiment_scripts.load("multi_digits").EXPERIMENT,
                                            config)
    assert set(results) >= {"left", "right", "sum"}
    assert np.isfinite(results["left"]["loss"])
    record = json.load(open(tmp_path / "model.json"))
    assert record["architecture"]["architecture"] == name
    assert json.load(open(tmp_path / "config.json"))["architecture"] == name


def test_an_architecture_built_by_its_own_builder_is_recorded_and_restores(tmp_path):
    """`mtl.architectures.mmoe(...)` called directly (not through `build`): model.json holds
    its call with every option, and the rebuilt model takes the checkpoint."""
    model = architectures.mmoe(IMAGE, _heads(), backbone_config=SMALL, num_experts=2)
    for i, variable in enumerate(model.variables):
        variable.assign(np.full(variable.shape, 0.01 * (i + 1), np.float32))
    model_record.record_model(str(tmp_path), model)
    record = model_record.read_model_record(str(tmp_path))
    assert record["kind"] == "architecture"
    assert record["architecture"]["options"] == {"num_experts": 2}
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "checkpoints" / "ckpt"))
    rebuilt = model_record.rebuild_model(record)
    tf.train.Checkpoint(model=rebuilt).restore(path).expect_partial() \
        .assert_existing_objects_matched()
    x = np.random.default_rng(4).random((2, *IMAGE), dtype=np.float32)
    for task, output in rebuilt(x).items():
        np.testing.assert_array_equal(output.numpy(), model(x)[task].numpy())
