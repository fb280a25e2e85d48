"""Imports flow one way: no import circle among the package's modules, and no layer imports one above it.

Read statically from every import statement, function-level ones and ``TYPE_CHECKING`` blocks included
(an import placed inside a function to dodge a circle is still a circle).
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vitadapter"

# lowest first: a module may import modules of its own layer or of lower ones, never of a higher one
LAYERS = [
    ("vitadapter._meta", "vitadapter._json", "vitadapter.weights", "vitadapter.kernels", "vitadapter.data",
     "vitadapter.layers", "vitadapter.predict", "vitadapter.metrics", "vitadapter.visualize"),
    ("vitadapter.trunks", "vitadapter.heads", "vitadapter.detection"),
    ("vitadapter.converters",),
    ("vitadapter.models",),
    ("vitadapter", "vitadapter.hub", "vitadapter._factory", "vitadapter.upstream", "vitadapter.memory_check",
     "vitadapter.train", "vitadapter.catalog", "vitadapter.integrations"),
    ("vitadapter.cli", "vitadapter.__main__"),
]


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a folder named like the package)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its text."""
    files = module_files(package)
    top = package.name
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == top)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != top:
                    continue
                for alias in node.names:
                    # "from pkg import sub" imports the submodule; "from pkg import name" the package
                    targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the longest entry that is ``module`` or a package above it."""
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for entry in names:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best:
                best, rank = len(entry), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def test_no_module_imports_its_way_back_to_itself():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_layer_imports_a_higher_one():
    graph = import_graph(PACKAGE)
    upward = sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )
    assert upward == []


def test_the_checks_see_circles_and_upward_imports(tmp_path):
    # a package shaped like the real one, with the two defects these tests exist to catch
    root = tmp_path / "vitadapter"
    for folder in ("weights", "models"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "weights" / "fetch.py").write_text("def f():\n    from ..models import vit  # dodging the circle\n")
    (root / "models" / "vit.py").write_text("from ..weights.fetch import f\n")
    graph = import_graph(root)
    assert graph["vitadapter.weights.fetch"] == {"vitadapter.models.vit"}
    assert cycles(graph) == [["vitadapter.models.vit", "vitadapter.weights.fetch"]]
    assert layer_of("vitadapter.weights.fetch") < layer_of("vitadapter.models.vit")
