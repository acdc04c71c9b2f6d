"""Console output of the outer loop: a tqdm bar that absl log lines do not break."""

from __future__ import annotations

import contextlib
import logging as std_logging
import sys

import tqdm
from absl import logging


class _TqdmStream:
    """A file-like object that prints through `tqdm.write`, above the progress bar."""

    def write(self, text: str) -> None:
        text = text.rstrip("\n")
        if text:
            tqdm.tqdm.write(text, file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:
        pass


@contextlib.contextmanager
def absl_logging_through_tqdm():
    """Routes absl's log handler through `tqdm.write` while the bar is shown.

    `tqdm.contrib.logging.logging_redirect_tqdm` does not reach absl's own handler, so its
    stream is swapped here and restored afterwards.
    """
    handler = logging.get_absl_handler().python_handler
    previous = handler.stream
    handler.stream = _TqdmStream()
    try:
        yield
    finally:
        handler.stream = previous


def progress_bar(*, total: int, initial: int, enabled: bool) -> tqdm.tqdm:
    """A step counter. `disable=None` turns it off when stderr is not a terminal."""
    return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                     disable=None if enabled else True, file=sys.stderr)


class _LibraryInfoFilter(std_logging.Filter):
    """Drops INFO lines that TensorFlow and TFDS log through absl (dataset paths, saver timing),
    which would bury the run's own progress lines. Warnings and errors still pass."""

    _NOISY = ("/tensorflow_datasets/", "/tensorflow/python/", "/keras/src/")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno > std_logging.INFO:
            return True
        path = record.pathname.replace("\\", "/")
        return not any(part in path for part in self._NOISY)


def quiet_library_info() -> None:
    """Installs `_LibraryInfoFilter` on absl's handler (once)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())
