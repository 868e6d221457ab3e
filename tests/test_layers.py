"""The package's layers: every import (module level or inside a function) points down or sideways, never up, and
no stage imports another stage (stages talk through files; what they share is a library module below them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tigbev"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("tigbev.errors", "tigbev.config", "tigbev.geometry", "tigbev.checkpoint_file", "tigbev.utils")),
    ("cache", ("tigbev.cache",)),
    ("data", ("tigbev.data",)),
    ("models", ("tigbev.models",)),
    ("engine", ("tigbev.engine",)),
    ("stages", ("tigbev.stages",)),
    ("drivers", ("tigbev.pipeline", "tigbev.bench")),
    ("cli", ("tigbev.cli", "tigbev.__main__")),
)
"""Lowest first. A module may import its own layer and the layers below."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def imports_of(path: Path, known: set[str]) -> set[str]:
    """tigbev modules imported anywhere in ``path``; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tigbev"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tigbev":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found |= subs or {target}
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every upward import, every stage-to-stage import and every module outside the layer map."""
    out = []
    for module, deps in sorted(graph.items()):
        rank = layer_of(module)
        if rank is None:
            out.append(f"{module} is in no layer")
            continue
        for dep in sorted(deps):
            dep_rank = layer_of(dep)
            if dep_rank is None:
                if dep != "tigbev":
                    out.append(f"{module} imports {dep}, which is in no layer")
            elif dep_rank > rank:
                out.append(f"{module} ({LAYERS[rank][0]}) imports {dep} ({LAYERS[dep_rank][0]}): upward")
            elif LAYERS[rank][0] == "stages" and dep_rank == rank and dep != "tigbev.stages" \
                    and module != "tigbev.stages":
                out.append(f"{module} imports the stage {dep}: stages never import stages")
    return out


def package_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) - {module_name(p)} for p in files if module_name(p) != "tigbev"}


def test_no_upward_or_stage_to_stage_imports() -> None:
    graph = package_graph()
    assert "tigbev.stages.train_student" in graph and "tigbev.engine.scoring" in graph["tigbev.stages.train_student"]
    assert violations(graph) == []


@pytest.mark.parametrize(("module", "dep", "expected"), [
    ("tigbev.data.camera_dataset", "tigbev.models.losses", "upward"),
    ("tigbev.stages.train_student", "tigbev.stages.evaluate", "stages never import stages"),
    ("tigbev.cache.tools", "tigbev.stages.extract_teacher", "upward"),
    ("tigbev.tools", "tigbev.utils.plots", "in no layer"),
])
def test_the_checker_names_each_kind_of_violation(module: str, dep: str, expected: str) -> None:
    found = violations({module: {dep}})
    assert len(found) == 1 and expected in found[0]
    assert violations({module: set()}) == ([] if "no layer" not in expected else found)


def test_from_package_import_module_resolves_to_the_module() -> None:
    graph = package_graph()
    # cli.py does `from tigbev.stages import train_student as stage` inside a command
    assert "tigbev.stages.train_student" in graph["tigbev.cli"]
    assert "tigbev.stages.extract_teacher" in graph["tigbev.pipeline.demo"]
