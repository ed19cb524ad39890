"""The import floors of the project: ``envs`` < ``metarl`` < ``agents``, and the study scripts
of ``experiments/`` above them all (the library never imports them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level packages of this project it must not import
FORBIDDEN = {
    "envs": ("metarl", "agents", "experiments"),
    "metarl": ("agents", "experiments"),
    "agents": ("experiments",),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_imports_only_downwards(package):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in _imports(path)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert bad == []


def test_metarl_list_loads_no_study_script():
    code = (
        "import contextlib, io, sys\n"
        "from metarl.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['list', 'agents']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'experiments'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bench_outside_a_checkout_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from metarl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "adapt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "experiments/bench/adapt.py" in err and "repository root" in err


def _defines_agent(path: Path) -> bool:
    """Whether a module defines a class with a ``Config`` attribute (an agent)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                targets = item.targets if isinstance(item, ast.Assign) else []
                if any(isinstance(t, ast.Name) and t.id == "Config" for t in targets):
                    return True
    return False


def test_no_agent_imports_another_agent():
    agents = {p.stem for p in (ROOT / "agents").glob("*.py") if _defines_agent(p)}
    assert {"maml_trpo", "maml_ppo", "meta_imitation", "pearl", "rl2"} <= agents
    bad = [
        f"agents/{path.name}:{line} imports {name}"
        for path in sorted((ROOT / "agents").glob("*.py"))
        for line, name in _imports(path)
        if name.startswith("agents.") and name.split(".")[1] in agents and name.split(".")[1] != path.stem
    ]
    assert bad == []


def _module_level_imports(path: Path) -> set[str]:
    """Project modules imported at module level (``if TYPE_CHECKING:`` blocks included)."""
    found: set[str] = set()
    nodes = list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If):
            nodes += node.body + node.orelse
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_import_cycle():
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in FORBIDDEN
        for path in (ROOT / package).rglob("*.py")
    }
    graph = {name: _module_level_imports(path) & set(modules) - {name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            if not name.startswith(other + "."):  # a module importing its own package is no cycle
                visit(other, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
