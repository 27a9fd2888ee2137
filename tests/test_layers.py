"""The package layout is the architecture: each module imports only its own layer or the layers below it.

Walks every ``import`` / ``from … import`` statement (module level and inside functions) of ``shiq_toy`` and
``shiq_llm`` with :mod:`ast` and fails on an upward import, an import of a sibling layer, or an import of the
command line from outside it. The layers, bottom to top:

    shiq_toy core (flat modules)  <  shiq_toy.testing  <  shiq_toy.experiments  <  shiq_toy.cli
    shiq_llm.storage < .data < .core < {.generation | .train} < .tasks < .experiments < .cli

``shiq_llm`` may import ``shiq_toy``'s core everywhere, ``shiq_toy.experiments`` (the shared experiment helpers:
CSV, summaries, intervals, bands) from its own experiments and command line only; ``shiq_toy`` never imports
``shiq_llm``. ``shiq_llm/__init__.py`` is the public API (it may import any layer but the command line).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Rank of each layer; two different layers of the same rank are siblings and may not import each other.
LLM_LAYERS = {"storage": 0, "data": 1, "core": 2, "generation": 3, "train": 3, "tasks": 4, "experiments": 5, "cli": 6}
TOY_LAYERS = {"": 0, "testing": 1, "experiments": 2, "cli": 3}


def layer_of(module: str) -> tuple[str, str, int] | None:
    """``(package, layer, rank)`` of a dotted module name of this project, None for anything else."""
    parts = module.split(".")
    if parts[0] == "shiq_llm":
        if len(parts) == 1:
            return ("shiq_llm", "api", 99)
        layer = parts[1]
        if layer not in LLM_LAYERS:
            raise AssertionError(f"{module}: shiq_llm.{layer} is not in a layer (tests/test_layers.py LLM_LAYERS)")
        return ("shiq_llm", layer, LLM_LAYERS[layer])
    if parts[0] == "shiq_toy":
        layer = parts[1] if len(parts) > 1 and parts[1] in TOY_LAYERS else ""
        return ("shiq_toy", layer, TOY_LAYERS[layer])
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import of the file, relative imports resolved, ``from X import y`` as
    ``X.y`` when ``y`` is a submodule of this project (so ``from shiq_llm import synthetic`` counts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*candidate.split(".")) / "__init__.py").exists()
                found.append((node.lineno, candidate if is_module else base))
    for node in ast.walk(tree):  # importlib.import_module("shiq_llm.x") counts too
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (None when it may)."""
    source, target = layer_of(importer), layer_of(imported)
    if source is None or target is None:
        return None
    (src_pkg, src_layer, src_rank), (dst_pkg, dst_layer, dst_rank) = source, target
    if src_pkg == "shiq_toy" and dst_pkg == "shiq_llm":
        return "shiq_toy never imports shiq_llm"
    if dst_layer == "cli" and src_layer != "cli":
        return "nothing outside the command line imports it"
    if src_pkg == "shiq_llm" and src_layer == "api":
        return None
    if src_pkg == "shiq_llm" and dst_pkg == "shiq_toy":
        if dst_layer == "":
            return None
        if dst_layer == "experiments" and src_layer in ("experiments", "cli"):
            return None
        return f"shiq_llm.{src_layer} may import only shiq_toy's core modules"
    if dst_pkg == "shiq_llm" and dst_layer == "api":
        return "a layer imports the module it needs, not the public API package"
    if dst_rank > src_rank:
        return f"upward import ({src_layer} → {dst_layer})"
    if dst_rank == src_rank and dst_layer != src_layer:
        return f"sibling layers ({src_layer} ↔ {dst_layer})"
    return None


def project_files() -> list[Path]:
    return sorted(p for package in ("shiq_toy", "shiq_llm") for p in (ROOT / package).rglob("*.py"))


def test_every_import_respects_the_layers():
    problems = []
    for path in project_files():
        importer = module_name(path)
        for line, imported in imported_modules(path):
            why = violation(importer, imported)
            if why:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}: {why}")
    assert not problems, "\n".join(problems)


def test_the_trainer_and_its_config_never_import_the_embedded_tasks():
    for name in ("config", "trainer"):
        path = ROOT / "shiq_llm" / "train" / f"{name}.py"
        assert not [m for _, m in imported_modules(path) if m.startswith("shiq_llm.tasks")], path


def test_no_private_name_is_imported_across_modules():
    problems = []
    for path in [*project_files(), *sorted((ROOT / "benchmarks").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("shiq_toy", "shiq_llm")):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                private += [part for part in (node.module or "").split(".") if part.startswith("_")]
                if private:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} {private}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "importer, imported, expected",
    [
        ("shiq_llm.train.trainer", "shiq_llm.core.stats", None),
        ("shiq_llm.core.stats", "shiq_llm.train.trainer", "upward import (core → train)"),
        ("shiq_llm.train.run", "shiq_llm.generation.evaluate", "sibling layers (train ↔ generation)"),
        ("shiq_llm.experiments.sweep", "shiq_llm.cli.tasks", "nothing outside the command line imports it"),
        ("shiq_toy.losses", "shiq_llm.core.stats", "shiq_toy never imports shiq_llm"),
        ("shiq_toy.losses", "shiq_toy.experiments", "upward import ( → experiments)"),
        ("shiq_llm.train.run", "shiq_toy.experiments", "shiq_llm.train may import only shiq_toy's core modules"),
        ("shiq_llm.experiments.report", "shiq_toy.experiments", None),
        ("shiq_llm.cli.tasks", "shiq_llm.tasks.synthetic", None),
    ],
)
def test_the_rule_itself(importer, imported, expected):
    assert violation(importer, imported) == expected
