"""Imports point down the layers, and no module imports itself back through others.

Every `.py` under src/mergeguard is parsed (not imported) and every import of a mergeguard module is
collected: top-level and inside functions, `import x`, `from x import y`, relative `from . import y`.
`from mergeguard.merge import X` is an import of `mergeguard.merge` (its `__init__`), unless X is a
submodule (`from mergeguard.merge import engine` imports `mergeguard.merge.engine`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

# The layers, top to bottom: a module may import its own layer's modules or any lower layer's.
# docs/architecture.md draws the same map; change both together.
LAYERS: dict[str, int] = {
    "mergeguard.cli": 7,
    "mergeguard.__main__": 7,
    "mergeguard.workflows": 6,
    "mergeguard.defend": 5,
    "mergeguard.attack": 4,
    "mergeguard.scan": 4,
    "mergeguard.eval": 3,
    "mergeguard.datamerge": 3,
    "mergeguard.models": 2,
    "mergeguard.data": 2,
    "mergeguard.trainer": 2,
    "mergeguard.merge": 1,
    "mergeguard.taskvec": 1,
    "mergeguard.checkpoint": 0,
    "mergeguard.errors": -1,
    "mergeguard.progress": -1,
    "mergeguard.cache": -1,
    "mergeguard.settings": -1,
    "mergeguard.yamlfile": -1,
    "mergeguard.lazy": -1,
    "mergeguard": -1,  # the package __init__ only (it holds __version__)
}
# Within one layer, these directions are refused too: merge builds on task vectors, not the reverse.
FORBIDDEN_WITHIN: list[tuple[str, str]] = [("mergeguard.taskvec", "mergeguard.merge")]

# Violations in files still being fixed elsewhere: (importer, imported) module pairs for imports that
# point the wrong way, ("cycle", *its modules, sorted) for an import cycle. To be emptied; an entry that
# is no longer found fails too, so the list never outlives its violation.
KNOWN_VIOLATIONS: list[tuple[str, ...]] = []

SRC = Path(__file__).resolve().parents[1] / "src" / "mergeguard"


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    where: str  # path:line


def module_name(path: Path, root: Path) -> str:
    """`root/merge/engine.py` -> `mergeguard.merge.engine`; a package's `__init__.py` is the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def within(module: str, prefix: str) -> bool:
    """`module` is `prefix` or lies inside it (`mergeguard.merge.engine` is within `mergeguard.merge`)."""
    return module == prefix or module.startswith(prefix + ".")


def collect_imports(root: Path) -> tuple[set[str], list[Import]]:
    """Every module under `root` (a package folder) and every import among them."""
    package = root.name
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    found: list[Import] = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if within(target, package) and target != name:
                    found.append(Import(name, target, f"{path.relative_to(root.parent)}:{node.lineno}"))
    return modules, found


