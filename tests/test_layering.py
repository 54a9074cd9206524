"""Data flows one way through the package's stages: config → weights → model → engine → library, CLI and server.
Checked on the import statements of every module (no module is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qwen_engine"


def imported_modules(path: Path) -> set[str]:
    """Absolute names (qwen_engine.…) of the package modules a file imports, at any depth of the file."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("qwen_engine")}


def files_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else [PACKAGE / "checkpoint.py"]


RULES = [
    ("engine", ("qwen_engine.llm", "qwen_engine.server", "qwen_engine.cli")),
    ("model", ("qwen_engine.engine", "qwen_engine.llm", "qwen_engine.server", "qwen_engine.cli")),
    ("", ("qwen_engine.engine", "qwen_engine.llm", "qwen_engine.server", "qwen_engine.cli")),  # checkpoint.py
]


@pytest.mark.parametrize(("folder", "forbidden"), RULES, ids=["engine", "model", "checkpoint"])
def test_no_stage_imports_a_later_one(folder: str, forbidden: tuple[str, ...]) -> None:
    files = files_under(folder)
    assert files
    wrong = {f"{path.relative_to(PACKAGE)} imports {name}" for path in files for name in imported_modules(path)
             if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)}
    assert not wrong


def test_the_checker_sees_relative_imports() -> None:
    """The rule would pass vacuously if relative imports were misread: llm.py's own imports must be found."""
    assert {"qwen_engine.engine.serving", "qwen_engine.model.decoder"} <= imported_modules(PACKAGE / "llm.py")
    assert "qwen_engine.model.decoder" in imported_modules(PACKAGE / "engine" / "runner.py")
