"""The house plan holds (docs/architecture.md): the arrows between rooms point down and no two modules import
each other at load time. Read from the source, so a new circle or a wrong-way import fails here, not in a user's
worker process."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("trainer", "storage", "bot", "cogs")
# Which of our rooms each room may import (design.md: cogs -> bot -> storage, bot -> trainer's torch-free parts).
ALLOWED = {
    "trainer": {"trainer"},
    "storage": {"storage", "trainer"},
    "bot": {"bot", "storage", "trainer"},
    "cogs": {"cogs", "bot", "storage", "trainer"},
}
# What of the engine the bot side may import at load time: the torch-free parts.
TORCH_FREE = ("trainer.spec", "trainer.events", "trainer.atomic", "trainer.format.header", "trainer.format.checkpoint",
              "trainer.plan", "trainer.models.refs", "trainer.kohya_import",
              "trainer.kohya_read", "trainer.toy.recipe")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for room in ROOMS for p in (ROOT / room).rglob("*.py")}


def _load_time_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports when it is loaded: top-level statements only (imports inside functions run
    later, and ``if TYPE_CHECKING:`` blocks never run)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                # the longest known module that the dotted name starts with
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)

    visit(tree.body)
    return found


GRAPH = {name: _load_time_imports(path, name, set(_modules())) for name, path in _modules().items()}


def test_no_import_circle() -> None:
    # A package imports its own __init__ chain implicitly; only edges between distinct modules count.
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if m.startswith(n + "."):  # importing a parent package: its __init__ is loaded first anyway
                continue
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            walk(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("room", ROOMS)
def test_arrows_point_down(room: str) -> None:
    wrong = sorted(
        f"{m} imports {n}"
        for m, deps in GRAPH.items()
        if m.split(".")[0] == room
        for n in deps
        if n.split(".")[0] not in ALLOWED[room]
        or (room != "trainer" and n.split(".")[0] == "trainer" and not n.startswith(TORCH_FREE) and n != "trainer")
    )
    assert not wrong, "\n".join(wrong)


def test_the_torch_free_modules_load_without_torch() -> None:
    """What the bot imports of the engine really is torch-free (a fresh interpreter imports the list)."""
    code = ("import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, *TORCH_FREE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_graph_sees_imports() -> None:
    # guard against a parser that finds nothing (which would make the tests above pass vacuously)
    assert "trainer.spec" in GRAPH["storage.repo"] or any(d.startswith("trainer.") for d in GRAPH["bot.service"])
    assert any(d.startswith("trainer.format") for d in GRAPH["trainer.format.kohya"] | GRAPH["trainer.models.load"])
