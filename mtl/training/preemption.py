"""Graceful stop on SIGTERM/SIGINT: finish the step, save, exit with the signal's status.

`StopSignals` records a signal while training; `stop_if_signalled`, called between compiled
loops, saves a checkpoint and raises `TrainingStopped` once any worker got one (all workers of a
multi-worker run stop together).
"""

from __future__ import annotations

import signal
import threading

import tensorflow as tf
from absl import logging


class TrainingStopped(SystemExit):
    """Raised after a SIGTERM/SIGINT once the current step is checkpointed.

    A `SystemExit` with status 143 (SIGTERM) or 130 (SIGINT), the shell's codes for those
    signals, so an uncaught one ends a script with that status and the message.
    """

    def __init__(self, message: str, signal_name: str = ""):
        super().__init__(143 if signal_name == "SIGTERM" else 130)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopSignals:
    """Records SIGTERM/SIGINT while training instead of dying mid-step (main thread only)."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C: stop now.
        self.received = signal.Signals(signum).name
        logging.warning("%s received: stopping after the current step.", self.received)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True when `flag` is set on any worker (multi-worker runs must stop together)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag
    value = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)) > 0


def stop_if_signalled(stop: StopSignals, *, strategy: tf.distribute.Strategy, step: int,
                      checkpointer) -> None:
    """Saves a checkpoint of `step` (unless the latest is of `step`) and raises
    `TrainingStopped` when any worker received a signal; returns otherwise."""
    if not any_worker(strategy, stop.received is not None):
        return
    why = stop.received or "a signal on another worker"
    latest = checkpointer.latest
    path = latest if latest and latest.endswith(f"-{step}") else checkpointer.save(step)
    where = f"checkpoint saved to {path}" if path else "checkpoint saved"
    raise TrainingStopped(
        f"Stopped by {why} at step {step}; {where}. Run the same command again "
        "to resume from this step.", signal_name=why)
