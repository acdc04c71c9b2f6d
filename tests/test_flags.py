import dataclasses

import pytest
from absl import flags as absl_flags
from absl.testing import flagsaver

from mtl import flags


def test_defaults_and_overrides_become_a_typed_config():
    flags.define_flags(train_steps=77)
    absl_flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(tasks=["left", "sum"], learning_rate=0.01):
        config = flags.config_from_flags()
    assert config.train_steps == 77
    assert config.tasks == ("left", "sum")
    assert config.learning_rate == 0.01
    assert isinstance(config, flags.Config)


def test_flagfile_is_read(tmp_path):
    flags.define_flags()
    path = tmp_path / "run.flags"
    path.write_text("--train_steps=12\n--weighting=equal\n--tasks=left\n")
    with flagsaver.flagsaver():
        absl_flags.FLAGS(["prog", f"--flagfile={path}"])
        config = flags.config_from_flags()
    assert config.train_steps == 12 and config.tasks == ("left",)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, r"--batch_size must be an int >= 1; got 0"),
    ("train_steps", -5, r"--train_steps must be an int >= 0; got -5"),
    ("learning_rate", 0.0, r"--learning_rate must be > 0"),
    ("optimizer", "adamm", r"--optimizer='adamm' is unknown"),
    ("weighting", "nope", r"--weighting='nope' is unknown; expected one of"),
    ("strategy", "horovod", r"--strategy='horovod' is unknown"),
    ("tasks", (), r"--tasks is empty"),
    ("grad_accum_steps", 0, r"--grad_accum_steps must be an int >= 1; got 0"),
    ("grad_accum_steps", 5, r"--batch_size=64 is the batch of one update and must split into "
                            r"--grad_accum_steps=5 equal micro-batches"),
    ("mixed_precision", "float8", r"--mixed_precision='float8' is unknown"),
    ("backbone_lr_multiplier", -1.0, r"--backbone_lr_multiplier must be > 0"),
])
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(flags.Config(), **{field: value})


def test_unknown_default_override():
    with pytest.raises(ValueError, match="no flag 'train_stepz'"):
        flags.define_flags(train_stepz=3)
