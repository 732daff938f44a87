"""The benchmark modules (python/deep_ep/bench) import each other without a cycle: read as source, so it is
checked without torch. Shared helpers live in bench/timing.py, which imports no other bench module, and no
function imports a bench module (a late import is how a cycle hides)."""

import ast
import pathlib

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "python" / "deep_ep" / "bench"
PACKAGE = "deep_ep.bench"


def _modules():
    return {path.stem: ast.parse(path.read_text(), filename=str(path)) for path in sorted(BENCH_DIR.glob("*.py"))}


def _bench_targets(node, names):
    """The bench modules that one import statement names (empty for imports from elsewhere)."""
    targets = set()
    if isinstance(node, ast.ImportFrom):
        if node.level == 1:
            base = node.module
        elif node.level == 0 and node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
            base = node.module[len(PACKAGE) + 1 :] or None
        else:
            return targets
        if base is None:  # from . import suite
            targets.update(alias.name for alias in node.names if alias.name in names)
        else:
            targets.add(base.split(".")[0])
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith(PACKAGE + "."):
                targets.add(alias.name[len(PACKAGE) + 1 :].split(".")[0])
    return targets & names


def _graph(modules):
    """({module: bench modules it imports anywhere in its source}, [imports made inside functions])."""
    names = set(modules)
    graph, late = {}, []
    for name, tree in modules.items():
        graph[name] = set()
        for node in ast.walk(tree):
            graph[name] |= _bench_targets(node, names)
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    for target in _bench_targets(node, names):
                        late.append(f"{name}.{function.name} imports {target}")
    return graph, late


def _cycle(graph):
    """One import cycle as [a, b, ..., a], or None."""
    state = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def test_bench_sources_are_found():
    modules = _modules()
    assert {"suite", "intranode", "internode", "low_latency", "baselines", "timing"} <= set(modules)


def test_bench_modules_import_each_other_without_a_cycle():
    graph, _ = _graph(_modules())
    cycle = _cycle(graph)
    assert cycle is None, "import cycle among the bench modules: " + " -> ".join(cycle)


def test_no_function_imports_a_bench_module():
    _, late = _graph(_modules())
    assert late == []


def test_timing_imports_no_bench_module_and_the_op_benches_use_it():
    graph, _ = _graph(_modules())
    assert graph["timing"] == set()
    for name in ("suite", "intranode", "internode", "baselines"):
        assert "timing" in graph[name], f"{name} does not import the shared helpers"
    for name in ("intranode", "internode", "low_latency", "baselines"):
        assert "suite" not in graph[name], f"{name} imports suite, which imports it"


def test_cycle_finder_reports_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
