"""The house rules of the code, read from the source: the layer contracts (`lint-imports`, from
setup.cfg), no import circle, no `mtl` import inside a function, files and classes of a readable
size, `tf.function`s built only by the step, and absl flags read only by `mtl/flags.py`."""

import ast
import os
import shutil
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mtl")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import import_graph  # noqa: E402

MAX_FILE_LINES = 450
MAX_CLASS_LINES = 300


def _sources(folder: str = PACKAGE):
    for directory, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, ROOT), f.read()


def test_the_layer_contracts_hold():
    beside_python = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    command = beside_python if os.path.exists(beside_python) else shutil.which("lint-imports")
    assert command, "lint-imports (the import-linter package, in the test extra) is missing"
    done = subprocess.run([command, "--no-cache", os.path.join(ROOT, "setup.cfg")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_import_circle_and_no_mtl_import_inside_a_function():
    graph = import_graph.read(PACKAGE)
    assert graph.circles() == []
    assert graph.inside_functions == []
    assert len(graph.modules) > 40 and len(graph.arrows) > 100  # the graph was read


def test_the_graph_reader_finds_circles_and_inner_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    graph = import_graph.read(str(package))
    assert graph.circles() == [["pkg.a", "pkg.b"]]
    assert graph.inside_functions == [("pkg/b.py", 2, "pkg.a")]


def test_files_and_classes_are_of_a_readable_size():
    too_long = []
    for path, text in _sources():
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and \
                    node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{path}: class {node.name}, "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert too_long == []


def _calls_tf_function(tree) -> bool:
    for node in ast.walk(tree):
        target = node.func if isinstance(node, ast.Call) else node
        if isinstance(target, ast.Attribute) and target.attr == "function" and \
                isinstance(target.value, ast.Name) and target.value.id == "tf":
            return True
    return False


def test_only_the_step_builds_tf_functions():
    builders = [path for path, text in _sources() if _calls_tf_function(ast.parse(text))]
    assert builders and all(p.startswith(os.path.join("mtl", "step") + os.sep) for p in builders), \
        builders


def test_only_mtl_flags_reads_absl_flags():
    readers = []
    for path, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "absl" and \
                    any(a.name == "flags" for a in node.names):
                readers.append(path)
            elif isinstance(node, ast.Import) and any(a.name == "absl.flags" for a in node.names):
                readers.append(path)
    assert readers == [os.path.join("mtl", "flags.py")]
