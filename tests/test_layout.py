"""The package's shape: no import cycle, one Torch-Pruning adapter, every exception in errors.py, one loader,
and a registry that is the single extension point (a new layer type is one module: tests/_custom_layer.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from _custom_layer import PointwiseConv
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.io.save import save_output
from compactor.layers import PROTOCOL, Role, Shrinker, register, registered_types, shrinker_of_type

PACKAGE = Path(compactor.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every compactor module ``path`` imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("compactor"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("compactor"):
                continue
            found.add(target)
            for alias in node.names:  # ``from . import x`` may name a submodule
                if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(".py").exists():
                    found.add(f"{target}.{alias.name}")
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    names = {_module_name(f) for f in files}
    return {_module_name(f): {t for t in _imports(f) if t in names and t != _module_name(f)} for f in files}


def test_no_import_cycle() -> None:
    graph = _graph()
    assert len(graph) > 30 and "compactor.engine.plan.compensate" in graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


# Each part imports only the parts before it (the base modules errors, inputs, util, outputs, modules: anyone).
# io and engine are side by side: the engine never imports io, io never the engine (cli/api -> engine -> layers;
# io -> outputs/modules); measure (timing on each backend, ONNX Runtime among them) sits between them.
LAYERS = [
    "layers",
    "io",
    "measure",
    "engine",
    "report",
    "api",
    "stream",
    "training",
    "demo",
    "compactor",
    "cli",
    "__main__",
]
BASE = ("errors", "inputs", "util", "outputs", "modules")


def test_parts_import_only_the_parts_before_them() -> None:
    def part(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    for source, targets in _graph().items():
        for target in targets:
            a, b = part(source), part(target)
            if a == b or b in BASE:
                continue
            assert a in LAYERS and LAYERS.index(b) < LAYERS.index(a), f"{source} imports {target}"


def test_io_is_below_the_engine() -> None:
    """The writers and loaders compare outputs and clone modules through the base modules, never the engine;
    the engine reads and writes no file."""
    for source, targets in _graph().items():
        if source.startswith("compactor.io"):
            assert not any(t.startswith("compactor.engine") for t in targets), f"{source} imports the engine"
        if source.startswith("compactor.engine"):
            assert not any(t.startswith("compactor.io") for t in targets), f"{source} imports io"
    base = {m for m in _graph() if m.split(".")[-1] in BASE}
    for module in base:
        assert all(t.split(".")[1] in BASE for t in _graph()[module] if t.count(".")), module


def test_the_tree_shows_the_pipeline() -> None:
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert folders == ["engine", "io", "layers", "measure", "report", "stream", "training"]
    stages = sorted(p.stem for p in (PACKAGE / "engine").iterdir() if not p.name.startswith("__"))
    assert stages == [
        "coupling",
        "coverage",
        "experts",
        "heads",
        "masks",
        "options",
        "plan",
        "rebuild",
        "verify",
    ]
    plan = sorted(p.stem for p in (PACKAGE / "engine" / "plan").iterdir() if not p.name.startswith("__"))
    assert plan == ["autowidth", "base", "compensate", "fates", "observe", "stage", "varying", "widths"]
    measure = sorted(p.stem for p in (PACKAGE / "measure").iterdir() if not p.name.startswith("__"))
    assert measure == ["probes", "timing"]
    assert sorted(p.stem for p in (PACKAGE / "report").iterdir() if not p.name.startswith("__")) == [
        "build",
        "filters",
        "report",
        "sparsity",
    ]


COUPLING = PACKAGE / "engine" / "coupling"


def test_only_the_adapter_knows_torch_pruning() -> None:
    """One module imports the library (``tp_adapter``); it and the module that reads the library's groups
    in compactor's terms (``tp_groups``) are the only ones that name its op types."""
    adapter = {COUPLING / "tp_adapter.py", COUPLING / "tp_groups.py"}
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] == "torch_pruning" for n in names):
                importers.add(path)
        uses = "torch_pruning" in text or any(op in text for op in ("MulBackward", "_SplitOp", "_SliceOp"))
        assert not uses or path in adapter, path
    assert importers == {COUPLING / "tp_adapter.py"}


def test_the_coupling_stage_is_one_package_of_small_modules() -> None:
    """Both analyses (Torch-Pruning's adapter, compactor's own channel labels) and the types they answer
    with, one module per concern, each small enough to read."""
    modules = {p.stem: len(p.read_text().splitlines()) for p in COUPLING.glob("*.py")}
    assert {"__init__", "groups", "labels", "ops", "tracer", "tp_adapter", "tp_groups"} <= set(modules)
    assert not [(name, n) for name, n in modules.items() if n >= 550]
    assert not any((PACKAGE / "engine" / f"{old}.py").exists() for old in ("graph", "groups", "labels"))


def test_every_exception_class_lives_in_errors() -> None:
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                raises = any(b.endswith(("Error", "Exception")) for b in bases)
                assert not raises or path == PACKAGE / "errors.py", f"{path.name}: class {node.name}({bases})"


def test_compactor_load_is_the_one_loader_function() -> None:
    assert callable(compactor.load) and compactor.load.__module__ == "compactor.io.load"
    assert not (PACKAGE / "load.py").exists()


# --- the registry ---------------------------------------------------------------------------------------
def test_every_registered_shrinker_defines_its_roles_protocol() -> None:
    assert nn.Conv2d in registered_types() and PointwiseConv in registered_types()
    for t in registered_types():
        shrinker = shrinker_of_type(t)
        missing = [m for m in PROTOCOL[shrinker.role] if getattr(type(shrinker), m) is getattr(Shrinker, m)]
        assert missing == [], f"{type(shrinker).__name__} ({t.__name__}) lacks {missing}"


