"""The outer loop's parts and the run-level behaviour they own: optimizer groups for late
unfreezing, schedules that follow the main step, staged `fit` calls, signals, the validated
settings and method options from the command line."""

import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl
from mtl import config as config_lib
from mtl import flags

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(16, 8)),
                              {"a": mtl.heads.classification(3), "b": mtl.heads.regression(1)})


def _tasks():
    return [mtl.Task("a", loss=CE), mtl.Task("b", loss="mse", weight=0.5)]


def _data(n=64, batch=16, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 6).astype(np.float32)
    y = {"a": ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)),
         "b": (x[:, 2] * 2 + x[:, 3]).astype(np.float32)}
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)


def _first_backbone_kernel(model):
    return model.backbone.trainable_weights[0] if model.backbone.trainable_weights else \
        model.backbone.weights[0]


# ----------------------------------------------------------------------- optimizer groups
def test_adam_on_layers_unfrozen_late_starts_like_a_fresh_optimizer():
    lr = 0.01
    model = _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.Adam(lr), steps_per_loop=1,
                          fine_tuning=mtl.FineTuning(freeze_backbone=True, unfreeze_at_step=30))
    data = _data().repeat()
    trainer.fit(data, steps=30)
    kernel = model.backbone.weights[0]
    steps = []
    for step in range(31, 34):
        before = kernel.numpy()
        trainer.fit(data, steps=step)
        steps.append(float(np.max(np.abs(kernel.numpy() - before))) / lr)
    # A fresh Adam's first steps are lr * m_hat / sqrt(v_hat) with |m_hat| <= sqrt(v_hat):
    # at most lr per coordinate. With the shared counter at 30 they were 0.5-0.6 lr, and at
    # step 2000 about 3 lr.
    assert 0.95 < steps[0] <= 1.0 + 1e-4, steps
    assert all(s < 1.1 for s in steps), steps
    unfrozen = trainer.optimizer_groups["unfrozen_optimizer"][0]
    assert int(unfrozen.iterations.numpy()) == 3
    assert int(trainer.optimizer.iterations.numpy()) == 33


def test_backbone_learning_rate_follows_the_heads_schedule_step():
    # The rate drops to 0 after step 3; the backbone is unfrozen at step 4 with a multiplier:
    # its rate must be 0 too (its own counter was still 0 when it started).
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([3], [0.1, 0.0])
    model = _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.SGD(schedule),
                          steps_per_loop=2,
                          fine_tuning=mtl.FineTuning(freeze_backbone=True, unfreeze_at_step=4,
                                                     backbone_lr_multiplier=0.5))
    data = _data().repeat()
    trainer.fit(data, steps=4)
    backbone = [v.numpy() for v in model.backbone.weights]
    heads = [v.numpy() for v in model.heads["a"].weights]
    trainer.fit(data, steps=8)
    for got, want in zip(model.backbone.weights, backbone):
        np.testing.assert_array_equal(got.numpy(), want)
    for got, want in zip(model.heads["a"].weights, heads):
        np.testing.assert_array_equal(got.numpy(), want)


def test_backbone_multiplier_with_a_schedule_scales_the_same_step():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.02])
    model = _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.SGD(schedule),
                          fine_tuning=mtl.FineTuning(backbone_lr_multiplier=0.5))
    trainer.fit(_data().repeat(), steps=3)
    backbone_optimizer = trainer.optimizer_groups["backbone_optimizer"][0]
    # The main optimizer is at step 3: 0.02; the backbone's rate is half of that.
    assert float(np.asarray(backbone_optimizer.learning_rate)) == pytest.approx(0.01)


