"""The house's shape, read from the code: the README's layers hold for every import (ast), there are no import
cycles between files, and the README's layout names exactly the tree."""

import ast
import re
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text()
PACKAGES = ("sdd", "hfi", "train")


def readme_layers() -> dict[str, int]:
    """{module or package prefix: layer number} from the README's layers table."""
    block = README.split("<!-- layers -->", 1)[1].split("<!-- /layers -->", 1)[0]
    layers = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.match(r"^\d+ ", cells[0]):
            continue
        for name in re.findall(r"`([^`]+)`", cells[1]):
            layers[name] = int(cells[0].split()[0])
    return layers


LAYERS = readme_layers()
COMMANDS = max(LAYERS.values())


def modules() -> dict[str, object]:
    """Every module of the packages (and the train/ scripts), by dotted name -> path."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = modules()


def layer_of(name: str) -> int:
    matches = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    assert matches, f"{name} is in no layer: add it to the README's layers table"
    return LAYERS[max(matches, key=len)]


def _is_main_guard(node) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def imports_of(name: str, path) -> list[tuple[str, int, bool]]:
    """(imported module, line, under the __main__ guard) for every import of the project's modules, function-level
    ones included. ``from a import b`` is the module ``a.b`` when that is a module, else ``a``."""
    tree = ast.parse(path.read_text())
    guarded = {id(n) for node in ast.walk(tree) if _is_main_guard(node) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]
        for target in targets:
            if target.split(".")[0] in PACKAGES and target != name:
                out.append((target, node.lineno, id(node) in guarded))
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if not any(m == p or m.startswith(p + ".") for p in LAYERS)]
    assert missing == [], f"add to the README's layers table: {missing}"
    stale = [n for n in LAYERS if not any(m == n or m.startswith(n + ".") for m in MODULES)]
    assert stale == [], f"the README's layers table names what does not exist: {stale}"


def test_no_import_runs_from_a_lower_layer_up():
    upward = []
    for name, imports in GRAPH.items():
        for target, line, guarded in imports:
            mine = COMMANDS if guarded else layer_of(name)
            if layer_of(target) > mine:
                upward.append(f"{MODULES[name].relative_to(ROOT)}:{line} ({name}, layer {mine}) imports {target} "
                              f"(layer {layer_of(target)})")
    assert upward == []


def test_no_import_cycles_between_files():
    edges = {name: {t for t, _, guarded in imports if not guarded} for name, imports in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt in edges and not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    sys.setrecursionlimit(max(1000, 10 * len(edges)))
    for name in sorted(edges):
        if not state.get(name):
            visit(name, [])
    assert cycles == []


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The two rules bite: a function-level import from the loop up to the API is upward, and two modules that
    import each other are a cycle."""
    path = tmp_path / "loop.py"
    path.write_text("def f():\n    from sdd.api import train\n")
    [(target, _, guarded)] = imports_of("sdd.loop", path)
    assert target == "sdd.api" and not guarded and layer_of(target) > layer_of("sdd.loop")
    path.write_text("if __name__ == '__main__':\n    from sdd.cli.eval import cli\n")
    assert [g for _, _, g in imports_of("sdd.eval.harness", path)] == [True]


def tree_block() -> list[str]:
    """The paths the README's layout names: an entry is a first word ending in / or .py, nested by two spaces."""
    block = README.split("<!-- tree:", 1)[1].split("```", 2)[1]
    paths, parents = [], []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        depth, entry = len(match.group(1)) // 2, match.group(2)
        if depth > len(parents) or not entry.endswith(("/", ".py")):
            continue  # a description's continuation line
        parents = parents[:depth] + [entry]
        paths.append("".join(parents))
    return paths


IGNORED = {".git", ".venv", "outputs", "wandb", ".pytest_cache", ".ruff_cache", "__pycache__", ".ci"}


def test_the_readme_layout_names_exactly_the_tree():
    listed = tree_block()
    missing_on_disk = [p for p in listed if not (ROOT / p).exists()]
    assert missing_on_disk == []
    top = sorted(p.name + "/" for p in ROOT.iterdir() if p.is_dir() and p.name not in IGNORED
                 and not p.name.endswith(".egg-info"))
    package = sorted(f"sdd/{p.name}{'/' if p.is_dir() else ''}" for p in (ROOT / "sdd").iterdir()
                     if p.name not in IGNORED and p.name != "__init__.py")
    unlisted = [p for p in top + package if p not in listed]
    assert unlisted == [], f"the README's layout does not name {unlisted}"
