"""The import rules of docs/architecture.md, checked on the source (ast), and DVC's code deps.

- layers: stages -> model -> pipeline; nothing imports upward, and model takes only
  pipeline/atomic.py from below;
- no stage module (a `beit` command) imports another one;
- no name starting with "_" is imported from another project file;
- the config schema loads without torch (`beit report --help`, `beit shard --help` too);
- each DVC stage lists as code deps exactly the project files its command imports,
  transitively (lazy imports inside functions count: they run when the stage runs).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"pipeline": 0, "model": 1, "stages": 2}
SOURCES = sorted(p for pkg in LAYERS for p in (REPO / pkg).glob("*.py") if p.name != "__init__.py")


def module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    return None


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every project import in the file, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] in LAYERS]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in LAYERS:
                names = [a.name for a in node.names]
                # `from pipeline import atomic` imports a module, not a name
                submodules = [n for n in names if module_file(f"{node.module}.{n}")]
                out.append((node.module, [n for n in names if n not in submodules]))
                out += [(f"{node.module}.{n}", []) for n in submodules]
    return out


def closure(path: Path) -> set[Path]:
    seen, todo = set(), [path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for mod, _ in imports_of(p):
            f = module_file(mod)
            if f is not None:
                todo.append(f)
    return seen


def rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def test_layers_only_import_downward():
    bad = []
    for path in SOURCES:
        layer = LAYERS[path.parent.name]
        for mod, _ in imports_of(path):
            if LAYERS[mod.split(".")[0]] > layer:
                bad.append(f"{rel(path)} imports {mod}")
    assert not bad, bad


def test_model_uses_only_the_atomic_helper_from_pipeline():
    """Networks do not depend on the data plane; they share its one way of publishing files."""
    bad = [f"{rel(path)} imports {mod}" for path in SOURCES if path.parent.name == "model"
           for mod, _ in imports_of(path) if mod.startswith("pipeline") and mod != "pipeline.atomic"]
    assert not bad, bad


def test_no_stage_imports_another_stage():
    stage_modules = {target.split(":")[0] for target in COMMANDS.values()}
    bad = []
    for mod in stage_modules:
        for imported, _ in imports_of(module_file(mod)):
            if imported in stage_modules and imported != mod:
                bad.append(f"{mod} imports {imported}")
    assert not bad, bad


def test_no_private_name_crosses_files():
    bad = [f"{rel(path)}: from {mod} import {n}" for path in SOURCES + sorted((REPO / "tests").glob("*.py"))
           for mod, names in imports_of(path) for n in names if n.startswith("_")]
    assert not bad, bad


@pytest.mark.parametrize("code", [
    "import stages.config; stages.config.load_params('params.yaml')",
    "from stages.cli import main; main(['report', '--help'], standalone_mode=False)",
    "from stages.cli import main; main(['shard', '--help'], standalone_mode=False)",
    "from stages.cli import main; main(['fetch-data', '--help'], standalone_mode=False)",
])
def test_light_commands_leave_torch_unimported(code):
    check = f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'"
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_dvc_code_deps_are_exactly_the_imports(name):
    stage = dvc_stages()[name]
    body = stage.get("do", stage)
    command = body["cmd"].split()[1]
    assert body["cmd"].split()[0] == "beit" and command in COMMANDS, body["cmd"]
    entry = module_file(COMMANDS[command].split(":")[0])
    want = sorted(rel(p) for p in closure(entry))
    have = sorted(d for d in body["deps"] if str(d).endswith(".py"))
    assert have == want, f"dvc.yaml stage {name}: code deps should be {want}"


def fix_dvc_yaml() -> None:
    """Rewrite the *.py deps of every stage in dvc.yaml to what its command imports
    (comments and everything else kept): `python tests/test_layers.py --fix`."""
    stages = dvc_stages()
    lines, out, stage, indent = (REPO / "dvc.yaml").read_text().splitlines(), [], None, None
    for line in lines:
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage = stripped[:-1]
        if stripped == "deps:":
            indent = len(line) - len(line.lstrip()) + 2
            out.append(line)
            body = stages[stage].get("do", stages[stage])
            entry = module_file(COMMANDS[body["cmd"].split()[1]].split(":")[0])
            code = [" " * indent + f"- {rel(p)}" for p in sorted(closure(entry), key=rel)]
            continue
        if indent is not None:
            if stripped.startswith("- ") and (len(line) - len(line.lstrip())) == indent:
                if not stripped.endswith(".py"):
                    out.append(line)
                continue
            out.extend(code)
            indent = None
        out.append(line)
    (REPO / "dvc.yaml").write_text("\n".join(out) + "\n")


if __name__ == "__main__" and "--fix" in sys.argv:
    fix_dvc_yaml()
