"""mtl.transfer: a backbone from another run's checkpoint or from a Keras weights file."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl
import small_runs
from mtl import flags, transfer
from mtl.data import multi_digits


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_data_dir):
    return small_runs.multi_digits_run(tmp_path_factory, digits_data_dir)


def _values(variables):
    return [v.numpy().copy() for v in variables]


def _assert_equal(variables, values):
    assert len(variables) == len(values)
    for v, value in zip(variables, values):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)


def _saved_model(run_dir):
    """The source run's model with its whole checkpoint loaded: the reference values."""
    model = small_runs.multi_digits_experiment().model(flags.Config(),
                                                       ["left", "right", "sum"])
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))).expect_partial()
    return model


def test_restores_only_the_backbone_from_a_run(run_dir):
    saved = _saved_model(run_dir)
    # Another task set: the heads differ from the source run's, the backbone is the same.
    model = small_runs.multi_digits_experiment().model(flags.Config(), ["left", "sum"])
    fresh_backbone = _values(model.backbone.weights)
    fresh_heads = {t: _values(h.weights) for t, h in model.heads.items()}

    path = transfer.restore_backbone(model.backbone, run_dir)

    assert path == tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    _assert_equal(model.backbone.weights, _values(saved.backbone.weights))
    assert not np.array_equal(model.backbone.weights[0].numpy(), fresh_backbone[0])
    for task, head in model.heads.items():  # Heads keep their fresh initialisation...
        _assert_equal(head.weights, fresh_heads[task])
        # ...which differs from the trained heads of the source run.
        assert not np.array_equal(head.weights[0].numpy(), saved.heads[task].weights[0].numpy())


@pytest.mark.parametrize("which", ["checkpoints_dir", "prefix"])
def test_init_backbone_accepts_a_checkpoint_folder_or_prefix(run_dir, which):
    saved = _saved_model(run_dir)
    source = os.path.join(run_dir, "checkpoints")
    if which == "prefix":
        source = tf.train.latest_checkpoint(source)
    backbone = mtl.backbones.small_cnn(multi_digits.IMAGE_SHAPE)
    transfer.init_backbone(backbone, source)
    _assert_equal(backbone.weights, _values(saved.backbone.weights))


def test_batch_norm_statistics_are_restored(tmp_path, digits_data_dir):
    """Trainable and non-trainable variables (moving mean/variance) come back; Dropout's RNG
    state, which checkpoints do not hold, is not needed."""
    def build():
        backbone = mtl.backbones.small_cnn(multi_digits.IMAGE_SHAPE, filters=(4,), dense=8,
                                           batch_norm=True, dropout=0.1)
        return mtl.MultiTaskModel(backbone, {"left": mtl.heads.classification(10)})

    keras.utils.set_random_seed(3)
    source = build()
    trainer = mtl.Trainer(source, [mtl.Task(
        "left", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))],
        optimizer=keras.optimizers.Adam(1e-2), model_dir=str(tmp_path), checkpoint_every=3)
    trainer.fit(multi_digits.load("train", batch_size=16, training=True, tasks=("left",),
                                  data_dir=digits_data_dir), steps=3)
    moving_mean = next(v for v in source.backbone.weights if "moving_mean" in v.path)
    assert np.any(moving_mean.numpy() != 0)  # Training moved the statistics.

    target = build()
    transfer.restore_backbone(target.backbone, str(tmp_path))
    restorable = transfer.restorable_variables(target.backbone)
    assert {v.path for v in restorable} >= {"bn_0/moving_mean", "bn_0/moving_variance",
                                            "conv_0/kernel", "features/kernel"}
    _assert_equal(restorable, _values(transfer.restorable_variables(source.backbone)))


def test_shape_mismatch_names_the_first_variable_and_assigns_nothing(run_dir):
    backbone = mtl.backbones.small_cnn(multi_digits.IMAGE_SHAPE, filters=(8, 64))
    before = _values(backbone.weights)
    with pytest.raises(ValueError, match=(
            r"variable conv_0/kernel has shape \(3, 3, 1, 8\) here but \(3, 3, 1, 32\) in the "
            r"checkpoint \(at model/_operations/1/_operations/1/_kernel\)\. Nothing was "
            r"restored")):
        transfer.restore_backbone(backbone, run_dir)
    _assert_equal(backbone.weights, before)

    # A later variable differs: the ones before it (which fit) are not assigned either.
    backbone = mtl.backbones.small_cnn(multi_digits.IMAGE_SHAPE, filters=(32, 16))
    before = _values(backbone.weights)
    with pytest.raises(ValueError, match=r"variable conv_1/kernel has shape \(3, 3, 32, 16\) "
                                         r"here but \(3, 3, 32, 64\)"):
        transfer.init_backbone(backbone, run_dir)
    _assert_equal(backbone.weights, before)


