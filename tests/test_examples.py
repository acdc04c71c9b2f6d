"""examples/: the three classic layer-sharing patterns run, for a few steps each."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shared_conv(digits_data_dir, capsys):
    results = _load("shared_conv").main(steps=3, data_dir=digits_data_dir, batch_size=16,
                                        eval_steps=1)
    assert set(results) == {"left", "sum"}
    assert set(results["left"]) == {"loss", "accuracy"} and set(results["sum"]) == {"loss", "mae"}
    out = capsys.readouterr().out
    assert "shared_conv/kernel" in out and "left, sum" in out


def test_shared_layers_different_tops(digits_data_dir):
    example = _load("shared_layers_different_tops")
    shared, models = example.build_models(filters=4, width=8)
    # Same layer objects in every task model; a different top on each.
    for model in models.values():
        assert all(any(layer is s for layer in model.layers) for s in shared)
    assert [len(m.layers) for m in models.values()] == [6, 7, 7]
    results = example.main(steps=3, data_dir=digits_data_dir, batch_size=16, eval_steps=1)
    assert set(results) == {"left", "right", "sum"}


def test_frozen_base_is_unchanged_by_training(digits_data_dir):
    outcome = _load("frozen_base").main(steps=3, pretrain_steps=3, data_dir=digits_data_dir,
                                        batch_size=16, eval_steps=1)
    assert outcome["base_unchanged"] is True
    assert set(outcome["results"]) == {"right", "sum"}


@pytest.mark.parametrize("name", ["shared_conv", "shared_layers_different_tops", "frozen_base"])
def test_examples_say_how_to_run_them(name):
    module = _load(name)
    assert f"python examples/{name}.py" in module.__doc__
    assert callable(module.main)
