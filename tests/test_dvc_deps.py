"""DVC knows exactly what is stale: every project file a stage's command imports is one of
its deps (a file, or a folder above it), and report or figure code is no dep of training.

The imports are read from the source (AST, nothing executed): ``import a.b``,
``from a import b`` (``b`` a module or a name), relative imports, imports inside functions,
and the ``__init__.py`` of every package on the way. Imports under ``if TYPE_CHECKING:``
never run and are not followed. ``NOT_DEPS`` names the one exception, MLflow logging.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mri_ensemble", "stages")
# Imported but no dep, like the `mlflow` params section: where and how a stage's runs are
# logged does not change what it computes (tracking.py writes only MLflow and
# .mlflow-runs/, never an out), so a logging fix retrains nothing.
NOT_DEPS = {"stages/tracking.py"}


def module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runtime_nodes(tree: ast.AST) -> list[tuple[ast.AST, tuple[str, ...]]]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``, each with the names
    of the functions it sits in (outermost first)."""
    out: list[tuple[ast.AST, tuple[str, ...]]] = []
    todo: list[tuple[ast.AST, tuple[str, ...]]] = [(tree, ())]
    while todo:
        node, funcs = todo.pop()
        out.append((node, funcs))
        inner = (
            (*funcs, node.name)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            else funcs
        )
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
                "TYPE_CHECKING"
            ):
                todo.extend((c, inner) for c in child.orelse)
                continue
            todo.append((child, inner))
    return out


def imports_of(root: Path, module: str, path: Path, referenced: set[str] | None = None) -> set[str]:
    """Project modules that ``module`` (at ``path``) imports. An import inside a function
    counts when ``referenced`` is None or names that function (and every one around it)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node, funcs in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if referenced is not None and not all(f in referenced for f in funcs):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(root, m)}


def references_of(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Every name ``path`` uses (``f``, ``x.f``: what its code can call), each with the
    functions it is used in."""
    out = []
    for node, funcs in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Name):
            out.append((node.id, funcs))
        elif isinstance(node, ast.Attribute):
            out.append((node.attr, funcs))
    return out


def _reachable(uses: list[tuple[str, tuple[str, ...]]]) -> set[str]:
    """Names used at module level, then those used inside functions whose names are
    themselves reachable, to a fixed point."""
    reached: set[str] = set()
    while True:
        grown = {name for name, funcs in uses if all(f in reached for f in funcs)}
        if grown <= reached:
            return reached
        reached |= grown


@functools.cache
def closure(root: Path, start: str) -> frozenset[str]:
    """Repository-relative paths of every project file that running ``start`` can import.

    A function's own imports (e.g. a task method's, :mod:`mri_ensemble.tasks`) count only
    when the function is reachable: its name is used at module level somewhere in the
    closure, or inside a function that is reachable. So the ingest stage, which never asks
    a task for its ensemble inputs, does not depend on the ensemble code. Grown to a fixed
    point."""
    referenced: set[str] = set()
    while True:
        seen: dict[str, Path] = {}
        todo = [start]
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            path = module_file(root, module)
            if path is None:
                raise AssertionError(f"{module}: no such project module")
            seen[module] = path
            parts = module.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # package __init__s
            todo += sorted(imports_of(root, module, path, referenced))
        grown = _reachable([u for p in seen.values() for u in references_of(p)])
        if grown <= referenced:
            return frozenset(p.relative_to(root).as_posix() for p in seen.values())
        referenced |= grown


