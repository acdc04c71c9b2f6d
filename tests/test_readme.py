"""README.md against the code: the flag table names every flag `mtl.flags.define_flags()`
defines, no other, each once, with its real default."""

import json
import os
import re
import subprocess
import sys

import pytest

from mtl import flags, weighting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run apart: other tests change the process's flag defaults (`define_flags(train_steps=77)`).
_DEFINED_FLAGS = """
import json
from absl import flags as absl_flags
from mtl import flags
flags.define_flags()
defined = absl_flags.FLAGS.flags_by_module_dict()["mtl.flags"]
print(json.dumps({flag.name: flag.default for flag in defined}))
"""


@pytest.fixture(scope="module")
def defined_flags() -> dict:
    """{flag name: default} as `define_flags()` defines them, read in a fresh process."""
    run = subprocess.run([sys.executable, "-c", _DEFINED_FLAGS], capture_output=True, text=True,
                         timeout=300, cwd=ROOT,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a markdown text."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def flag_table(text: str) -> list[tuple[tuple[str, ...], str]]:
    """(flag names, default cell) for each table row whose first cell names flags (`--name`)."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = tuple(re.findall(r"`--(\w+)", cells[0])) if line.startswith("|") else ()
        if names:
            rows.append((names, cells[1] if len(cells) > 1 else ""))
    return rows


def stated_default(cell: str):
    """What a default cell says: *italics* -> unset (None); on/off; a number; `a string`."""
    if re.fullmatch(r"\*[^*]+\*", cell):
        return None
    if cell in ("on", "off"):
        return cell == "on"
    if re.fullmatch(r"`[^`]*`", cell):
        return cell[1:-1]
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"cannot read the default {cell!r}: expected *a description* "
                         "(unset), on/off, a number or a `string`") from None


@pytest.fixture(scope="module")
def readme_flags() -> list[tuple[tuple[str, ...], str]]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return flag_table(section(f.read(), "Experiments and flags"))


def table_errors(rows: list[tuple[tuple[str, ...], str]], defined: dict) -> list[str]:
    """What is wrong in a flag table, given the defined flags {name: default}."""
    names = [name for row_names, _ in rows for name in row_names]
    errors = [f"--{n} is in the table {names.count(n)} times" for n in sorted(set(names))
              if names.count(n) > 1]
    errors += [f"--{n} is defined but not in the table" for n in sorted(set(defined) - set(names))]
    errors += [f"--{n} is in the table but not defined" for n in sorted(set(names) - set(defined))]
    for row_names, cell in rows:
        if len(row_names) > 1:
            errors.append(f"--{', --'.join(row_names)} share a row; one flag per row, so that "
                          "each default can be checked")
            continue
        name = row_names[0]
        if name not in defined:
            continue
        try:
            stated = stated_default(cell)
        except ValueError as error:
            errors.append(f"--{name}: {error}")
            continue
        if not _same(stated, defined[name]):
            errors.append(f"--{name}: the table says {cell}, the flag's default is "
                          f"{defined[name]!r}")
    return errors


def _same(stated, real) -> bool:
    if stated is None:
        return real is None or real == ""  # A description stands for "unset".
    if isinstance(stated, bool) or isinstance(real, bool):
        return stated is real
    if isinstance(stated, (int, float)):
        return isinstance(real, (int, float)) and stated == real
    return stated == real


def test_the_flag_table_names_every_flag_once_with_its_default(defined_flags, readme_flags):
    assert "train_steps" in defined_flags  # Read from the code.
    assert table_errors(readme_flags, defined_flags) == []


def test_wrong_tables_are_caught():
    table = flag_table("| flag | default | meaning |\n| --- | --- | --- |\n"
                       "| `--train_steps` | 3000 | global step to train to |\n"
                       "| `--weighting` | `equal` | method |\n"
                       "| `--weighting`, `--gradient_mode` | `equal`, `exact` | balancing |\n"
                       "| `--model_dir` | `runs/<experiment>` | run folder |\n"
                       "| `--seed` | *none* | seed |\n"
                       "| `--tasks` | all | subset |\n")
    defined = {"train_steps": 1500, "weighting": "equal", "model_dir": None, "seed": 0,
               "jit_compile": False, "tasks": None}
    assert table_errors(table, defined) == [
        "--weighting is in the table 2 times",
        "--jit_compile is defined but not in the table",
        "--gradient_mode is in the table but not defined",
        "--train_steps: the table says 3000, the flag's default is 1500",
        "--weighting, --gradient_mode share a row; one flag per row, so that each default can be "
        "checked",
        "--model_dir: the table says `runs/<experiment>`, the flag's default is None",
        "--seed: the table says *none*, the flag's default is 0",
        "--tasks: cannot read the default 'all': expected *a description* (unset), on/off, a "
        "number or a `string`",
    ]


@pytest.mark.parametrize("cell, value", [("*unset*", None), ("on", True), ("off", False),
                                         ("1e-3", 0.001), ("1500", 1500), ("1.0", 1.0),
                                         ("`adam`", "adam")])
def test_default_cells_are_read(cell, value):
    assert stated_default(cell) == value and type(stated_default(cell)) is type(value)


def test_the_flag_table_is_the_one_generated_from_the_settings():
    """Each row is a setting's field: its flag, its default and its help (`mtl.options.setting`);
    regenerate it with `python -c "from mtl import flags; print(flags.flag_table())"`."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = section(f.read(), "Experiments and flags")
    start = text.index("| flag | default | meaning |")
    assert text[start:text.index("\n\n", start)] == flags.flag_table()


def test_task_balancing_names_every_method_with_its_family():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = section(f.read(), "Task balancing")
    loss_part, gradient_part = text.split("Gradient-based:", 1)
    gradient_part = gradient_part.split("The heads", 1)[0]
    for name, cls in weighting.METHODS.items():
        part = loss_part if cls.consumes == weighting.LOSSES else gradient_part
        assert f"`{name}`" in part, name
