"""The package's layering (docs/architecture.md): a module imports only its own layer or those below,
and no two modules import each other, directly or round a circle (lazy imports count; imports only
for type checkers do not)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "selfimprove"

#: bottom to top; a module belongs to the first prefix that matches its dotted name (without "selfimprove.")
LAYERS: list[tuple[str, ...]] = [
    ("errors", "provenance", "stats", "domain_table", "config", "config_checks", "rundir", "folders", "tracking",
     "runlog"),  # what every stage reads and records
    ("envs", "data", "model"),  # worlds and experts, episodes on disk, the network
    ("reward", "domains", "data.collect"),  # d(o, g) as reward and detector; the domain table
    ("train", "fleet", "evaluate"),  # the two stages, the robots, true success
    ("diagnose", "report", "videos", "runstatus"),  # reading runs
    ("experiment", "pipeline"),  # running them (experiment: the grids, with their summary and report)
    ("cli", "cli_dataset", "config_reference", ""),  # the command line and the package's front
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    """The layer of the longest prefix in LAYERS that names ``module`` or a package holding it."""
    matches = [(len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or (prefix and module.startswith(prefix + "."))]
    if not matches:
        raise AssertionError(f"module {module!r} has no layer: add it to LAYERS in tests/test_layers.py")
    return max(matches)[1]


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports at run time (at the top or inside functions)."""
    found = set()
    for node in _runtime_nodes(ast.parse(MODULES[module].read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "selfimprove" or name.startswith("selfimprove."):
                local = name[len("selfimprove."):] if name != "selfimprove" else ""
                if local in MODULES and local != module:
                    found.add(local)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_imports_only_its_layer_or_below():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m in sorted(GRAPH) for t in sorted(GRAPH[m]) if layer_of(t) > layer_of(m)]
    assert upward == []


@pytest.mark.parametrize("lower", ["envs", "data", "model"])
def test_lower_layers_never_import_the_stages_or_the_front(lower):
    upper = ("train", "fleet", "experiment", "report", "cli", "pipeline", "diagnose")
    bad = [f"{m} -> {t}" for m in GRAPH if m.split(".")[0] == lower and m != "data.collect"
           for t in GRAPH[m] if t.split(".")[0] in upper]
    assert bad == []


def test_no_import_circles():
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert circles == []


def test_every_package_ships_in_the_wheel():
    """pyproject.toml names the packages explicitly: a new folder left out would be missing from a built wheel."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"selfimprove" + ("." + ".".join(p.parent.relative_to(PACKAGE).parts) if p.parent != PACKAGE else "")
               for p in PACKAGE.rglob("__init__.py")}
    assert folders - listed == set()


def test_the_config_names_every_trunk_the_model_has():
    from selfimprove.config_checks import ENCODER_NAMES
    from selfimprove.model.policy import ENCODERS

    assert set(ENCODER_NAMES) == set(ENCODERS)


def test_the_config_names_every_action_decoder_the_model_has():
    from selfimprove.config_checks import DECODER_NAMES
    from selfimprove.model.decoders import DECODERS

    assert set(DECODER_NAMES) == set(DECODERS)
