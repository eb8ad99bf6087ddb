"""One dependency direction inside ``experiments/``: data <- runtime <- techniques <- configs, jobs <- tools,
benchmarks <- main. Read from the source's import statements (module level and inside functions alike)."""

import ast
import pathlib

from tests.multidevice import REPO

LAYERS = {"data": 0, "runtime": 1, "techniques": 2, "configs": 3, "jobs": 3, "tools": 4, "benchmarks": 4, "main": 5}
# Upward imports not yet moved (issue 31: the library parts of these tools move below them). The list may only
# shrink: a new upward import fails, and so does an entry that no longer exists (delete it).
KNOWN_UPWARD = {
    "experiments/benchmarks/bench_onnx.py imports experiments.tools",  # tools.export.output_fields
    "experiments/jobs/recipes.py imports experiments.tools",  # tools.report.build_report
    "experiments/jobs/stages.py imports experiments.tools",  # tools.prune, tools.export, tools.export_eval
}


def _imports(path: pathlib.Path) -> set[str]:
    """The ``experiments.<part>`` packages a file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "experiments" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_no_module_imports_a_layer_above_its_own():
    root = pathlib.Path(REPO) / "experiments"
    upward = []
    for path in sorted(root.rglob("*.py")):
        part = path.relative_to(root).parts[0].removesuffix(".py")
        if part not in LAYERS:
            continue
        for imported in _imports(path) & set(LAYERS):
            if LAYERS[imported] > LAYERS[part] or ({part, imported} == {"tools", "benchmarks"}):
                upward.append(f"{path.relative_to(REPO)} imports experiments.{imported}")
    assert set(upward) == KNOWN_UPWARD, "\n".join(sorted(set(upward) ^ KNOWN_UPWARD))
