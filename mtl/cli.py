"""One error path for command-line programs: a user error prints `error: <message>` on stderr and
ends the program with exit status 2; any other exception keeps its traceback.

User errors are `mtl.UsageError` (bad settings, names, data, files), absl's flag errors (a value
that does not parse or is not allowed, an unknown flag: absl itself reports them as "FATAL Flags
parsing error" with status 1) and `absl.app.UsageError`. Training that cannot go on ends with
status 1 and `error: <message>` (a non-finite loss or gradient, a checkpoint that cannot be read
or written); a SIGTERM/SIGINT that stopped training after saving a checkpoint prints its message
and ends with 143/130 (`mtl.TrainingStopped`).

    if __name__ == "__main__":
        mtl.cli.run(main)                    # an absl program: main(argv), flags parsed by absl

    if __name__ == "__main__":
        sys.exit(mtl.cli.exit_status(main))  # an argparse program: main(argv) -> status

`ArgumentParser` is an `argparse.ArgumentParser` whose parse errors are `UsageError`s, so they
take the same path.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from absl import app

from mtl import flags
from mtl.errors import UsageError
from mtl.training import CheckpointReadError, CheckpointWriteError, NonFiniteError, TrainingStopped

#: The exit status of a program stopped by a user error.
USAGE_STATUS = 2
#: What counts as the user's to fix: absl's errors about a flag's value or name (not those about
#: how flags are defined, such as a flag defined twice).
USER_ERRORS = (UsageError, app.UsageError) + flags.USER_ERRORS
#: The exit status of a program whose training could not go on (checked after `USER_ERRORS`: a
#: refused model_dir is a user error and a checkpoint error at once).
FAILED_STATUS = 1
TRAINING_FAILURES = (NonFiniteError, CheckpointReadError, CheckpointWriteError)


def print_error(error: BaseException | str) -> None:
    """`error: <message>` on stderr."""
    print(f"error: {error}", file=sys.stderr, flush=True)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with a parse error reported as a user error."""
    try:
        return flags.parse(argv)
    except flags.FlagError as e:
        print_error(f"{e} (--helpfull lists every flag)")
        sys.exit(USAGE_STATUS)


def _guarded(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    def guarded_main(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            print_error(e)
            sys.exit(USAGE_STATUS)
        except TRAINING_FAILURES as e:
            print_error(e)
            sys.exit(FAILED_STATUS)
        except TrainingStopped as e:
            print(e.message, file=sys.stderr, flush=True)
            sys.exit(e.code)

    return guarded_main


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """`absl.app.run(main, argv)` with one error path: a flag that does not parse, or a user
    error raised by `main`, prints `error: <message>` and exits with status 2."""
    app.run(_guarded(main), argv=None if argv is None else list(argv),
            flags_parser=_parse_flags)
    sys.exit(0)  # app.run exits itself; this line is for type checkers.


def exit_status(main: Callable[[list[str] | None], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Calls `main(argv)` and returns its exit status (0 for None); a user error prints
    `error: <message>` and gives 2. For programs that parse their own arguments."""
    try:
        status = main(None if argv is None else list(argv))
    except USER_ERRORS as e:
        print_error(e)
        return USAGE_STATUS
    return 0 if status is None else int(status)


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors (a missing or malformed argument) raise
    `UsageError` instead of printing usage and exiting, so that `exit_status` reports them."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (--help lists the arguments)")
