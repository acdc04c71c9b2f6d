"""mtl.cli: one error path for command-line programs (error: ..., exit status 2)."""

import os
import subprocess
import sys
import textwrap

import pytest
from absl import app, flags

import mtl
from mtl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exit_status_reports_user_errors_and_keeps_bugs(capsys):
    def main(argv):
        kind = argv[0]
        if kind == "usage":
            raise mtl.UsageError("--x=3 is refused; expected 1 or 2")
        if kind == "flag":
            raise flags.IllegalFlagValueError("flag --y=z: not a number")
        if kind == "absl_usage":
            raise app.UsageError("Unexpected arguments: ['a']")
        if kind == "bug":
            raise KeyError("a bug")
        if kind == "defined_twice":  # How flags are defined is the program's, not the user's.
            raise flags.DuplicateFlagError("The flag 'n' is defined twice.")
        return None if kind == "none" else 7

    assert cli.exit_status(main, ["usage"]) == 2
    assert capsys.readouterr().err == "error: --x=3 is refused; expected 1 or 2\n"
    assert cli.exit_status(main, ["flag"]) == 2
    assert capsys.readouterr().err == "error: flag --y=z: not a number\n"
    assert cli.exit_status(main, ["absl_usage"]) == 2
    assert capsys.readouterr().err == "error: Unexpected arguments: ['a']\n"
    assert cli.exit_status(main, ["none"]) == 0 and cli.exit_status(main, ["seven"]) == 7
    with pytest.raises(KeyError, match="a bug"):  # Not the user's: its traceback stays.
        cli.exit_status(main, ["bug"])
    with pytest.raises(flags.DuplicateFlagError):
        cli.exit_status(main, ["defined_twice"])


def test_argument_parser_errors_are_usage_errors():
    parser = cli.ArgumentParser()
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(mtl.UsageError, match=r"the following arguments are required: --n"):
        parser.parse_args([])
    with pytest.raises(mtl.UsageError, match=r"argument --n: invalid int value: 'x'"):
        parser.parse_args(["--n=x"])
    assert parser.parse_args(["--n=3"]).n == 3


PROGRAM = textwrap.dedent("""
    import sys
    from absl import app, flags
    import mtl
    from mtl import cli

    flags.DEFINE_enum("color", "red", ["red", "blue"], "A colour.")
    flags.DEFINE_integer("n", 1, "A number.", lower_bound=0)

    def main(argv):
        if flags.FLAGS.n == 2:
            raise mtl.UsageError("n=2 is refused")
        if flags.FLAGS.n == 3:
            raise app.UsageError("absl usage error")
        if flags.FLAGS.n == 4:
            raise RuntimeError("a bug")
        print("ran", flags.FLAGS.color, flags.FLAGS.n)

    if sys.argv[1] == "once":
        cli.run(main)
    # absl parses the flags again on each app.run: every case in one process.
    for case in sys.argv[1:]:
        print("case", case, file=sys.stderr, flush=True)
        try:
            cli.run(main, ["program", *case.split()])
        except SystemExit as e:
            print("status", e.code, file=sys.stderr, flush=True)
    """)


def _program(tmp_path, *args):
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                            "PYTHONPATH": ROOT})


def test_run_maps_flag_errors_and_usage_errors_to_status_2(tmp_path):
    cases = ["--color=green --n=1", "--color=red --n=x", "--color=red --n=-1",
             "--color=blue --n=2", "--color=blue --n=3", "--color=blue --n=1"]
    result = _program(tmp_path, *cases)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines()
             if line.startswith(("case ", "status ", "error: "))]
    assert lines == [
        "case --color=green --n=1",
        "error: flag --color=green: value should be one of <red|blue> (--helpfull lists every "
        "flag)", "status 2",
        "case --color=red --n=x",
        "error: flag --n=x: invalid literal for int() with base 10: 'x' (--helpfull lists every "
        "flag)", "status 2",
        "case --color=red --n=-1",
        "error: flag --n=-1: -1 is not a non-negative integer (--helpfull lists every flag)",
        "status 2",
        "case --color=blue --n=2", "error: n=2 is refused", "status 2",
        "case --color=blue --n=3", "error: absl usage error", "status 2",
        "case --color=blue --n=1", "status None"]
    assert "FATAL" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "ran blue 1\n"


def test_run_keeps_the_traceback_of_a_bug(tmp_path):
    result = _program(tmp_path, "once", "--n=4")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr
    assert "error: " not in result.stderr
