"""mtl: multi-task training on TensorFlow 2 / Keras 3.

A shared backbone feeds several task heads; one compiled step trains all heads at once, so every
head's gradient reaches the shared layers; `tf.distribute` carries the same step to many devices.
"""

from mtl import startup

with startup.quiet_native_import():
    import tensorflow  # noqa: F401  (first, with its start-up lines filtered)

from mtl import (architectures, backbones, data, distribute, export, heads,  # noqa: E402
                 transfer, weighting)
from mtl.config import Config, FineTuning, TrainerOptions, UsageError  # noqa: E402
from mtl.model import MultiTaskModel, SharingReport, sharing_report  # noqa: E402
from mtl.tasks import Task  # noqa: E402
from mtl.training import (CheckpointReadError, CheckpointWriteError, History,  # noqa: E402
                          NonFiniteError, Trainer, TrainingStopped)

__version__ = "0.1.0"

__all__ = [
    "CheckpointReadError", "CheckpointWriteError", "Config", "FineTuning", "History",
    "MultiTaskModel", "NonFiniteError", "TrainingStopped", "SharingReport", "Task", "Trainer",
    "TrainerOptions", "UsageError", "architectures", "backbones", "data", "distribute", "export", "heads",
    "sharing_report", "transfer", "weighting",
]
