"""The house's floors (issue 20): every import among mvquant's modules goes down the flow of DESIGN.md,
and no modules import each other in a circle. Read from the source with `ast` (imports inside functions
count too: a lazy import is still a dependency), so a new upward import fails here, not in review."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mvquant"

# Bottom to top. A module belongs to the longest unit that prefixes its name; it may import its own unit
# and the units of lower floors, nothing above and no other unit on its floor.
FLOORS = [
    ["mvquant.errors"],
    ["mvquant.io"],
    ["mvquant.quantization"],            # the core: config, method declarations, grids, packing, QuantLinear
    ["mvquant.models"],                  # architectures (ArchSpec), built-in models, sources, devices
    ["mvquant.checkpoint"],              # the checkpoint format and its transformers loader
    ["mvquant.calibration"],             # massive dims: statistics, reports, selection
    ["mvquant.quantization.methods"],    # the algorithms, one decoder layer at a time
    ["mvquant.pipeline"],                # quantize / quantize_to_checkpoint and the layer-by-layer loop
    ["mvquant.export"],                  # compressed-tensors and GGUF
    ["mvquant.loading", "mvquant.kvcache"],   # load any model or export; the quantized KV cache
    ["mvquant.evaluation"],
    ["mvquant.serving"],
    ["mvquant.compare"],
    ["mvquant.cli"],                     # entry points: the verbs
    ["mvquant.__main__", "mvquant"],     # `python -m mvquant`, and the public names (imported lazily)
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def unit_of(module: str) -> str:
    return max((u for u in FLOOR if module == u or module.startswith(u + ".")), key=len)


def imports_of(module: str) -> set[str]:
    """The mvquant modules `module` imports (relative imports resolved; `from pkg import mod` is pkg.mod)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, [a.name for a in node.names])]
        else:
            continue
        for base, names in targets:
            if not (base == "mvquant" or base.startswith("mvquant.")):
                continue
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found.update(subs or ([base] if base in MODULES else []))
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_floor():
    assert all(unit_of(m) in FLOOR for m in MODULES)


def test_imports_go_down_the_flow():
    wrong = []
    for a, targets in GRAPH.items():
        ua = unit_of(a)
        for b in targets:
            ub = unit_of(b)
            if ub != ua and FLOOR[ub] >= FLOOR[ua]:
                wrong.append(f"{a} ({ua}, floor {FLOOR[ua]}) imports {b} ({ub}, floor {FLOOR[ub]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    seen, stack, circles = set(), [], []

    def visit(m):
        if m in stack:
            circles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(GRAPH[m]):
            visit(n)
        stack.pop()

    for m in sorted(GRAPH):
        visit(m)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("code, expected", [
    ("from ..errors import MvquantError", {"mvquant.errors"}),
    ("from ..quantization import core", {"mvquant.quantization.core"}),
    ("from ..quantization import QuantConfig", {"mvquant.quantization"}),
    ("import mvquant.models.adapters", {"mvquant.models.adapters"}),
])
def test_the_reader_resolves_imports(code, expected, tmp_path, monkeypatch):
    """The checks above are only as good as this reader: relative and absolute forms, modules and names."""
    path = ROOT / "pipeline" / "quantize.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: code if self == path else Path.read_bytes(self).decode())
    assert imports_of("mvquant.pipeline.quantize") == expected
