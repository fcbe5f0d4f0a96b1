"""Every stage of dvc.yaml lists the project code it runs, so DVC reruns it when that code changes.

A stage runs ``python -m <module>``; the project modules it imports, directly or through others, at
module level or inside a function, are read from the source (``ast``) and must each be a dep of the
stage (the file, or a directory holding it). A missing one would leave the stage's outputs stale
after a change to it (``parse`` ran ``models/skeleton.py`` through three modules without listing it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"models", "stages", "serving", "pipelines"}
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    if path.exists():
        return path
    package = ROOT / name.replace(".", "/") / "__init__.py"
    return package if package.exists() else None


def imported(path: Path) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` counts ``a`` and ``a.b``)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return {n for n in names if n.split(".")[0] in PACKAGES}


def code_of(module: str) -> set[Path]:
    """The project's source files ``python -m module`` runs (package ``__init__`` files aside)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is not None and path not in seen:
            seen.add(path)
            todo += imported(path)
    return {p for p in seen if p.name != "__init__.py"}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_lists_the_code_it_runs(name):
    stage = STAGES[name].get("do", STAGES[name])
    module = stage["cmd"].split("-m ", 1)[1].split()[0]
    deps = [ROOT / d for d in stage.get("deps", []) if "${" not in d]
    missing = sorted(
        str(f.relative_to(ROOT)) for f in code_of(module) if not any(f == d or d in f.parents for d in deps)
    )
    assert not missing, f"dvc.yaml stage {name} runs {module} but does not list {missing} as deps"


def test_the_import_walk_follows_relative_and_lazy_imports():
    """The walk sees what it must: ``from .settings import ...`` in serving and an import inside a
    function (video_skeletons imports serving.video lazily)."""
    assert ROOT / "serving/settings.py" in code_of("serving.video_io")
    assert ROOT / "serving/video.py" in code_of("stages.video_skeletons")
    assert ROOT / "models/skeleton.py" in code_of("stages.parse")
