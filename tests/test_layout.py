"""The package layout is the architecture: the library core imports no tooling, and every subpackage
imports only from the layers below it (README "Layout")."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import comoe

PACKAGE = Path(comoe.__file__).parent

# Bottom to top. A module may import from its own layer and the layers below, never from above.
LAYERS = ("utils", "core", "data", "evaluation", "training", "analysis", "experiments", "tools", "cli")
CORE_MODULES = {
    "config",
    "experts",
    "ffn_experts",
    "layer",
    "mixture",
    "loading",
    "compat",
    "placement",
    "routers",
    "inference",  # the inference math: torch only, written into exported model folders
    "trace",
    "auxiliary",
    "frozen",
    "grouped",
    "dora",
    "dense",
    "fused",
    "compiling",
    "gram_loss",
    "recompute",
    "outputs",
    "ffn",
    "losses",
    "targets",
    "tuner",
    "model",
    "records",
    "routing_health",
    "peft_type",
    "sft",
    "trainers",
    "alignment",
    "moved",  # the old module paths: their targets are strings, imported only when an old path is
}


def layer_of(module: str) -> str:
    """``comoe.training.loop`` -> ``training``; top-level modules of the method -> ``core``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # comoe/__init__.py
    head = parts[1]
    if head in CORE_MODULES:
        return "core"
    if head == "__main__":
        return "cli"
    assert head in LAYERS, f"{module}: not in any layer; add it to LAYERS or CORE_MODULES in {__file__}"
    return head


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def comoe_imports(path: Path) -> set[str]:
    """Every ``comoe…`` module the file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "comoe"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "comoe":
            found.add(node.module)
            found |= {
                f"{node.module}.{alias.name}"
                for alias in node.names
                if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/"))
                .with_suffix(".py")
                .exists()
                or (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).is_dir()
            }
    return found


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for target in comoe_imports(path):
            if target == "comoe" and layer_of(here) != "core":
                continue  # the public API, from any layer
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(here)):
                upward.append(f"{here} ({layer_of(here)}) imports {target} ({layer_of(target)})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_layers_cover_every_module():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))  # asserts


@pytest.mark.slow
def test_importing_the_library_imports_no_tooling():
    """`import comoe` in a fresh interpreter: the method and its PEFT registration, nothing else of ours,
    and none of the tooling's third-party packages."""
    code = (
        "import sys, json, comoe; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('comoe', 'datasets', 'matplotlib', "
        "'sklearn', 'rich', 'trl')))))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    ours = {m for m in loaded if m.split(".")[0] == "comoe"}
    assert {layer_of(m) for m in ours} <= {"core", "utils"}, sorted(ours)
    assert "comoe.tuner" in ours  # importing comoe registers the PEFT method
    assert not [m for m in loaded if m.split(".")[0] != "comoe"], loaded


MAX_LINES = 400


def test_no_module_is_over_400_lines():
    """One job per module: every source module fits in MAX_LINES lines (the built-in tasks are JSONL)."""
    over = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    over = {name: lines for name, lines in over.items() if lines > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines; split each into modules with one job: {over}"


def test_argparse_lives_in_the_cli_only():
    users = [
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if layer_of(module_name(p)) != "cli"
        and "argparse"
        in {
            alias.name
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Import)
            for alias in node.names
        }
    ]
    assert not users, users


@pytest.mark.slow
def test_python_dash_m_comoe_is_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "comoe", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: comoe train" in out.stdout


def test_every_command_that_writes_takes_output_dir():
    from comoe.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--output-dir", "d"]).output_dir == "d"
    assert parser.parse_args(["analyze", "r", "--output-dir", "d"]).out == "d"
    assert parser.parse_args(["compare", "--output-dir", "d"]).out == "d"
    assert parser.parse_args(["bench", "--output-dir", "d"]).out == "d"
    assert parser.parse_args(["predict", "r", "--input", "i", "--output-dir", "d"]).output_dir == "d"
    assert parser.parse_args(["compare", "--out", "d"]).out == "d"  # the old spelling still works


def test_the_tests_tree_mirrors_the_package():
    """Every folder of tests/ (fixtures aside) is a subpackage of src/comoe/, and tooling tests live in
    their subpackage's folder: ``tests/training/test_train.py`` tests ``comoe.training``."""
    tests_dir = Path(__file__).parent
    folders = {p.name for p in tests_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders - {"fixtures"} <= subpackages, folders - {"fixtures"} - subpackages
