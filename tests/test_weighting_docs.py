"""docs/weighting.md's methods table is generated from the methods' declarations."""

import mtl
from mtl.weighting import docs


def test_the_methods_table_in_the_docs_is_the_generated_one():
    with open(docs.DOC_PATH) as f:
        text = f.read()
    assert docs.BEGIN in text and docs.END in text
    assert docs.render(text) == text, "run `python -m mtl.weighting.docs`"


def test_every_method_has_a_row_with_its_options_and_rep_mode():
    table = docs.methods_table()
    for name, cls in mtl.weighting.METHODS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        for option in cls.options():
            assert f"`{option}=" in row, (name, option)
        if getattr(cls, "supports_rep", False):
            assert "| yes: " in row, name
        elif issubclass(cls, mtl.weighting.GradientWeighting):
            assert "| no: " in row, name
