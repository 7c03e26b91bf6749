"""The architecture holds: imports only go down the layers, and no module imports itself back through others.

Layers (top to bottom): ``cli`` -> ``eval`` -> ``guard`` -> ``detectors``, ``training`` -> ``core``. grimp reads
every import statement, the ones inside functions too, so a "lazy import to avoid a cycle" is still a cycle
(imports under ``if TYPE_CHECKING:`` are left out: they never run).
Run ``python tests/test_architecture.py [ROOT]`` to print the cycles and layer violations of a checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

PACKAGES = ("core", "detectors", "training", "guard", "eval", "cli")
LAYERS = ("cli", "eval", "guard", "detectors | training", "core")


def _graph(root: Path) -> grimp.ImportGraph:
    """The import graph of the project's packages under ``root``."""
    sys.path.insert(0, str(root))
    try:
        return grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)
    finally:
        sys.path.remove(str(root))


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The sets of modules that import each other in a circle (strongly connected components of size > 1)."""
    mods = sorted(graph.modules)
    index = {m: i for i, m in enumerate(mods)}
    rows, cols = [], []
    for m in mods:
        for dep in graph.find_modules_directly_imported_by(m):
            if dep in index and dep != m:
                rows.append(index[m])
                cols.append(index[dep])
    adj = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(mods), len(mods)))
    _, labels = connected_components(adj, directed=True, connection="strong")
    groups: dict[int, list[str]] = {}
    for m, lab in zip(mods, labels, strict=True):
        groups.setdefault(int(lab), []).append(m)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g))


def layer_violations(graph: grimp.ImportGraph) -> list[str]:
    """Imports that go up the layers (or across ``detectors`` and ``training``)."""
    layers = [tuple(x.strip() for x in layer.split("|")) for layer in LAYERS]
    rank = {pkg: i for i, group in enumerate(layers) for pkg in group}
    out = []
    for m in sorted(graph.modules):
        src = m.split(".")[0]
        for dep in sorted(graph.find_modules_directly_imported_by(m)):
            dst = dep.split(".")[0]
            if dst in rank and src in rank and dst != src and rank[dst] <= rank[src]:
                out.append(f"{m} -> {dep}")
    return out


def _project_graph() -> grimp.ImportGraph:
    return _graph(Path(__file__).resolve().parents[1])


def test_imports_only_go_down_the_layers() -> None:
    assert layer_violations(_project_graph()) == []


def test_no_import_cycles() -> None:
    assert import_cycles(_project_graph()) == []


if __name__ == "__main__":
    g = _graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    cycles = import_cycles(g)
    print(f"{len(g.modules)} modules; {len(cycles)} import cycles")
    for c in cycles:
        print(f"  cycle of {len(c)}: {', '.join(c)}")
    bad = layer_violations(g)
    print(f"{len(bad)} imports up the layers")
    for b in bad:
        print("  " + b)
