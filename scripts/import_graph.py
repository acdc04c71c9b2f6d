"""The import graph of the `mtl` package, read from the source with `ast` (imports made inside
functions included): modules, arrows, levels, circles and imports inside functions.

    python scripts/import_graph.py            # figures, then each circle and each inner import
    python scripts/import_graph.py --json     # the same as one JSON object

A level is the length of the longest chain of imports below a module (a circle counts as one
module); `mtl/__init__.py`, the public face that imports everything, is left out, as are
imports of a package by its own submodules' parent.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtl")


@dataclasses.dataclass
class ImportGraph:
    modules: dict[str, str]                    # module name -> file
    arrows: set[tuple[str, str]]               # (importer, imported)
    inside_functions: list[tuple[str, int, str]]  # (file, line, imported module)

    def circles(self) -> list[list[str]]:
        """The strongly connected components of more than one module, each sorted."""
        index, low, stack, on_stack, found = {}, {}, [], set(), []
        successors = {m: sorted(b for a, b in self.arrows if a == m) for m in self.modules}

        def visit(v):  # Tarjan's algorithm
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in successors[v]:
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                found.append(sorted(component))

        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(self.modules) + 100))
        for v in sorted(self.modules):
            if v not in index:
                visit(v)
        return [c for c in found if len(c) > 1]

    def levels(self) -> int:
        """1 + the longest import chain (circles collapsed)."""
        component = {}
        for i, members in enumerate(self.circles()):
            for m in members:
                component[m] = f"circle{i}"
        node = lambda m: component.get(m, m)  # noqa: E731
        below = {}
        for a, b in self.arrows:
            if node(a) != node(b):
                below.setdefault(node(a), set()).add(node(b))
        depth = {}

        def level(n):
            if n not in depth:
                depth[n] = 0
                depth[n] = 1 + max((level(b) for b in below.get(n, ())), default=-1)
            return depth[n]

        return 1 + max((level(node(m)) for m in self.modules), default=-1)

    def figures(self) -> dict:
        return {"modules": len(self.modules), "arrows": len(self.arrows),
                "levels": self.levels(), "circles": len(self.circles()),
                "imports_inside_functions": len(self.inside_functions)}


def _module_name(path: str, root: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
    return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def read(root: str = ROOT) -> ImportGraph:
    """The import graph of the package in `root`."""
    package = os.path.basename(root)
    modules = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[_module_name(path, root)] = path

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    arrows, inside = set(), []
    for module, path in sorted(modules.items()):
        if module == package:
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        parent = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        in_function = {id(node) for function in ast.walk(tree)
                       if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(function) if node is not function}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = parent.split(".")[:len(parent.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != package:
                    continue
                imported = resolve(target)
                if imported in (None, package, module):
                    continue
                arrows.add((module, imported))
                if id(node) in in_function:
                    inside.append((os.path.relpath(path, os.path.dirname(root)), node.lineno,
                                   imported))
    return ImportGraph(modules=modules, arrows=arrows, inside_functions=sorted(inside))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--root", default=ROOT, help="the package folder (default: mtl/)")
    args = parser.parse_args(argv)
    graph = read(args.root)
    figures = graph.figures()
    if args.json:
        print(json.dumps({**figures, "circles_found": graph.circles(),
                          "inside_functions": graph.inside_functions}))
        return 0
    print("  ".join(f"{k}: {v}" for k, v in figures.items()))
    for circle in graph.circles():
        print("circle:", " ".join(circle))
    for path, line, imported in graph.inside_functions:
        print(f"inside a function: {path}:{line} imports {imported}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
