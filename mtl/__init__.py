"""mtl: multi-task training on TensorFlow 2 / Keras 3.

A shared backbone feeds several task heads; one compiled step trains all heads at once, so every
head's gradient reaches the shared layers; `tf.distribute` carries the same step to many devices.
"""

from mtl import backbones, data, distribute, export, heads, transfer, weighting
from mtl.config import Config, FineTuning, TrainerOptions, UsageError
from mtl.model import MultiTaskModel, SharingReport, sharing_report
from mtl.tasks import Task
from mtl.trainer import (CheckpointReadError, CheckpointWriteError, History, NonFiniteError,
                         Trainer, TrainingStopped)

__version__ = "0.1.0"

__all__ = [
    "CheckpointReadError", "CheckpointWriteError", "Config", "FineTuning", "History",
    "MultiTaskModel", "NonFiniteError", "TrainingStopped", "SharingReport", "Task", "Trainer",
    "TrainerOptions", "UsageError", "backbones", "data", "distribute", "export", "heads",
    "sharing_report", "transfer", "weighting",
]
