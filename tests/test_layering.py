"""Layers import only downward, and no module imports itself back through others.

The import graph is read from the source (ast), function-local imports included: a lazy import
hides a dependency from the reader, not from this test.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "align_jax"

# The layer order, bottom first: a module may import its own layer and the layers below it.
# Every top-level module and package is named (test_every_top_level_module_has_a_layer).
LAYERS = (
    # The package itself (it checks versions on import) and the leaf utilities every layer uses.
    ("align_jax", "align_jax.versions", "align_jax.axes", "align_jax.atomic", "align_jax.jsonl",
     "align_jax.interrupts", "align_jax.run_lock", "align_jax.distributed"),
    ("align_jax.sharding",),
    ("align_jax.runinfo",),
    # A named model's (or a .gguf file's) tokenizer is the model layer's conversion of it.
    ("align_jax.models",),
    ("align_jax.tokenizer",),
    ("align_jax.tokenizer_training",),
    ("align_jax.data",),
    ("align_jax.losses",),
    ("align_jax.train",),
    ("align_jax.generate",),
    # The judge in eval is a Teacher (sdg.teacher / sdg.backends), so sdg sits below eval.
    ("align_jax.sdg",),
    ("align_jax.eval",),
    ("align_jax.methods",),
    ("align_jax.cli", "align_jax.cli_help", "align_jax.ginconf"),
)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: pathlib.Path, modules) -> list[tuple[str, int]]:
    """(imported align_jax module, line): `from pkg import mod` counts as mod, not pkg."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            found = [s for s in subs if s in modules]
            out += [(s, node.lineno) for s in found]
            if len(found) < len(subs):
                out.append((node.module, node.lineno))
    return [(m, line) for m, line in out if m in modules]


def _relative_imports() -> list[str]:
    """`from . import x` / `from ..y import z` sites: the layering reads absolute names only."""
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                out.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {name}")
    return out


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def _graph():
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}, modules


def test_every_import_points_down_or_within_its_layer():
    graph, modules = _graph()
    upward = [f"{modules[m].relative_to(ROOT.parent)}:{line}: {m} imports {dep}"
              for m, deps in graph.items() for dep, line in deps if _layer(dep) > _layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph, _ = _graph()
    edges = {m: sorted({d for d, _ in deps if d != m}) for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_relative_imports():
    found = _relative_imports()
    assert not found, "relative imports (write align_jax.<module>):\n" + "\n".join(found)


def test_every_top_level_module_has_a_layer():
    # A new top-level module must be placed on purpose, not fall into the package's layer.
    named = {name for names in LAYERS for name in names}
    top = {".".join(m.split(".")[:2]) for m in _modules()}
    missing = sorted(top - named)
    assert not missing, f"add these to LAYERS: {missing}"
