"""The import direction of the layers (README "Layout"): launch/ and bench/ on top, then trainer/, then
shards/, then configs/ (the schema every layer reads). Read from the source with ast, every import
statement counted, those inside functions too: a layer never imports one above it, and no module
imports itself back through others (no cycle)."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["configs", "shards", "trainer", "launch", "bench"]  # lowest first
PACKAGES = {"configs", "shards", "trainer"}


def modules() -> dict[str, str]:
    found = {}
    for top in LAYERS:
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    found[name] = path
    return found


def imports(path: str, known: dict) -> set[str]:
    """The project's modules a file imports (`from a.b import c` counts a.b.c when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                for a in node.names:
                    out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
    return out


GRAPH = {m: imports(p, modules()) for m, p in modules().items()}


def test_no_import_climbs_a_layer():
    def layer(module):
        return LAYERS.index(module.split(".")[0])

    climbs = [f"{m} imports {t}" for m in sorted(GRAPH) for t in sorted(GRAPH[m]) if layer(t) > layer(m)]
    assert not climbs, "imports from a layer above: " + "; ".join(climbs)


def test_the_graph_is_read():  # the check above sees the real edges (a parser that saw none would pass it)
    assert "shards.build" in GRAPH["trainer.data.prepare"] and "configs.schema" in GRAPH["shards.embed_job"]
    assert not any(t.startswith("trainer") for m, ts in GRAPH.items() if m.startswith("shards") for t in ts)


def test_no_import_cycle():
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in GRAPH or t == m:
                continue
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_project_is_imported_at_the_top_of_modules():
    """Under configs/, shards/ and trainer/, the project's own modules are imported at the top of a
    module, where the dependency graph can be read, never inside a function."""
    inside = []
    for module, path in modules().items():
        if module.split(".")[0] not in PACKAGES:
            continue
        for fn in ast.walk(ast.parse(open(path).read())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                        [a.name for a in node.names] if isinstance(node, ast.Import) else []
                    if any(n.split(".")[0] in PACKAGES for n in names):
                        inside.append(f"{module}.{fn.name} (line {node.lineno})")
    assert not inside, "imports of the project inside functions: " + ", ".join(inside)


def test_no_function_is_longer_than_a_screen_and_a_half():
    """Every function of the project fits in 80 lines (the recipe's phases included)."""
    long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)
