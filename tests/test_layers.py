"""The shape of the package (docs/DESIGN.md, "Layers"): lower layers never import higher
ones, and code above comm/ asks a communicator's declared capabilities instead of
comparing backend names or probing for attributes."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "forge_dist"
LAYER = {
    "errors": 1,
    "_launch": 1,
    "_urls": 1,
    "_units": 1,
    "_background": 1,
    "policy": 2,
    "storage": 3,
    "preemption": 3,
    "comm": 4,
    "keras": 5,
    "demo": 5,
    "cli": 6,
}


def modules() -> list[pathlib.Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def layer_of(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "forge_dist" or len(parts) == 1:
        return None  # the top package (version, get_communicator) is below everything
    return LAYER.get(parts[1])


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_a_higher_layer(path):
    own = layer_of("forge_dist." + ".".join(path.relative_to(PKG).with_suffix("").parts))
    if own is None:
        return
    tree = ast.parse(path.read_text())
    upward = [f"line {n}: {m}" for n, m in imported(tree) if (lay := layer_of(m)) and lay > own]
    assert not upward, f"{path.name} (layer {own}) imports upward: {upward}"


def test_every_module_has_a_layer():
    top = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in modules()}
    assert top - {"__init__", "__main__"} <= set(LAYER)


@pytest.mark.parametrize(
    "path",
    [p for p in modules() if p.relative_to(PKG).parts[0] not in ("comm",)],
    ids=lambda p: str(p.relative_to(PKG)),
)
def test_capabilities_are_asked_not_probed(path):
    """No ``comm.backend == "tf"`` and no ``getattr(comm, "...", default)`` outside comm/."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "backend" for s in sides):
                bad.append(f"line {node.lineno}: compares .backend")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Name | ast.Attribute)
            and "comm" in ast.unparse(node.args[0])
        ):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not bad, bad
