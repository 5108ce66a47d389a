"""The layering, as the imports show it (issue 14).

The core (``ivshmem_virtio`` without its layer subpackages) imports nothing above it; the backend
and the frontend never import each other; the benchmarks sit above both; the application layer
(``ivshmem_virtio.app``: the command line and the demos) above everything, and nothing imports
it. The layers above the core live in the project's namespace (``ivshmem_virtio.backend`` and so
on, links to the top-level folders): nothing imports them under bare top-level names, which would
load a second copy of every module (and collide with other packages in site-packages). No two
modules of the core import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "ivshmem_virtio"
LAYERS = ("backend", "frontend", "benchmarks", "app")
# what each layer may import of the others (the core is always allowed)
ALLOWED = {"core": set(), "backend": set(), "frontend": set(),
           "benchmarks": {"backend", "frontend"}, "app": {"backend", "frontend", "benchmarks"}}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (the layer links followed)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = ["ivshmem_virtio", *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    for layer in ("backend", "frontend", "benchmarks"):  # rglob does not follow the links
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT / layer).with_suffix("")
            parts = ["ivshmem_virtio", layer, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def _imports(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports, anywhere in it (lazy imports count), resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # submodules by name
    return out


def test_each_layer_imports_only_what_lies_below_it():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        own = _layer(mod)
        for imp in _imports(mod, path):
            top = imp.split(".")[0]
            if top in ("backend", "frontend", "benchmarks"):
                bad.append(f"{mod} imports {imp} by its bare top-level name")
                continue
            if not imp.startswith("ivshmem_virtio.") or imp not in mods:
                continue
            other = _layer(imp)
            if other not in ("core", own) and other not in ALLOWED[own]:
                bad.append(f"{mod} ({own}) imports {imp} ({other})")
    assert not bad, "\n".join(bad)


def test_no_two_core_modules_import_each_other():
    mods = _modules()
    core = {m: p for m, p in mods.items() if _layer(m) == "core"}
    deps = {m: {i for i in _imports(m, p) if i in core and i != m} for m, p in core.items()}
    cycles = sorted({tuple(sorted((a, b))) for a in deps for b in deps[a]
                     if a in deps.get(b, set()) and not a.startswith(b + ".")
                     and not b.startswith(a + ".")})
    assert not cycles, cycles


def test_the_layers_live_in_the_namespace():
    for layer in ("backend", "frontend", "benchmarks"):
        link = PKG / layer
        assert link.is_symlink() and link.resolve() == (ROOT / layer).resolve(), link
