"""The architecture's one-way rules, checked on the source: the run loop and the run's wiring
know no method, and the engine knows no mask."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fedmask_jax"
METHOD_MODULES = {"fedmask_jax.algorithms.fedpm", "fedmask_jax.algorithms.fedpm_host",
                  "fedmask_jax.algorithms.masks",
                  *(f"fedmask_jax.algorithms.masks.{p.stem}" for p in (PACKAGE / "algorithms" / "masks").glob("[!_]*.py")),
                  "fedmask_jax.algorithms.fedavg", "fedmask_jax.algorithms.compressors",
                  "fedmask_jax.algorithms.aggregations",
                  "fedmask_jax.algorithms.registry", "fedmask_jax.masking", "fedmask_jax.coding"}


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("module", ["loop.py", "simulation.py", "sinks.py", "history.py", "checkpoints.py",
                                    *sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / "engine").glob("*.py"))])
def test_run_layer_and_engine_import_no_method(module):
    assert not _imports(PACKAGE / module) & METHOD_MODULES


def test_the_loop_names_no_method():
    source = (PACKAGE / "loop.py").read_text().lower().replace("fedmask_jax", "")
    for word in ("fedpm", "fedmask", "mask", "fedavg", "theta"):
        assert word not in source, word


@pytest.mark.parametrize("path", ["fedmask_jax/sinks.py", "fedmask_jax/plots.py", "fedmask_jax/comparison.py",
                                  "experiments/sweep.py", "experiments/select_tuned.py"])
def test_sinks_plots_and_tables_name_no_methods_field(path):
    # what a method shows beyond every run's fields they read from its MethodSpec.shows
    source = (PACKAGE.parent / path).read_text().lower()
    for word in ("thresholded", "coded_prior", "coded_global", "mask_density", "verified_clients", "theta", "θ"):
        assert word not in source, word
