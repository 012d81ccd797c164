"""peftbench's import contracts that import-linter's built-in types cannot say (pyproject.toml,
``[tool.importlinter]``; ``lint-imports`` runs them in .ci/run).

Plugin modules are the public modules of the plugin packages (``methods/<method>``,
``tasks/<suite>``, ``peftbench/data/layouts/<layout>``, ``peftbench/data/prepare/<suite>``,
``peftbench/executors/<backend>``, ``peftbench/trackers/<tracker>``): no path component after the package
starts with ``_``. They plug
into the core, so they may import it up to the sweep layer; the core never imports them (their
registries load them by name, so a new plugin is one file and no core edit).
"""
from __future__ import annotations

import grimp
from importlinter.application import output
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.layers import LayersContract
from importlinter.domain.contract import Contract, ContractCheck

PLUGIN_PACKAGES = ("peftbench.methods", "peftbench.tasks", "peftbench.data.layouts", "peftbench.data.prepare",
                   "peftbench.executors", "peftbench.trackers")
# what a plugin must not import: the layers above the sweep
ABOVE_PLUGINS = ("peftbench.cli", "peftbench.api", "peftbench.results", "peftbench.bench")


def is_plugin(module: str) -> bool:
    for package in PLUGIN_PACKAGES:
        if module.startswith(package + "."):
            return not any(part.startswith("_") for part in module[len(package) + 1:].split("."))
    return False


def without_plugin_imports(graph: grimp.ImportGraph) -> grimp.ImportGraph:
    g = graph  # import-linter hands every contract its own copy of the graph
    for m in list(g.modules):
        if is_plugin(m):
            for imported in list(g.find_modules_directly_imported_by(m)):
                g.remove_import(importer=m, imported=imported)
    return g


class PluginLayersContract(LayersContract):
    """import-linter's layers contract on the core: plugin modules' imports are not layered."""

    type_name = "plugin_layers"

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        return super().check(without_plugin_imports(graph), verbose)


class PluginAcyclicSiblingsContract(AcyclicSiblingsContract):
    """No cycles between the sub-packages of a package, plugins (leaves) aside."""

    type_name = "plugin_acyclic_siblings"

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        return super().check(without_plugin_imports(graph), verbose)


class PluginsAreLeavesContract(Contract):
    """The core imports no plugin module; a plugin imports nothing above the sweep layer."""

    type_name = "plugins_are_leaves"

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        bad = []
        for a in sorted(graph.modules):
            for b in sorted(graph.find_modules_directly_imported_by(a)):
                if not b.startswith("peftbench"):
                    continue
                core_imports_plugin = not is_plugin(a) and is_plugin(b)
                plugin_imports_above = is_plugin(a) and b.startswith(ABOVE_PLUGINS)
                if core_imports_plugin or plugin_imports_above:
                    bad.append((a, b))
        return ContractCheck(kept=not bad, metadata={"bad": bad})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for a, b in check.metadata["bad"]:
            why = "the core imports a plugin" if not is_plugin(a) else "a plugin imports a layer above the sweep"
            output.print_error(f"{a} -> {b} ({why})", bold=False)
            output.new_line()


class NoModuleCyclesContract(Contract):
    """No import cycle between any two modules, imports inside functions included."""

    type_name = "no_module_cycles"

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        mods = sorted(m for m in graph.modules if m.startswith("peftbench"))
        edges = {m: sorted(x for x in graph.find_modules_directly_imported_by(m) if x.startswith("peftbench"))
                 for m in mods}
        cycles = [c for c in _strongly_connected(mods, edges) if len(c) > 1]
        return ContractCheck(kept=not cycles, metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for c in check.metadata["cycles"]:
            output.print_error("import cycle: " + " <-> ".join(c), bold=False)
            output.new_line()


def _strongly_connected(nodes: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            succ = edges.get(v, [])
            if i < len(succ):
                work.append((v, i + 1))
                w = succ[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out