# -------------------------------------------------------------------------------- input
def test_staged_fit_on_the_same_data_equals_one_fit():
    # 4 distinct batches: a second call that restarted the stream would read batches 0, 1, 2
    # again where one call reads 3, 0, 1.
    data = _data().repeat()
    staged, straight = _model(), _model()
    trainer = mtl.Trainer(staged, _tasks(), optimizer=keras.optimizers.SGD(0.1))
    trainer.fit(data, steps=3)
    trainer.fit(data, steps=8)
    mtl.Trainer(straight, _tasks(), optimizer=keras.optimizers.SGD(0.1)).fit(
        _data().repeat(), steps=8)
    for got, want in zip(staged.weights, straight.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_other_data_is_read_from_its_start():
    first, second = _data(seed=0).repeat(), _data(seed=1).repeat()
    staged, reference = _model(), _model()
    trainer = mtl.Trainer(staged, _tasks(), optimizer=keras.optimizers.SGD(0.1))
    trainer.fit(first, steps=3)
    trainer.fit(second, steps=5)
    ref = mtl.Trainer(reference, _tasks(), optimizer=keras.optimizers.SGD(0.1))
    ref.fit(first, steps=3)
    ref.fit(second.take(2), steps=5)  # the first two batches of `second`
    for got, want in zip(staged.weights, reference.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


# ------------------------------------------------------------------------------ signals
def test_a_signal_during_the_last_call_is_reported(tmp_path):
    counter = tf.data.Dataset.range(10 ** 6)
    data = tf.data.Dataset.zip((_data().repeat(), counter)).map(
        lambda batch, i: (batch[0], batch[1], i))

    def fire_once(x, y, i):
        def kill(step):
            if int(step) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step
        tf.py_function(kill, [i], tf.int64)
        return x, y

    data = data.map(fire_once)
    model = _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.SGD(0.1),
                          model_dir=str(tmp_path), steps_per_loop=4,
                          checkpoint_input=False)  # (a py_function pipeline cannot be saved)
    with pytest.raises(mtl.TrainingStopped) as stopped:
        trainer.fit(data, steps=4)
    assert stopped.value.code == 143
    assert trainer.global_step == 4
    assert "Stopped by SIGTERM at step 4" in str(stopped.value)
    assert trainer.checkpointer.latest.endswith("ckpt-4")


# ----------------------------------------------------------------------------- settings
def test_trainer_options_are_one_validated_object():
    options = mtl.TrainerOptions(grad_accum_steps=2, on_nonfinite="skip")
    trainer = mtl.Trainer(_model(), _tasks(), optimizer="sgd", options=options, log_every=7)
    assert trainer.options.grad_accum_steps == 2 and trainer.options.log_every == 7
    assert trainer.options.on_nonfinite == "skip"
    with pytest.raises(mtl.UsageError, match="Trainer takes no setting 'grad_acum_steps'"):
        mtl.Trainer(_model(), _tasks(), optimizer="sgd", grad_acum_steps=2)
    with pytest.raises(mtl.UsageError, match=r"gradient_mode must be one of \['exact', 'rep'\]"):
        mtl.TrainerOptions(gradient_mode="approx")
    # The same rule reached from the command line names the flag.
    with pytest.raises(mtl.UsageError, match=r"--gradient_mode must be one of"):
        mtl.Config(gradient_mode="approx")


@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("c=0.4,rescale=1", {"c": 0.4, "rescale": 1}),
    ('{"c": 0.4}', {"c": 0.4}),
    ("normalization=loss+", {"normalization": "loss+"}),
    ("min_losses=[0, 0.5],gamma=0", {"min_losses": [0, 0.5], "gamma": 0}),
])
def test_weighting_options_are_parsed(text, expected):
    assert config_lib.parse_weighting_options(text) == expected


def test_weighting_options_reach_the_method_and_are_checked_by_it():
    config = mtl.Config(weighting="cagrad", weighting_options={"c": 0.25})
    assert config.weighting_options == {"c": 0.25}
    with pytest.raises(mtl.UsageError, match=r"--weighting_options: .*option c=-1 is invalid"):
        mtl.Config(weighting="cagrad", weighting_options={"c": -1})
    with pytest.raises(mtl.UsageError, match=r"takes no option 'c'"):
        mtl.Config(weighting="equal", weighting_options={"c": 1})
    with pytest.raises(mtl.UsageError, match=r"is not name=value"):
        config_lib.parse_weighting_options("c")
    # config.json round trip.
    assert mtl.Config.from_json(config.to_json()) == config


def test_weighting_options_flag_becomes_the_config(monkeypatch):
    from absl import flags as absl_flags
    from absl.testing import flagsaver

    flags.define_flags()
    absl_flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(weighting="mgda", weighting_options="normalization=l2"):
        config = flags.config_from_flags()
    assert config.weighting_options == {"normalization": "l2"}


def test_settings_that_would_do_nothing_are_refused():
    with pytest.raises(mtl.UsageError, match="--cpu_replicas=2 needs --strategy=mirrored"):
        mtl.Config(cpu_replicas=2)
    with pytest.raises(mtl.UsageError, match="--unfreeze_at_step=5000 is not before "
                                             "--train_steps=1500"):
        mtl.Config(freeze_backbone=True, unfreeze_at_step=5000)


# ---------------------------------------------------------------------------- run record
def _recorded_trainer(model_dir, **kwargs):
    kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1))
    return mtl.Trainer(_model(), _tasks(), model_dir=str(model_dir), checkpoint_every=1,
                       **kwargs)


