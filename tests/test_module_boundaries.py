"""One rule per idea, in one place: no lora_ref module reaches into another's private names."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lora_ref"
SOURCES = sorted(PKG.rglob("*.py"))


def _lora_ref_aliases(tree):
    """Names under which a module imports other lora_ref modules (from . import torch as lt, ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("lora_ref")):
            names |= {a.asname or a.name for a in node.names}
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_uses_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    aliases = _lora_ref_aliases(tree)
    private = [f"{node.value.id}.{node.attr} (line {node.lineno})" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
               and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")]
    imported = [f"{a.name} from {node.module} (line {node.lineno})" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("lora_ref"))
                for a in node.names if a.name.startswith("_") and a.name != "_checks"]
    assert not private and not imported, f"private names of other modules: {private + imported}"