def test_register_refuses_an_incomplete_shrinker() -> None:
    class Odd(nn.Module):
        pass

    with pytest.raises(
        TypeError, match=r"^MixingWithoutFolds is mixing but does not define fold_delta\(\), merge_into\(\)$"
    ):

        @register(Odd)
        class MixingWithoutFolds(Shrinker[Odd]):
            role = Role.MIXING

            def out_channels(self, m: Odd) -> int:
                return 1

            def in_channels(self, m: Odd) -> int:
                return 1

            def out_rows_zero(self, m: Odd, idx: torch.Tensor) -> torch.Tensor:
                return torch.zeros(len(idx), dtype=torch.bool)

            def in_cols_zero(self, m: Odd, idx: torch.Tensor) -> torch.Tensor:
                return torch.zeros(len(idx), dtype=torch.bool)

            def shrink(self, m: Odd, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> Odd:
                return m

    with pytest.raises(
        TypeError, match=r"^NoWidths is channelwise but does not define out_channels\(\), in_channels\(\)"
    ):

        @register(Odd)
        class NoWidths(Shrinker[Odd]):
            role = Role.CHANNELWISE

            def shrink(self, m: Odd, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> Odd:
                return m

    with pytest.raises(TypeError, match=r"^Conv2d already has a shrinker \(ConvShrinker\)$"):

        @register(nn.Conv2d)
        class Another(Shrinker[nn.Conv2d]):
            def out_channels(self, m: nn.Conv2d) -> int:
                return m.out_channels

            def in_channels(self, m: nn.Conv2d) -> int:
                return m.in_channels

    assert Odd not in registered_types()


class _CustomNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> PointwiseConv -> ReLU -> PointwiseConv -> pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pw1 = PointwiseConv(8, 12)
        self.pw2 = PointwiseConv(12, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.pw2(torch.relu(self.pw1(x))))
        out: torch.Tensor = self.fc(x.mean((2, 3)))
        return out


def test_a_layer_type_added_in_one_module_compacts_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _CustomNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.bias.uniform_(-0.5, 0.5)
    prune.custom_from_mask(model.conv, "weight", _rows_off(model.conv.weight, [1, 5]))
    with torch.no_grad():
        model.conv.bias[[1, 5]] = 0.0
        model.bn.running_mean[[1, 5]] = 0.0  # dead filters: BatchNorm emits its shift, a constant
        model.bn.bias[[1, 5]] = torch.tensor([0.3, 0.4])  # positive: ReLU passes it
        model.pw1.weight[[0, 3, 7]] = 0.0  # three dead rows: their bias, a constant through ReLU
        model.pw1.bias[[0, 3, 7]] = torch.tensor([0.2, 0.3, 0.4])
    x = torch.randn(2, 3, 10, 10)
    small, report = compactor.compact(model, x)
    assert (small.conv.out_channels, small.bn.num_features) == (6, 6)
    assert (small.pw1.in_channels, small.pw1.out_channels, tuple(small.pw1.weight.shape)) == (6, 9, (9, 6))
    assert (small.pw2.in_channels, tuple(small.pw2.weight.shape)) == (9, (6, 9))
    assert report.fates["folded"] == 5 and report.removed_fraction == 1.0
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)

    path = tmp_path / "small.safetensors"
    save_output(small, path, x, arch=_CustomNet)
    loaded = compactor.load(path, arch=_CustomNet)
    assert (loaded.pw1.in_channels, loaded.pw1.out_channels) == (6, 9)
    assert torch.equal(loaded(x), small.eval()(x))


def _rows_off(weight: torch.Tensor, rows: list[int]) -> torch.Tensor:
    mask = torch.ones_like(weight)
    mask[rows] = 0.0
    return mask


def test_no_committed_file_names_a_directory_of_the_machine_it_ran_on() -> None:
    """Reports and notes name installed files by package (``transformers/masking_utils.py``), the repo's by
    relative path: an absolute path such as ``/root/.pyenv/.../site-packages/...`` is another machine's."""
    import re
    import subprocess
    import sys

    root = PACKAGE.parent
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    machine = [re.escape(p) for p in {sys.prefix, sys.base_prefix, str(root)} if len(p) > 1]
    pattern = re.compile("|".join([r"site-packages/", r"/root/", r"/home/[a-z]", *machine]))
    this = Path(__file__).relative_to(root).as_posix()
    found = []
    for name in listed.stdout.split():
        path = root / name
        if (
            name in (this, "benchmarks/vision_sweep.py")
            or not path.is_file()
            or path.stat().st_size > 20_000_000
        ):
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        found += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)][:1]
    assert found == []


def test_the_api_is_a_sequence_of_stage_calls() -> None:
    """``api._compact`` calls one function per stage, in the pipeline's order, and does no stage work itself:
    it stays short, and every helper that did stage work lives in its stage."""
    import ast

    tree = ast.parse((PACKAGE / "api.py").read_text())
    body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_compact")
    assert body.end_lineno is not None and body.end_lineno - body.lineno < 80
    calls = [n for n in ast.walk(body) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    called = [c.func.id for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]  # type: ignore[attr-defined]
    order = ["observe", "remove_heads", "couple", "make_plans", "choose_widths", "decide", "checked_widths"]
    order += ["check_train_mode", "build_report"]
    assert [c for c in called if c in order] == order
    helpers = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert helpers == {
        "compact",
        "_compact",
        "default_target",
        "resolve_example_inputs",
        "_check_layers",
        "_timed",
    }
