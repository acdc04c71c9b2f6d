"""TensorFlow's native start-up lines, kept out of the way of the output users need.

Importing TensorFlow prints, from C++ before Python can act and regardless of
`TF_CPP_MIN_LOG_LEVEL`, lines such as "All log messages before absl::InitializeLog() is called
are written to STDERR", "oneDNN custom operations are on" and "Could not find cuda drivers"
(twice: two native libraries initialise logging). `quiet_native_import` captures the process's
stderr while TensorFlow is imported and writes back every line that is not one of those, so
real warnings and errors still show. `MTL_SHOW_TF_STARTUP=1` turns the filter off. Lines TF
prints later (e.g. "failed call to cuInit" on a machine without a GPU, when the devices are
first listed) are not filtered.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
         "Could not find cuda drivers", "cpu_feature_guard.cc", "To enable the following "
         "instructions", "This TensorFlow binary is optimized", "Unable to register cu",
         "computation placer already registered")


def is_noise(line: str) -> bool:
    return any(pattern in line for pattern in NOISE)


@contextlib.contextmanager
def quiet_native_import():
    """Filters TensorFlow's start-up lines out of stderr for the duration of the block (the
    first import of TensorFlow); a no-op once TensorFlow is loaded or when stderr has no file
    descriptor."""
    if "tensorflow" in sys.modules or os.environ.get("MTL_SHOW_TF_STARTUP"):
        yield
        return
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(stderr_fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), stderr_fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, stderr_fd)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            sys.stderr.write("".join(line for line in text.splitlines(keepends=True)
                                     if not is_noise(line)))
            sys.stderr.flush()
