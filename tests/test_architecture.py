"""The shape of the code, read from its source with ``ast`` (nothing is imported).

An import inside a function still counts: it only hides a circle until someone moves it, and
a circle makes the import order (and so which module half-exists when) matter.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules(package: str) -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package's ``__init__``)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(path: pathlib.Path, module: str, is_package: bool):
    """(source module, names, node) for every import in the file, relative ones resolved."""
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            yield source, [alias.name for alias in node.names], node


def _import_graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)

    def known(name):  # the module a dotted name lives in (``a.b.f`` -> ``a.b``)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, is_package) in modules.items():
        targets = set()
        for source, names, _ in _imports(path, module, is_package):
            # ``from pkg import mod`` imports the module ``pkg.mod``; ``from mod import f``, ``mod``
            for target in [known(f"{source}.{n}") for n in names] or [known(source)]:
                target = target or known(source)
                if target and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = {"a": {"b"}, "b": set()}
    assert _find_cycle(graph) is None
    graph["b"].add("a")
    assert _find_cycle(graph) == ["a", "b", "a"]
    real = _import_graph("fedmask_jax")
    # ``from pkg import mod`` is an edge to ``pkg.mod``, not to ``pkg``
    assert "fedmask_jax.algorithms.fedpm_host" in real["fedmask_jax.algorithms.fedpm"]
    assert "fedmask_jax.models" in real["fedmask_jax.export"]


def test_no_import_circle_in_the_package():
    cycle = _find_cycle(_import_graph("fedmask_jax"))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_experiments_use_only_public_names():
    """``experiments/`` is a client of the package (and of its own modules): it reaches
    nothing named ``_x``, by ``from m import _x``, ``import m._x`` or ``m._x``."""
    ours = ("fedmask_jax", "experiments")
    offenders = []
    for module, (path, is_package) in _modules("experiments").items():
        bound = set()  # local names bound to one of our modules (or names in them)
        for source, names, node in _imports(path, module, is_package):
            if not source.startswith(ours):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for alias in node.names:
                if isinstance(node, ast.ImportFrom) and _private(alias.name):
                    offenders.append(f"{where} from {source} import {alias.name}")
                if isinstance(node, ast.Import) and any(map(_private, alias.name.split("."))):
                    offenders.append(f"{where} import {alias.name}")
                bound.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and _private(node.attr)):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offenders, "private names used from experiments/:\n" + "\n".join(offenders)


def test_the_exit_code_table_is_the_constants():
    from experiments import exit_codes

    constants = {n: v for n, v in vars(exit_codes).items() if n.isupper()}
    rows = {}
    for line in exit_codes.__doc__.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            rows[parts[1]] = int(parts[0])
    assert rows == constants
    assert len(set(constants.values())) == len(constants)
