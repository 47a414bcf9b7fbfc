"""The package reads top to bottom as the data flows: no import points up, no package cycles.

Every ``import`` of a ``moaplan`` module, at module level or inside a function (a lazy import
is still a dependency), is read from the source with :mod:`ast`, so the check needs neither
torch nor triton.  ``kernels/`` is installed as ``moaplan.kernels`` (setup.cfg) and is checked
under that name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top.  A module may import modules of its own unit and of units listed before it.
# The order is the data flow: shared records and helpers, the model loader, the kernels, the
# calibration data, the profiler, the optimizer, the plan, the runtime that applies a plan,
# what is measured with it (evaluation, validation), the search that ties them together, and
# the command line.  Units are packages and top-level modules.
LAYERS: list[str] = [
    "moaplan",  # the package itself: __version__ and the lazy public names (importlib, not import)
    "moaplan.errors",
    "moaplan.io",
    "moaplan.rules",
    "moaplan.shape",
    "moaplan.dispatch",  # switching a model's attention through transformers' registries
    "moaplan.model",  # the loader every command uses (model.loading, .config, .tokenizer)
    "moaplan.kernels",
    "moaplan.data",
    "moaplan.profile",
    "moaplan.optimize",
    "moaplan.plan",
    "moaplan.query_spans",  # a plan's query heads' spans: the profile's costs, the optimizer
    "moaplan.runtime",
    "moaplan.eval",
    "moaplan.validation",
    "moaplan.search",
    "moaplan.cli",
    "moaplan.__main__",
    # making the reference model: scripts (python -m) on top of evaluation and runtime, which
    # no command imports
    "moaplan.training",
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["moaplan", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    files = [p for p in (ROOT / "moaplan").rglob("*.py")
             if "kernels" not in p.relative_to(ROOT / "moaplan").parts[:1]]
    return sorted(files + list((ROOT / "kernels").rglob("*.py")))


def imports(path: Path) -> set[str]:
    """The ``moaplan`` modules ``path`` imports.  ``from moaplan.x import y`` counts as an
    import of ``moaplan.x.y`` when that is a module, else of ``moaplan.x``."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES
                          else target)
    return {m for m in found if m == "moaplan" or m.startswith("moaplan.")}


def unit(module: str) -> str:
    """The layer unit of ``module``: the longest entry of :data:`LAYERS` it falls under."""
    matches = [u for u in LAYERS if module == u or module.startswith(u + ".")]
    assert matches, f"{module} is in no layer; add it to LAYERS in {__file__}"
    return max(matches, key=len)


MODULES = {module_name(p) for p in source_files()}
GRAPH = {module_name(p): imports(p) for p in source_files()}


def test_every_module_is_found() -> None:
    # guards the walk itself: a broken path would make every other check pass vacuously
    assert {"moaplan.rules", "moaplan.shape", "moaplan.kernels.decode", "moaplan.cli",
            "moaplan.data.tasks", "moaplan.profile.profiler"} <= MODULES
    assert GRAPH["moaplan.profile.profiler"], "moaplan.profile.profiler imports nothing?"


def test_no_import_points_up() -> None:
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = sorted(
        f"{source} ({unit(source)}) imports {target} ({unit(target)})"
        for source, targets in GRAPH.items() for target in targets
        if rank[unit(target)] > rank[unit(source)]
    )
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes, first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def test_no_package_cycles() -> None:
    units: dict[str, set[str]] = {}
    for source, targets in GRAPH.items():
        units.setdefault(unit(source), set()).update(
            unit(t) for t in targets if unit(t) != unit(source))
    assert _cycle(units) is None, " -> ".join(_cycle(units) or [])


def test_no_module_cycles() -> None:
    # a package's __init__ imports its modules by design; leave those edges out
    graph = {s: {t for t in ts if t != s and not s == t.rsplit(".", 1)[0]}
             for s, ts in GRAPH.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
