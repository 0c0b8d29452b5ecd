"""The library's import graph is layered (issue 12 item 13, issue 24): no cycle, no import of our own modules inside a
function (the usual way to hide a cycle), no module reaching into another's private names, and every module in a
layer of DESIGN.md's picture, reaching (transitively) only its own layer and those below:

    1 base       files, config, memory, hub, paper, kernel, placement, version, cli, fusion,
                 metrics/ (the metric registry, FID/KID/CLIP score/accuracy from what a protocol collects)
    2 tuners     tuners/ (the registry in its __init__)
    3 mechanism  attach, weights, exports, methods, mixing
    4 models     models, samplers, sampling, report (it builds SD v1.5's UNet: above models, not below them)
    5 data       data/, latent_cache
    6 work       train/, generate, multitask, evaluation/ (the one loop; COCO and folders), world/ (the tiny world,
                 its protocol), ema, modelcard, flags
    7 top        table, the package's __init__ (the public facade)

An import statement counts as written (`from pkg import name` runs pkg/__init__, so its imports count too); that
importing any submodule first runs restune_diffusion/__init__ (the facade, layer 7) is left out, or every module
would reach the top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "restune_diffusion"
ROOT = PACKAGE.name


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def owner(name: str) -> str | None:
    """The module of ours that a dotted name imports (a package resolves to its __init__), or None if not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str):
    """(imported module, names taken from it, inside a function?) for each import of one of our modules."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if is_package(name) else name.rpartition(".")[0]

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if owner(alias.name):
                        yield owner(alias.name), [], nested
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if owner(base) is None:
                    continue
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:
                        yield sub, [], nested
                    else:
                        yield owner(base), [alias.name], nested
            yield from walk(child, nested)

    yield from walk(tree, False)


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name) if target != name} for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert f"{ROOT}.placement" in edges[f"{ROOT}.tuners.res_adapter"]  # the parser sees our imports
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_our_modules_inside_a_function():
    hidden = [f"{name} imports {target}" for name in MODULES for target, _, nested in imports(name) if nested]
    assert not hidden, "imports inside functions (move them to the module top):\n" + "\n".join(hidden)


def test_no_module_takes_another_modules_private_names():
    private = [f"{name} takes {target}.{n}" for name in MODULES for target, names, _ in imports(name)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "\n".join(private)


LAYERS = {
    1: ("files", "config", "memory", "hub", "paper", "kernel", "placement", "version", "cli", "fusion", "metrics",
        "metrics.*"),
    2: ("tuners", "tuners.*"),
    3: ("attach", "weights", "exports", "methods", "mixing"),
    4: ("models", "samplers", "sampling", "report"),
    5: ("data", "data.*", "latent_cache"),
    6: ("train", "train.*", "generate", "multitask", "evaluation", "evaluation.*", "world", "world.*", "ema",
        "modelcard", "flags"),
    7: ("table", "table_report", ""),
}
def layer(name: str) -> int | None:
    short = name.removeprefix(ROOT).removeprefix(".")
    for number, patterns in LAYERS.items():
        for pattern in patterns:
            if short == pattern or (pattern.endswith(".*") and short.startswith(pattern[:-1])):
                return number
    return None


def path_to(edges: dict[str, set[str]], src: str, found) -> list[str] | None:
    """The import chain from src to the first module where found(module) holds (breadth first), or None."""
    parents, todo = {src: None}, [src]
    while todo:
        node = todo.pop(0)
        if node != src and found(node):
            chain = [node]
            while parents[chain[-1]] is not None:
                chain.append(parents[chain[-1]])
            return chain[::-1]
        for nxt in sorted(edges[node]):
            if nxt not in parents:
                parents[nxt] = node
                todo.append(nxt)
    return None


def test_every_module_has_a_layer():
    assert not [n for n in MODULES if layer(n) is None], "add them to LAYERS (and to DESIGN.md's picture)"
    assert layer(f"{ROOT}.train.loop") == 6 and layer(f"{ROOT}.tuners.bypass") == 2 and layer(ROOT) == 7


def test_no_module_reaches_a_layer_above_its_own():
    edges = graph()
    up = []
    for name in sorted(MODULES):
        chain = path_to(edges, name, lambda other, name=name: layer(other) > layer(name))
        if chain:
            up.append(f"layer {layer(name)} {name} reaches layer {layer(chain[-1])}: {' -> '.join(chain)}")
    assert not up, "\n".join(up)


def test_the_finder_follows_imports_transitively():
    edges = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert path_to(edges, "a", lambda n: n == "c") == ["a", "b", "c"] and path_to(edges, "c", bool) is None


def test_the_world_and_the_evaluation_do_not_import_each_other():
    """Evaluation runs protocols, the world's among them, with the metrics below both (issue 24): no edge either way
    (eval_fid.py, at the top, hands the world's protocol to evaluation's loop)."""
    edges = graph()
    world, evaluation = f"{ROOT}.world", f"{ROOT}.evaluation"
    crossing = {(a, b) for a, targets in edges.items() for b in targets
                if (a.startswith(world) and b.startswith(evaluation)) or (a.startswith(evaluation) and
                                                                          b.startswith(world))}
    assert not crossing, sorted(crossing)


def test_layers():
    edges = graph()

    def reaches(src: str, dst: str) -> bool:
        seen, todo = set(), [src]
        while todo:
            node = todo.pop()
            if node == dst:
                return True
            if node not in seen:
                seen.add(node)
                todo += edges[node]
        return False

    tuner_files = [n for n in MODULES if n.startswith(f"{ROOT}.tuners.")]
    assert tuner_files and not any(reaches(n, f"{ROOT}.attach") for n in tuner_files)  # below attach
    assert not reaches(f"{ROOT}.tuners", f"{ROOT}.attach") and not reaches(f"{ROOT}.config", f"{ROOT}.tuners")
    assert not reaches(f"{ROOT}.attach", f"{ROOT}.report") and not reaches(f"{ROOT}.attach", f"{ROOT}.weights")
    assert not reaches(f"{ROOT}.weights", f"{ROOT}.train") and not reaches(f"{ROOT}.weights", f"{ROOT}.generate")
    assert not reaches(f"{ROOT}.files", f"{ROOT}.weights") and not reaches(f"{ROOT}.sampling", f"{ROOT}.multitask")