@functools.cache
def stages_of(root: Path) -> list[tuple[str, str, list[str]]]:
    """(stage name, command, dep paths) for every stage dvc.yaml generates."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [
            (stage.name, stage.cmd, [d.def_path for d in stage.deps]) for stage in repo.index.stages
        ]


def uncovered(root: Path) -> dict[str, list[str]]:
    """Per stage, the imported project files that none of its deps covers."""
    out = {}
    for name, cmd, deps in stages_of(root):
        match = re.search(r"python -m (stages\.\w+)", cmd)
        assert match, f"{name}: command {cmd!r} does not run a stages module"
        missing = [
            f
            for f in sorted(closure(root, match.group(1)) - NOT_DEPS)
            if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
        ]
        if missing:
            out[name] = missing
    return out


def test_every_stage_depends_on_every_file_its_command_imports():
    missing = uncovered(ROOT)
    assert not missing, "\n".join(f"{s}: not in deps: {', '.join(f)}" for s, f in missing.items())


def test_tracking_code_is_no_dep_and_writes_no_out():
    source = (ROOT / "stages" / "tracking.py").read_text()
    for name, _cmd, deps in stages_of(ROOT):
        assert "stages/tracking.py" not in deps, f"{name}: tracking code would retrain models"
    # its only file is the run-id note in .mlflow-runs/ (no stage's out)
    assert source.count("write_json(") == 1 and 'RUNS_DIR = Path(".mlflow-runs")' in source


def test_report_and_figure_code_retrain_nothing():
    for name, _cmd, deps in stages_of(ROOT):
        if name.startswith(("ingest", "augment", "train", "evaluate")):
            for path in ("stages/report.py", "mri_ensemble/figures.py", "mri_ensemble/ensemble"):
                # a dep on the path, on a folder above it, or (a folder) on a file inside it
                assert not any(
                    path == d or path.startswith(d.rstrip("/") + "/") or d.startswith(path + "/")
                    for d in deps
                ), f"{name} depends on {path}"


def test_the_check_fails_on_a_missing_dep(tmp_path: Path):
    """A copy whose train stage lost one dep (and whose stage module imports a new file) is
    caught, naming the stage and the file."""
    for name in ("mri_ensemble", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("        - mri_ensemble/losses.py\n", "", 1))
    (tmp_path / "mri_ensemble" / "extra.py").write_text("X = 1\n")
    train = tmp_path / "stages" / "train.py"
    train.write_text(
        train.read_text() + "\ndef _late():\n    from mri_ensemble import extra\n\n\nLATE = _late\n"
    )
    missing = uncovered(tmp_path)
    assert missing["train@segmentation-unet"] == ["mri_ensemble/extra.py", "mri_ensemble/losses.py"]
    assert "extra.py" not in " ".join(missing.get("ensemble@segmentation", []))


def test_a_function_import_counts_only_where_the_function_is_used():
    """Task methods import what only some stages need: ingest does not depend on the
    ensemble search, the ensemble stage does; a never-used function's import is no dep."""
    ingest = closure(ROOT, "stages.ingest")
    assert "mri_ensemble/data/ingest.py" in ingest
    assert not {p for p in ingest if p.startswith(("mri_ensemble/ensemble", "mri_ensemble/nets"))}
    assert "mri_ensemble/ensemble/__init__.py" in closure(ROOT, "stages.ensemble")
    assert "mri_ensemble/losses.py" in closure(ROOT, "stages.train")
    assert "mri_ensemble/losses.py" not in closure(ROOT, "stages.evaluate")


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import mri_ensemble.metrics\n", {"mri_ensemble.metrics"}),
        (
            "from mri_ensemble import metrics, io\n",
            {"mri_ensemble", "mri_ensemble.metrics", "mri_ensemble.io"},
        ),  # fmt: skip
        ("from ..metrics import CLASS_NAMES\n", {"mri_ensemble.metrics"}),
        ("from . import fft\n", {"mri_ensemble.data"}),
        ("def f():\n    import mri_ensemble.io\n", {"mri_ensemble.io"}),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mri_ensemble.io\n",
            set(),
        ),
        ("import numpy\nimport mri_ensemble.nope\n", set()),
    ],
)
def test_imports_are_read_from_the_source(tmp_path: Path, source: str, expected: set[str]):
    path = tmp_path / "x.py"
    path.write_text(source)
    assert imports_of(ROOT, "mri_ensemble.data.x", path) == expected
