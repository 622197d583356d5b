"""The package's shape, checked: shared code is public, and stages import only downwards.

DESIGN.md "One spine": the bit-for-bit agreement between backends, the index and Ray hangs
on shared code, so shared code is public (no module imports another module's ``_private``
names); and the data flows one way (io -> search/store -> policy -> dedup -> encode ->
index -> distributed -> operator -> report -> cli), so no stage reaches up to a later one.
Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dedup_index"

#: Stage -> rank; a module may import stages of its own rank or lower.
RANKS = {
    "errors": 0,
    "files": 0,
    "lazy": 0,
    "validation": 0,
    "progress": 0,
    "io": 1,
    "search": 2,
    "store": 3,
    "policy": 3,
    "dedup": 4,
    "encode": 5,
    "index": 6,
    "verify": 6,  # candidate pairs -> verified pairs: images (io), pairs, policy, dedup
    "distributed": 7,
    "operator": 8,
    "report": 9,
    "testing": 9,
    "demo": 10,
    "service": 10,  # the HTTP query service: over the index, under the command line
    "cli": 11,
    "dedup_index": 12,  # the package root re-exports (lazily) from every stage
}
#: Upward imports that are the design, with the reason.
ALLOWED_UP = {
    # The backend registry lists "ray"; its search function lives with the Ray code and
    # is imported only when a Ray search runs.
    ("dedup_index.search.backends", "distributed"),
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), is_package, ast.parse(path.read_text(encoding="utf-8"))


def _imports(module: str, is_package: bool, tree: ast.AST):
    """``(target module, imported names)`` of every import of the package's own code."""
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("dedup_index"):
                target = node.module
            else:
                continue
            names = [a.name for a in node.names]
            if target == "dedup_index":  # `from .. import testing`: the submodules named
                subs = [
                    n for n in names if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").exists()
                ]
                for name in subs:
                    yield f"dedup_index.{name}", []
                names = [n for n in names if n not in subs and n != "__version__"]
                if not names:
                    continue
            yield target, names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dedup_index"):
                    yield alias.name, []


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_module_imports_a_private_name_of_another():
    found = []
    for module, is_package, tree in _modules():
        for target, names in _imports(module, is_package, tree):
            private_module = [p for p in target.split(".") if p.startswith("_")]
            private_names = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private_module or (private_names and target != module):
                found.append(f"{module} imports {target}: {private_names or private_module}")
    assert not found, "\n".join(found)


def test_stages_import_only_earlier_stages():
    found = []
    for module, is_package, tree in _modules():
        own = _stage(module)
        assert own in RANKS, f"{module}: stage {own!r} has no rank in tests/test_layout.py"
        for target, _ in _imports(module, is_package, tree):
            other = _stage(target)
            if RANKS[other] > RANKS[own] and (module, other) not in ALLOWED_UP:
                found.append(f"{module} ({own}) imports {target} ({other})")
    assert not found, "\n".join(found)
