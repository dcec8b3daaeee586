"""The run-time half's layers: nothing below a command imports a command (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "vmzconv"
COMMANDS = {"vmzconv.cli", "vmzconv.verify", "vmzconv.predict", "vmzconv.features", "vmzconv.export",
            "vmzconv.convert", "vmzconv.bulk"}
CORE = ["inference.py", "run.py", "runtimes.py", "graph.py", "load.py", "video", "models", "targets.py"]


def imports(path: Path) -> set[str]:
    """Absolute names of the vmzconv modules ``path`` imports (relative imports resolved)."""
    here = ["vmzconv"] + list(path.relative_to(PKG).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("vmzconv")}


def test_the_core_imports_no_command():
    files = [p for c in CORE for p in ([PKG / c] if c.endswith(".py") else sorted((PKG / c).rglob("*.py")))]
    assert len(files) >= 12
    bad = {str(f.relative_to(PKG)): sorted(m for m in imports(f) if any(m == c or m.startswith(c + ".")
                                                                          for c in COMMANDS))
           for f in files}
    assert {f: m for f, m in bad.items() if m} == {}


def test_targets_is_plain_data():
    assert not {m for m in imports(PKG / "targets.py") if m.startswith("vmzconv.models")}
