"""The layering rules of docs/architecture.md, read from the import statements.

- no stage imports another stage, except the orchestrators `r1` and `distill`;
- a component never imports a stage, except `base_models`, which builds a missing base model
  by running the pretrain stage, and the `aha` CLI, which dispatches to the stages;
- bench/ and docs/experiments/ take from a stage only what the CLI exposes of it: its config
  class and its stage function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ahamoment import cli

ROOT = Path(__file__).parent.parent
PKG = ROOT / "src" / "ahamoment"
ORCHESTRATORS = {"r1", "distill"}
MAY_RUN_STAGES = {"base_models", "cli"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _stages_imported(path: Path) -> set[str]:
    found = set()
    for module, names in _imports(path):
        if module.startswith("ahamoment.stages."):
            found.add(module.split(".")[2])
        elif module == "ahamoment.stages":
            found.update(names)
    return found


STAGES = sorted(p.stem for p in (PKG / "stages").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another(stage):
    others = _stages_imported(PKG / "stages" / f"{stage}.py") - {stage}
    assert stage in ORCHESTRATORS or not others, f"stages/{stage}.py imports stages {others}"


def test_components_never_import_stages():
    bad = {
        str(p.relative_to(PKG)): _stages_imported(p)
        for p in PKG.rglob("*.py")
        if "stages" not in p.parts and p.stem not in MAY_RUN_STAGES and _stages_imported(p)
    }
    assert bad == {}


def _public(stage: str) -> set[str]:
    return {
        name for c in cli.COMMANDS.values() if c.module == stage for name in (c.config, c.function)
    }


def test_scripts_use_only_the_public_surface_of_a_stage():
    scripts = [*(ROOT / "bench").glob("*.py"), *(ROOT / "docs" / "experiments").glob("*.py")]
    assert scripts
    bad = []
    for path in scripts:
        for module, names in _imports(path):
            if module.startswith("ahamoment.stages."):
                stage = module.split(".")[2]
                bad += [f"{path.name}: {stage}.{n}" for n in names if n not in _public(stage)]
    assert bad == []


def test_the_rules_can_fail(tmp_path):
    # the checks above see a stage import anywhere in a file, a function body's too
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ahamoment.stages.zero import policy_update\n")
    assert _stages_imported(probe) == {"zero"}
    assert "policy_update" not in _public("zero") and "ZeroConfig" in _public("zero")