def test_resuming_with_changed_settings_is_refused_before_anything_is_loaded(tmp_path):
    _recorded_trainer(tmp_path).fit(_data().repeat(), steps=2)
    record = (tmp_path / "trainer.json").read_text()
    cases = [({"optimizer": keras.optimizers.Adam(0.1)}, "optimizer"),
             ({"optimizer": keras.optimizers.SGD(0.5)}, "optimizer"),
             ({"weighting": "mgda"}, "weighting"),
             ({"grad_accum_steps": 2}, "grad_accum_steps")]
    for kwargs, field in cases:
        with pytest.raises(mtl.UsageError, match=rf"other settings \({field}: .*"
                                                 rf"allow_config_change={field}"):
            _recorded_trainer(tmp_path, **kwargs)
    assert (tmp_path / "trainer.json").read_text() == record
    assert not (tmp_path / "config_history.json").exists()


def test_an_allowed_change_resumes_and_is_recorded(tmp_path):
    import json

    _recorded_trainer(tmp_path, weighting="famo").fit(_data().repeat(), steps=2)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        trainer = _recorded_trainer(tmp_path, weighting="uncertainty",
                                    optimizer=keras.optimizers.Adam(0.01),
                                    allow_config_change=("weighting", "optimizer", "precision"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert trainer.global_step == 2  # the weights were restored; the method starts fresh
    trainer.fit(_data().repeat(), steps=3)
    history = json.loads((tmp_path / "config_history.json").read_text())
    assert set(history[0]["changes"]) == {"weighting", "optimizer", "precision"}
    assert history[0]["step"] == 2
    assert json.loads((tmp_path / "trainer.json").read_text())["weighting"]["name"] == "famo"


def test_a_corrupt_checkpoint_index_falls_back_to_the_checkpoints_in_the_folder(tmp_path):
    trainer = _recorded_trainer(tmp_path)
    trainer.fit(_data().repeat(), steps=3)
    weights = [v.numpy() for v in trainer.model.weights]
    (tmp_path / "checkpoints" / "checkpoint").write_text("junk {{{")
    resumed = _recorded_trainer(tmp_path)
    assert resumed.global_step == 3
    for got, want in zip(resumed.model.weights, weights):
        np.testing.assert_array_equal(got.numpy(), want)
    # The index was rewritten: a third trainer needs no scan.
    assert "ckpt-3" in (tmp_path / "checkpoints" / "checkpoint").read_text()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _recorded_trainer(tmp_path).fit(_data().repeat(), steps=2)
    for path in (tmp_path / "checkpoints").glob("ckpt-*.data-*"):
        path.write_bytes(b"truncated")
    (tmp_path / "checkpoints" / "checkpoint").write_text("junk")
    with pytest.raises(mtl.CheckpointReadError, match="No readable checkpoint"):
        _recorded_trainer(tmp_path)


def test_inputs_that_name_the_wrong_kind_of_thing_are_usage_errors(tmp_path):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    with pytest.raises(mtl.UsageError, match=r"--data_dir=.* is a file; expected a folder"):
        mtl.Config(data_dir=str(a_file))
    with pytest.raises(mtl.UsageError, match="strategy 'tpu': no TPU found"):
        mtl.distribute.get_strategy("tpu")
    # A model_dir that cannot be written: the user's to fix (status 2), and a checkpoint error.
    with pytest.raises(mtl.UsageError, match="is not writable") as refused:
        mtl.Trainer(_model(), _tasks(), optimizer="sgd", model_dir=str(a_file / "run"))
    assert isinstance(refused.value, mtl.CheckpointWriteError)


def test_a_run_recorded_before_a_setting_existed_resumes_with_its_default(tmp_path):
    """config.json of a run made before --architecture (and the other settings added since)
    existed: those settings had their defaults, so resuming with the defaults is no change, and
    asking for another value is refused as a change."""
    import json as json_lib

    from mtl import experiment as experiment_lib

    exp = experiment_lib.Experiment(name="toy", tasks=None, model=None, train_data=None,
                                    eval_data=None)
    config = config_lib.Config(model_dir=str(tmp_path))
    old = {"experiment": "toy", **config.to_json()}
    for field in ("architecture", "architecture_options", "clip_norm", "jacobian_scope",
                  "jacobian_chunk_size"):
        del old[field]
    (tmp_path / "config.json").write_text(json_lib.dumps(old))
    assert experiment_lib.check_run_record(exp, config, str(tmp_path)) == {}
    other = config_lib.Config(model_dir=str(tmp_path), architecture="mmoe")
    with pytest.raises(mtl.UsageError, match=r'architecture: "hps" in the run, "mmoe" now'):
        experiment_lib.check_run_record(exp, other, str(tmp_path))
