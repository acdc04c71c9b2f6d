"""Runs experiment scripts (argv[2], comma-separated; default: every one) for 2 steps under
`mirrored` on 2 logical CPU devices (TFDS datasets on mock data). Prints one JSON line per
experiment. Run as a subprocess: logical
devices must be configured before TensorFlow initialises."""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mtl  # noqa: E402

mtl.distribute.get_strategy("mirrored", cpu_replicas=2)  # Before any TF op.

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import experiment_scripts  # noqa: E402

TFDS_EXPERIMENTS = ("cifar100", "celeb_a", "smallnorb", "shapes3d")


def main():
    data_dir = sys.argv[1]
    mirrored = dict(strategy="mirrored", cpu_replicas=2, batch_size=4)
    names = ("multi_digits", "multi_digits_overlap", "digits_mixture") + TFDS_EXPERIMENTS
    if len(sys.argv) > 2:
        names = sys.argv[2].split(",")
    for name in names:
        script = experiment_scripts.load(name)
        with tempfile.TemporaryDirectory() as model_dir:
            if name in TFDS_EXPERIMENTS:
                results = experiment_scripts.run_on_mock_data(script.EXPERIMENT, model_dir,
                                                              **mirrored)
            else:
                config = experiment_scripts.small_config(model_dir, data_dir=data_dir,
                                                         **mirrored)
                results = mtl.experiment.train_and_evaluate(script.EXPERIMENT, config)
            with open(os.path.join(model_dir, "results.json")) as f:
                step = json.load(f)["step"]
        print(json.dumps({"experiment": name, "step": step, "tasks": sorted(results)}),
              flush=True)


if __name__ == "__main__":
    main()