def layer_of(module: str, layers: dict[str, int] = LAYERS) -> int | None:
    """The layer of the longest table entry that is `module` or a package holding it."""
    best = None
    for prefix in layers:
        if within(module, prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best == "mergeguard" and module != "mergeguard":
        return None  # the package entry stands for its __init__ only: a new top-level module needs its own
    return layers[best] if best is not None else None


def wrong_way(imports: list[Import], layers: dict[str, int] = LAYERS,
              forbidden: list[tuple[str, str]] = FORBIDDEN_WITHIN) -> list[Import]:
    """Imports that point up the layers, or one of the refused directions within a layer."""
    bad = []
    for imp in imports:
        src, dst = layer_of(imp.importer, layers), layer_of(imp.imported, layers)
        if src is None or dst is None or dst > src or any(
                within(imp.importer, a) and within(imp.imported, b) for a, b in forbidden):
            bad.append(imp)
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.imported)
        graph.setdefault(imp.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def violations(root: Path) -> dict[tuple[str, ...], str]:
    """Every violation under `root`, keyed as KNOWN_VIOLATIONS keys them, with a readable line."""
    modules, imports = collect_imports(root)
    out: dict[tuple[str, ...], str] = {}
    for module in sorted(modules):
        if layer_of(module) is None:
            out[(module,)] = f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    for imp in wrong_way(imports):
        src, dst = layer_of(imp.importer), layer_of(imp.imported)
        out.setdefault((imp.importer, imp.imported), f"{imp.importer} (layer {src}) imports {imp.imported} "
                                                     f"(layer {dst}) at {imp.where}")
    for component in cycles(imports):
        inside = dict.fromkeys(f"{i.importer} -> {i.imported} ({i.where})" for i in imports
                               if i.importer in component and i.imported in component)
        out[("cycle", *component)] = "import cycle: " + "; ".join(inside)
    return out


def test_imports_point_down_and_form_no_cycle():
    assert (SRC / "__init__.py").exists(), SRC
    found = violations(SRC)
    known = {tuple(k) for k in KNOWN_VIOLATIONS}
    new = [line for key, line in found.items() if key not in known]
    assert not new, "\n".join(new)
    stale = sorted(known - set(found))
    assert not stale, f"fixed, remove from KNOWN_VIOLATIONS: {stale}"


def test_the_real_tree_has_imports_to_check():
    modules, imports = collect_imports(SRC)
    assert {"mergeguard", "mergeguard.merge", "mergeguard.merge.engine", "mergeguard.taskvec"} <= modules
    edges = {(i.importer, i.imported) for i in imports}
    assert ("mergeguard.merge.engine", "mergeguard.taskvec") in edges  # merge builds on task vectors
    # a package __init__ and its submodule (the engine itself is a lazy export, `lazy.lazy_exports`: those import
    # only `package.<module>`, inside their own package, so they cannot point up a layer)
    assert ("mergeguard.merge", "mergeguard.merge.registry") in edges


# -- the checker itself, on small fake packages -------------------------------------
def fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package folder named `mergeguard` (so LAYERS applies) holding `files` (path -> source)."""
    root = tmp_path / "mergeguard"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            (root / parent / "__init__.py").touch()
        path.write_text(text)
    return root


def test_an_upward_import_is_found_even_inside_a_function(tmp_path):
    root = fake_package(tmp_path, {
        "checkpoint/reader.py": "def f():\n    from mergeguard.merge.engine import merge_checkpoints\n",
        "merge/engine.py": "from mergeguard.taskvec import delta_of\nmerge_checkpoints = None\n",  # allowed
        "taskvec.py": "import mergeguard.merge\n",  # the same layer, but the refused direction
        "models/zoo.py": "from mergeguard import eval\n",  # `from PACKAGE import SUBMODULE`: the submodule
        "models/heads.py": "",
        "eval.py": "from .models import heads\n",  # relative, pointing down: fine
        "newmodule.py": "",  # in no layer
    })
    found = violations(root)
    assert set(found) == {("mergeguard.checkpoint.reader", "mergeguard.merge.engine"),
                          ("mergeguard.taskvec", "mergeguard.merge"),
                          ("mergeguard.models.zoo", "mergeguard.eval"),
                          ("mergeguard.newmodule",)}
    assert "reader.py:2" in found["mergeguard.checkpoint.reader", "mergeguard.merge.engine"]
    _, imports = collect_imports(root)
    assert ("mergeguard.eval", "mergeguard.models.heads") in {(i.importer, i.imported) for i in imports}


def test_a_cycle_is_found(tmp_path):
    root = fake_package(tmp_path, {
        "merge/__init__.py": "from mergeguard.merge.engine import merge\n",
        "merge/engine.py": "from mergeguard.merge.registry import get\ndef merge(): pass\n",
        "merge/registry.py": "def get():\n    from . import methods\n",
        "merge/methods.py": "from .registry import get\n",
    })
    _, imports = collect_imports(root)
    assert cycles(imports) == [["mergeguard.merge.methods", "mergeguard.merge.registry"]]
    assert list(violations(root)) == [("cycle", "mergeguard.merge.methods", "mergeguard.merge.registry")]


@pytest.mark.parametrize(("statement", "cyclic"), [
    ("from mergeguard.merge import methods", False),  # the submodule: no cycle through the __init__
    ("from mergeguard.merge import METHODS", True),  # the package __init__, which imports this module
])
def test_from_a_package_import_resolves_to_the_submodule_or_the_init(tmp_path, statement, cyclic):
    root = fake_package(tmp_path, {
        "merge/__init__.py": "from mergeguard.merge.registry import METHODS\n",
        "merge/registry.py": statement + "\n",
        "merge/methods.py": "",
    })
    _, imports = collect_imports(root)
    assert bool(cycles(imports)) is cyclic
    assert (layer_of("mergeguard.merge.registry"), layer_of("mergeguard"), layer_of("mergeguard.newmodule")) == (
        1, -1, None)
