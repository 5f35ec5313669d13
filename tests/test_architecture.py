"""The house rules, checked from the source (README, "Architecture"): the pack's import graph has no
cycle (function-local imports included) and points one way, nodes -> sparge_core -> kernels;
sparge_core knows no ComfyUI; production code imports nothing of devkit/, tests/ or bench/; no
module of nodes/ grows past MAX_NODE_LINES."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("kernels", "sparge_core", "nodes")
RANK = {"kernels": 0, "sparge_core": 1, "nodes": 2}
COMFY = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "server", "folder_paths", "nodes", "execution"}
DEV = {"devkit", "tests", "bench", "scripts", "pack", "harness", "realistic_inputs", "common", "<pack root>"}
MAX_NODE_LINES = 350


def modules() -> dict:
    """'room.module' -> path, for every .py file of the three rooms (packages as 'room')."""
    out = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> tuple[set, set]:
    """(modules of the pack it imports, top-level names of outside packages it imports)."""
    tree = ast.parse(path.read_text(), str(path))
    # the repository root is itself a package (ComfyUI imports it as the pack): "" stands for it
    package = ("." + name if path.name == "__init__.py" else "." + name.rpartition(".")[0]).split(".")
    inside, outside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                outside.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                outside.add((node.module or "").split(".")[0])
                continue
            if node.level > len(package):
                raise ValueError(f"{name}: relative import above the pack's root")
            base = package[:len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))[1:]  # drop the root's ""
            if target.split(".")[0] not in ROOMS:  # the root __init__ or another top-level folder
                outside.add(target.split(".")[0] or "<pack root>")
                continue
            for a in node.names:  # `from . import x` names a module when x is one
                sub = f"{target}.{a.name}"
                inside.add(sub if sub in known else target)
    return inside, outside


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_cycle(graph):
    edges = {m: {t for t in ins if t in graph and t != m} for m, (ins, _) in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_imports_point_down(graph):
    bad = []
    for m, (ins, outs) in graph.items():
        room = m.split(".")[0]
        for t in ins:
            if RANK[t.split(".")[0]] > RANK[room]:
                bad.append(f"{m} imports {t} (upward)")
        if room != "nodes" and outs & COMFY:
            bad.append(f"{m} imports ComfyUI ({sorted(outs & COMFY)})")
        if outs & DEV:
            bad.append(f"{m} imports development code ({sorted(outs & DEV)})")
    assert not bad, "\n".join(bad)


def test_node_modules_stay_small():
    big = {p.name: n for p in (ROOT / "nodes").glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_NODE_LINES}
    assert not big, f"split these nodes/ modules (over {MAX_NODE_LINES} lines): {big}"


def test_the_checker_sees_an_upward_and_a_circular_import(tmp_path):
    """The parser resolves relative imports the way Python does (so the tests above can fail)."""
    known = {"kernels.a": tmp_path / "a.py", "sparge_core.api": tmp_path / "api.py", "nodes.x": tmp_path / "x.py",
             "nodes.y": tmp_path / "y.py"}
    (tmp_path / "a.py").write_text("from ..sparge_core.api import f\nimport torch\n")
    (tmp_path / "y.py").write_text("def g():\n    from . import x\n    from .x import h\n    from ..devkit import m\n")
    assert imports_of("kernels.a", known["kernels.a"], known) == ({"sparge_core.api"}, {"torch"})
    assert imports_of("nodes.y", known["nodes.y"], known) == ({"nodes.x"}, {"devkit"})
