"""The package layout holds: the library (`vigos_ray/`) never imports the distributed system built on it
(`workers/`), at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in a file, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_library_never_imports_the_workers():
    offenders = [str(p.relative_to(REPO)) for p in sorted((REPO / "vigos_ray").rglob("*.py"))
                 if "workers" in imported_packages(p)]  # fmt: skip
    assert offenders == [], f"vigos_ray/ must not import workers/: {offenders}"


def test_the_scan_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from workers.rollout import RolloutWorker\n")
    assert "workers" in imported_packages(sample)


def test_no_class_has_more_than_nine_public_methods():
    """A class with many verbs has several jobs (#19): split it by responsibility, as Pipeline and WeightPusher."""
    crowded = []
    for path in sorted([*(REPO / "vigos_ray").rglob("*.py"), *(REPO / "workers").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                public = [f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")]
                if len(public) > 9:
                    crowded.append(f"{path.relative_to(REPO)}:{node.name} ({len(public)})")
    assert crowded == [], crowded
