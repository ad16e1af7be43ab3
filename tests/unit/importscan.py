"""What a Python source imports, for the tests that keep layers apart (sans-IO core,
no workers/ inside cluster/)."""

from __future__ import annotations

import ast


def absolute_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``source``, at any depth (relative
    imports stay inside their package and are left out)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found
