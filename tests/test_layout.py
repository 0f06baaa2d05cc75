"""The layout stays true: imports point one way (pipelines → transforms → estimators → schemas), no stage imports
another stage, and estimators/ and schemas/ never import Beam. Read from every module's imports (the lazy ones
inside functions too), so a new import that breaks the layering fails here, not in a reader's head."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("schemas", "estimators", "transforms", "pipelines")
"""Lowest first: a module may import its own layer and those below it."""
STAGE_MODULES = {f"pipelines.{name}" for name in (*STAGES, "evaluate")}
"""The executors, one module per stage (``evaluate`` reads a finished run the same way)."""
OURS = (*LAYERS, "tests", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def imports(path: Path, package: str = "") -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b`` counts as ``a.b`` too:
    ``b`` may be a module); a relative import is resolved against ``package``, the module's package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.update([module] if module else [])
            found.update(f"{module}.{alias.name}" if module else alias.name for alias in node.names)
    return found


def _imports_of(module: str) -> set[str]:
    path = MODULES[module]
    return imports(path, module if path.name == "__init__.py" else module.rpartition(".")[0])


def _ours(name: str) -> str | None:
    """The module of ours that ``name`` is (or is inside), else None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def test_the_layout_is_what_the_test_reads():
    assert {"pipelines.ingest", "pipelines.orchestration.cli", "pipelines.sources.simulator", "transforms.read",
            "estimators.weights", "estimators.reward.trainer", "schemas.stages", "schemas.storage"} <= set(MODULES)
    assert set(MODULES) >= STAGE_MODULES
    assert "pipelines.fit" in {_ours(n) for n in imports(ROOT / "pipelines" / "orchestration" / "registry.py")}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    layer = LAYERS.index(module.split(".")[0])
    upward = sorted({n for n in _imports_of(module) if n.split(".")[0] in OURS
                     and (n.split(".")[0] not in LAYERS or LAYERS.index(n.split(".")[0]) > layer)})
    assert not upward, f"{module} imports {upward}: imports point pipelines → transforms → estimators → schemas"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("pipelines")
                                         and not m.startswith(("pipelines.orchestration", "pipelines.sources"))))
def test_no_stage_imports_another_stage_or_what_runs_it(module):
    used = {_ours(n) for n in _imports_of(module)} - {None, module}
    wrong = sorted(m for m in used if m in STAGE_MODULES or m.startswith(("pipelines.orchestration",
                                                                            "pipelines.sources")))
    assert not wrong, f"{module} imports {wrong}: stages meet only in the run directory"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("pipelines.sources")))
def test_data_sources_import_no_stage(module):
    used = {_ours(n) for n in _imports_of(module)} - {None}
    wrong = sorted(m for m in used if m in STAGE_MODULES or m.startswith("pipelines.orchestration"))
    assert not wrong, f"{module} imports {wrong}: a data source writes raw logs; it runs no stage"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(("estimators", "schemas"))))
def test_estimators_and_schemas_are_free_of_beam(module):
    beam = sorted(n for n in _imports_of(module) if n.split(".")[0] == "apache_beam")
    assert not beam, f"{module} imports {beam}: Beam belongs in transforms/ and the Beam stages"


def test_importing_a_stage_without_beam_does_not_load_beam():
    """fit, train, report, evaluate and the orchestration that lists runs run without Beam: importing them must
    not pay for it (a fresh interpreter, so nothing else has loaded it)."""
    code = ("import sys\nimport pipelines.fit, pipelines.train, pipelines.report, pipelines.evaluate\n"
            "import pipelines.orchestration.summary, pipelines.orchestration.registry\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'apache_beam')[:3])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"Beam loaded by importing a non-Beam stage: {out.stdout}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The checks read what they claim: an estimators module importing a transform is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from transforms.read import ReadParts\n    import apache_beam as beam\n")
    assert {"transforms.read", "transforms.read.ReadParts", "apache_beam"} <= imports(module)
    assert _ours("transforms.read.ReadParts") == "transforms.read"
    module.write_text("from .fit import execute\nfrom .. import transforms\n")          # relative, from pipelines.x
    assert {"pipelines.fit", "pipelines.fit.execute", "transforms"} <= imports(module, "pipelines")
