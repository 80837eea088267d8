"""The package's layers (docs/ARCHITECTURE.md): a module imports only from its own layer or lower
ones — at the top of a file or inside a function alike — so there are no import cycles between
layers and each layer can be read without the ones above it; and no two modules import each other,
directly or round a longer circle, inside a package either."""

import ast
from pathlib import Path

import kvlab

SRC = Path(kvlab.__file__).parent
LAYERS = [
    ["errors", "dtypes", "progress", "registry"],
    ["config"],
    ["layers"],
    ["cache"],
    ["attention"],
    ["models"],
    ["io"],
    ["convert", "peft"],
    ["data"],
    ["inference", "eval"],
    ["training"],          # above generation: RL objectives sample their rollouts with it
    ["recipes", "study", "serve"],
    ["cli", "__main__"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only, which never
    run: a module may name the type of an argument that a higher module passes it)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        yield node


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvlab.") and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kvlab.")}
    return found


def test_every_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file()) and p.name != "__init__.py"}
    assert parts == set(RANK)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue                          # the package's front door re-exports from every layer
        own = RANK[rel.parts[0].removesuffix(".py")]
        for module in imports_of(path):
            if RANK[_part(module)] > own:
                upward.append(f"{rel} imports {module}")
    assert upward == []


def test_the_checker_sees_nested_imports():
    assert "kvlab.cli" in imports_of(SRC / "__main__.py")
    assert any(m.startswith("kvlab.peft") for m in imports_of(SRC / "training" / "checkpoints.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph() -> dict[str, set[str]]:
    """Module -> the kvlab modules it imports (``from kvlab.a import b`` names module ``kvlab.a.b``
    when that is a module, else ``kvlab.a``)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvlab") and not node.level:
                for alias in node.names:
                    deps.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                             else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = deps & set(modules) - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_between_modules():
    assert circles(module_graph()) == []


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    # a function-level import counts, an annotations-only one does not
    assert "kvlab.config.model" not in module_graph()["kvlab.config.accounting"]
    assert "kvlab.config.accounting" in module_graph()["kvlab.config.model"]


# ---- the picture of the layers in docs/ARCHITECTURE.md, generated from the code ----
DOC = SRC.parent.parent / "docs" / "ARCHITECTURE.md"
BEGIN = "<!-- generated from the code by tests/test_layering.py: run `python tests/test_layering.py` to update -->"
END = "<!-- end of the generated picture -->"
LAYER_NAMES = ["foundation", "configuration", "layers", "cache", "attention", "models", "I/O", "adaptation", "data",
               "inference, evaluation", "training", "recipes, study, serving", "CLI"]


def package_graph() -> dict[str, set[str]]:
    """Package -> the packages its modules import (the front door ``kvlab/__init__.py`` left out)."""
    graph: dict[str, set[str]] = {name: set() for name in RANK}
    for module, deps in module_graph().items():
        if module == "kvlab":
            continue
        own = module.split(".")[1]
        graph[own] |= {d.split(".")[1] for d in deps if d != "kvlab"} - {own}
    return graph


def _reduced(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges not implied by a longer path (the transitive reduction), so the picture stays legible."""
    def reach(start: str, skip: str) -> set[str]:
        seen, todo = set(), [d for d in graph[start] if d != skip]
        while todo:
            v = todo.pop()
            if v not in seen:
                seen.add(v)
                todo.extend(graph[v])
        return seen
    return {u: {v for v in vs if v not in reach(u, v)} for u, vs in graph.items()}


def layer_picture() -> str:
    """A Mermaid flowchart: one box per layer, top to bottom, holding its packages; an arrow where a
    package imports another and no longer path already says so."""
    lines = ["```mermaid", "flowchart TB"]
    for i in reversed(range(len(LAYERS))):
        lines.append(f'  subgraph L{i}["{i} · {LAYER_NAMES[i]}"]')
        lines.append("    direction LR")
        lines += [f'    {name.strip("_")}["{name}"]' for name in LAYERS[i]]
        lines.append("  end")
    edges = _reduced(package_graph())
    lines += [f"  {u.strip('_')} --> {v.strip('_')}" for u in sorted(edges) for v in sorted(edges[u])]
    lines.append("```")
    return "\n".join(lines)


def _current_picture() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")


def test_the_architecture_picture_is_the_code():
    assert len(LAYER_NAMES) == len(LAYERS)
    assert _current_picture() == layer_picture(), "docs/ARCHITECTURE.md is stale: run python tests/test_layering.py"


if __name__ == "__main__":          # rewrite the picture in docs/ARCHITECTURE.md
    text = DOC.read_text()
    head, rest = text.split(BEGIN)
    DOC.write_text(head + BEGIN + "\n" + layer_picture() + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote the layer picture into {DOC}")