def test_another_architecture_is_refused(run_dir):
    backbone = mtl.backbones.mlp(multi_digits.IMAGE_SHAPE, widths=(8, 8))
    before = _values(backbone.weights)
    with pytest.raises(ValueError, match=r"Cannot restore backbone 'mlp' .*no part of the saved "
                                         r"model has the backbone's structure"):
        transfer.restore_backbone(backbone, run_dir)
    _assert_equal(backbone.weights, before)


def test_missing_sources_are_clear_errors(tmp_path):
    backbone = mtl.backbones.mlp((4,), widths=(2,))
    with pytest.raises(FileNotFoundError, match=r"init_backbone: '.*nowhere' does not exist"):
        transfer.init_backbone(backbone, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"weights file '.*gone\.weights\.h5' does not "
                                                r"exist"):
        transfer.init_backbone(backbone, str(tmp_path / "gone.weights.h5"))
    with pytest.raises(FileNotFoundError, match=r"No checkpoint in"):
        transfer.init_backbone(backbone, str(tmp_path))


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_keras_files(tmp_path, suffix):
    source = mtl.backbones.small_cnn(multi_digits.IMAGE_SHAPE, filters=(4, 8), dense=8)
    path = str(tmp_path / f"backbone{suffix}")
    source.save_weights(path) if suffix == ".weights.h5" else source.save(path)
    target = mtl.backbones.small_cnn(multi_digits.IMAGE_SHAPE, filters=(4, 8), dense=8)
    assert transfer.init_backbone(target, path) == path
    _assert_equal(target.weights, _values(source.weights))

    other = mtl.backbones.small_cnn(multi_digits.IMAGE_SHAPE, filters=(4, 16), dense=8)
    before = _values(other.weights)
    with pytest.raises(ValueError, match=r"Cannot load .* into backbone 'small_cnn': .*variable "
                                         r"conv_1/kernel has shape \(3, 3, 4, 16\) here but "
                                         r"\(3, 3, 4, 8\) in the file.*left unchanged"):
        transfer.load_backbone_weights(other, path)
    _assert_equal(other.weights, before)  # conv_0 fitted, but was put back.


def test_mobilenet_v2_weights_saved_from_keras_applications(tmp_path):
    """A user's MobileNetV2 weights (no top) load into mtl's mobilenet_v2 backbone, which wraps
    that model."""
    source = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                            include_top=False, weights=None, pooling="avg")
    path = str(tmp_path / "mobilenet_v2.weights.h5")
    source.save_weights(path)
    backbone = mtl.backbones.mobilenet_v2((32, 32, 3), alpha=0.35)
    transfer.init_backbone(backbone, path)
    _assert_equal(backbone.weights, _values(source.weights))


def test_init_backbone_from_flag_starts_a_run_from_another_runs_backbone(run_dir, tmp_path,
                                                                          digits_data_dir):
    """--init_backbone_from (Config.init_backbone_from) in train_and_evaluate: one step later the
    new run's backbone is still within one Adam step (lr 1e-3) of the source's."""
    from mtl import experiment

    config = flags.Config(model_dir=str(tmp_path / "new"), data_dir=digits_data_dir,
                          train_steps=1, eval_every=1, checkpoint_every=1, batch_size=8,
                          eval_steps=1, tasks=("sum",), init_backbone_from=run_dir)
    experiment.train_and_evaluate(small_runs.multi_digits_experiment(), config)
    source = _saved_model(run_dir).backbone
    new = small_runs.multi_digits_experiment().model(flags.Config(), ["sum"])
    tf.train.Checkpoint(model=new).restore(
        tf.train.latest_checkpoint(str(tmp_path / "new" / "checkpoints"))).expect_partial()
    for a, b in zip(new.backbone.weights, source.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1.5e-3, err_msg=a.path)


def test_missing_init_source_stops_an_experiment_script_with_a_message(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, os.path.join(root, "experiments", "multi_digits.py"),
         f"--model_dir={tmp_path / 'run'}", f"--init_backbone_from={tmp_path / 'nowhere'}"],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": root},
        capture_output=True, text=True, timeout=180)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "error: init_backbone: '" in run.stderr and "nowhere' does not exist" in run.stderr
    assert "Traceback" not in run.stderr
