"""The controller of a training run and its parts: everything with Python side effects around
the compiled step (`mtl.step`).

Modules: `trainer` (`Trainer`: builds the step, runs `fit` and `evaluate`), `history` (`History`,
what `fit` returns; `NonFiniteError`), `actions` (what acts between compiled loops: train logs,
evaluation, diagnostics, checkpoints, unfreezing), `checkpoints` (`Checkpointer`, and the one
search of a checkpoint folder with its fallback to an older checkpoint), `input_state`
(iterators that continue where a run left off), `finetune` (freezing, unfreezing and the
optimizer groups they imply), `validation` (the checks before any graph is built),
`run_record` (`trainer.json` and `config.json`, checked on every resume), `model_record`
(`model.json`, the architecture a run folder is rebuilt from), `preemption` (a graceful stop
on SIGTERM/SIGINT), `progress` (the progress bar and console output).
"""

from mtl.training.checkpoints import CheckpointReadError, CheckpointWriteError
from mtl.training.history import History, NonFiniteError
from mtl.training.preemption import TrainingStopped
from mtl.training.trainer import Trainer

__all__ = ["CheckpointReadError", "CheckpointWriteError", "History", "NonFiniteError",
           "Trainer", "TrainingStopped"]
