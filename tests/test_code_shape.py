"""The package stays readable as it grows: no function over 120 lines, no CLI verb whose ``run`` does
more than parse its arguments into a recipe and call it (60 lines), and no module over 500 lines
except the attention kernels (a kernel is one long computation, split only where it must be)."""

import ast
from pathlib import Path

import kvlab

SRC = Path(kvlab.__file__).parent
MAX_FUNCTION, MAX_VERB_RUN, MAX_MODULE = 120, 60, 500
KERNELS = SRC / "attention" / "kernels"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_over_120_lines():
    long = [f"{p.relative_to(SRC)}:{name} ({n} lines)" for p in sorted(SRC.rglob("*.py"))
            for name, n in _functions(p) if n > MAX_FUNCTION]
    assert long == []


def test_every_cli_verb_run_is_thin():
    fat = [f"{p.name}:run ({n} lines)" for p in sorted((SRC / "cli").glob("*.py"))
           for name, n in _functions(p) if name == "run" and n > MAX_VERB_RUN]
    assert fat == []


def test_no_module_is_over_500_lines_except_kernels():
    big = [f"{p.relative_to(SRC)} ({n} lines)" for p in sorted(SRC.rglob("*.py"))
           if KERNELS not in p.parents and (n := len(p.read_text().splitlines())) > MAX_MODULE]
    assert big == []


def test_the_checks_see_what_they_measure(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n" + "    x = 1\n" * 130 + "\n\nasync def g():\n    pass\n")
    assert dict(_functions(source)) == {"f": 131, "g": 2}
