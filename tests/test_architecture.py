"""The package's shape: no import cycle, no module reaching into another's private names, layers pointing one way.

The static import graph is read from the source with ``ast`` (every import, module level or inside a function), so a
lazy import counts as much as a top-level one. The only upward edges allowed are the ``to_html`` thin calls of the
result types into ``report/`` (listed in ``ALLOWED_UPWARD``, the same as ``ignore_imports`` in pyproject.toml).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diffaudit"

#: the layers of docs/architecture.md, top to bottom; a module may import its own layer or any layer below
LAYERS = [
    ["cli", "watch", "integrations", "demo", "testing", "__main__"],
    ["report"],
    ["audit", "monitor", "curate", "membership", "loo", "reference", "training", "compare", "prompts"],
    ["onset"],
    ["metrics"],
    ["embedders", "index", "cache", "distributed"],
    ["data", "checkpoints", "sampling"],
    ["results", "_serial", "_util", "_format", "_progress"],
]
ALLOWED_UPWARD = {("diffaudit.results", f"diffaudit.report{m}") for m in ("", ".gallery", ".loo", ".compare")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph():
    """{module: {(imported module, imported names)}} for every module of the package."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[tuple[str, tuple[str, ...]]]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("diffaudit"):
                    continue
                names = tuple(a.name for a in node.names)
                # "from . import gallery" imports a submodule
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
                for s in subs:
                    edges[mod].add((s, ()))
                if len(subs) < len(names):
                    edges[mod].add((target, tuple(n for n in names if f"{target}.{n}" not in mods)))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("diffaudit"):
                        edges[mod].add((a.name, ()))
    return mods, edges


def _layer(mod: str) -> int:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{mod}: not in any layer of docs/architecture.md (add it there and to LAYERS)")


def test_no_private_names_across_modules():
    _, edges = _graph()
    bad = []
    for mod, targets in edges.items():
        for target, names in targets:
            if target == mod or target.startswith(mod + "."):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{mod} imports {n} from {target}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    mods, edges = _graph()
    graph = {m: {t for t, _ in ts if t in mods and t != m and (m, t) not in ALLOWED_UPWARD} for m, ts in edges.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    mods, edges = _graph()
    bad = []
    for mod, targets in edges.items():
        if mod == "diffaudit":
            continue  # the package's lazy public API names every layer
        for target, _ in targets:
            if target == "diffaudit" or (mod, target) in ALLOWED_UPWARD:
                continue
            if _layer(target) < _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {target} (layer {_layer(target)})")
    assert not bad, "\n".join(sorted(bad))


def test_import_linter_contract_matches():
    """pyproject.toml's import-linter contract lists the same layers (so `lint-imports` in CI enforces this too)."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (contract,) = [c for c in cfg["contracts"] if c["type"] == "layers"]
    got = [sorted(x.strip() for x in layer.split(":")) for layer in contract["layers"]]
    want = [sorted(f"diffaudit.{n}" for n in names if n != "__main__") for names in LAYERS]
    assert got == want


def test_product_carries_no_process_notes():
    """The package and README cite papers, not the project's own planning documents or issue numbers."""
    import re

    texts = {p: p.read_text(encoding="utf-8") for p in [*PKG.rglob("*.py"), *PKG.rglob("*.j2"), ROOT / "README.md",
                                                       *(ROOT / "docs").rglob("*.md")]}
    pat = re.compile(r"DESIGN\.md|shared/seeds|\.\./shared|\bissue #?\d+\b", re.I)
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p, t in texts.items() for m in pat.finditer(t)]
    assert not bad, "\n".join(bad)
