"""The package's layers (docs/ARCHITECTURE.md): a module imports only from its own layer or lower
ones — at the top of a file or inside a function alike — so there are no import cycles between
layers and each layer can be read without the ones above it."""

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


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
