"""Graceful stop on SIGTERM/SIGINT: finish the step, save, exit with the signal's status."""

from __future__ import annotations

import signal
import threading

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
