"""Console output of the outer loop: a tqdm bar that absl log lines do not break."""

from __future__ import annotations

import contextlib
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
