"""effllm.kernels is a stack: every import (module level or inside a function) goes down it.

Layers, bottom to top: input checks and masks -> Triton kernels and launchers, the explicit
softmax and the references -> one implementation per op -> the torch.library ops -> the public
functions -> the package. A module may import from its own layer or below, never from above;
the import graph has no cycle; nothing in kernels/ imports effllm's higher packages.
"""

import ast
from pathlib import Path

import effllm.kernels

KERNELS = Path(effllm.kernels.__file__).parent
PACKAGE = "effllm.kernels"

# Most specific name first: "triton._common" sits below the other triton modules.
LAYERS = [
    ("checks", ["_checks", "_masks", "_varlen", "triton._common"]),
    ("kernels", ["triton", "triton.*", "scores", "reference"]),
    ("implementations", ["_attention_impl", "_decode_impl"]),
    ("ops", ["ops"]),
    ("public functions", ["attention", "decode", "norm", "fused"]),
    ("package", [""]),
]
# Outside kernels/, only these effllm modules may be imported.
ALLOWED_OUTSIDE = {"effllm._backend", "effllm.native"}


def _rank(name: str) -> int | None:
    """Layer index of ``effllm.kernels.<name>`` (``""`` is the package itself)."""
    for exact in (True, False):
        for index, (_, patterns) in enumerate(LAYERS):
            for pattern in patterns:
                if exact and pattern == name:
                    return index
                if not exact and pattern.endswith(".*") and name.startswith(pattern[:-1]):
                    return index
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: imported effllm modules}`` for the kernels package at ``root``, with every import
    statement counted, including those inside functions. Names are relative to ``effllm.kernels``
    (``""`` for the package); modules outside it keep their full ``effllm.`` name."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                full = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = node.module or ""
                else:
                    absolute = f"{PACKAGE}.{package}".rstrip(".").split(".")
                    base = ".".join(absolute[: len(absolute) - (node.level - 1)] + ([node.module] if node.module else []))
                # `from . import ops` names a module; `from .x import f` names something in one.
                full = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}", modules) else base
                        for alias in node.names]
            else:
                continue
            for target in full:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    targets.add(target[len(PACKAGE) + 1:])
                elif target == "effllm" or target.startswith("effllm."):
                    targets.add(target)
        graph[name] = targets
    return graph


def _is_module(full: str, modules) -> bool:
    if full == PACKAGE:
        return True
    return full.startswith(PACKAGE + ".") and full[len(PACKAGE) + 1:] in modules


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        rank = _rank(module)
        if rank is None:
            problems.append(f"{module or '__init__'}: not in the layer table of tests/test_kernel_layers.py")
            continue
        for target in sorted(targets):
            if target.startswith("effllm"):
                if target not in ALLOWED_OUTSIDE:
                    problems.append(f"{module}: imports {target}, outside kernels/")
                continue
            target_rank = _rank(target)
            if target_rank is not None and target_rank > rank:
                problems.append(f"{module} ({LAYERS[rank][0]}) imports {target} ({LAYERS[target_rank][0]}): upward")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search over kernels-internal edges."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(t for t in graph.get(node, ()) if not t.startswith("effllm")):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_every_import_goes_down_the_stack():
    assert layer_violations(import_graph(KERNELS)) == []


def test_no_import_cycles():
    assert cycles(import_graph(KERNELS)) == []


def test_the_checks_catch_upward_imports_and_cycles(tmp_path):
    # A small package with the faults this test exists for: an op calling back into the public
    # module that calls it (a cycle), a function-local import, and an import of kv/.
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .attention import attention\n")
    (pkg / "attention.py").write_text("def attention():\n    from .ops import op\n    return op()\n")
    (pkg / "ops.py").write_text("from .attention import attention\nfrom ..kv import policies\n")
    (pkg / "_checks.py").write_text("")
    graph = import_graph(pkg)
    assert graph["ops"] == {"attention", "effllm.kv"}
    problems = layer_violations(graph)
    assert "ops (ops) imports attention (public functions): upward" in problems
    assert "ops: imports effllm.kv, outside kernels/" in problems
    assert cycles(graph) == [["attention", "ops", "attention"]]
