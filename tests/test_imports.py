"""The house without circles (issue 26, section 4): data flows one way through ``jaxqlora``
(checkpoint -> loader -> model -> quantize -> LoRA -> train step -> adapter; model -> decode ->
generate / serving), so no module of ``jaxqlora/`` imports, at module level or inside a
function, a module that imports it back (directly or through others); no module imports
another module's underscore names; and ``pallas_kernels/`` never imports ``jaxqlora``.
Read from the source with ``ast`` (every import statement, lazy ones included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _imports(name: str, file: Path):
    """``(imported module, imported names)`` of every import statement in ``file``."""
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _graph():
    mods = _modules("jaxqlora")
    graph = {m: set() for m in mods}
    underscore = []
    for m, f in mods.items():
        for base, names in _imports(m, f):
            if not base.startswith("jaxqlora"):
                continue
            for n in names or [None]:
                full = f"{base}.{n}" if n else base
                target = full if full in mods else base
                if target in mods and target != m:
                    graph[m].add(target)
                if n and n.startswith("_") and full not in mods:
                    underscore.append(f"{m} imports {base}.{n}")
    return graph, underscore


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_jaxqlora():
    graph, _ = _graph()
    assert "jaxqlora.model" in graph and graph["jaxqlora.quantize"]  # the graph was read
    assert _cycles(graph) == []


def test_no_module_imports_another_modules_underscore_names():
    _, underscore = _graph()
    assert underscore == []


def test_pallas_kernels_never_import_jaxqlora():
    bad = [f"{m} imports {base}" for m, f in _modules("pallas_kernels").items()
           for base, _ in _imports(m, f) if base == "jaxqlora" or base.startswith("jaxqlora.")]
    assert bad == []
