"""Pickles that hold more than modules load without ``--trust-pickle`` (issue 11), and what that allows
cannot be turned against the loader.

* Models: timm's ``Format`` enum member, torchvision ViT's ``partial(nn.LayerNorm, eps=1e-6)``, and
  Hugging Face models saved whole (a config, ``GELUActivation``'s ``torch._C._nn.gelu``, LLaMA's
  ``GenerationConfig``). Each is masked, ``torch.save``d, compacted by the real ``compact`` command
  without ``--trust-pickle``, loaded back with ``compactor.load`` (no trust either), and compared with the
  masked model: the same outputs, the exact widths and parameter count the masks allow.
* Red team: partials of anything but a module class or an operator, enums from modules that are not
  allowed or that hook their lookup, torch functions that touch files, processes, threads or memory, and
  classes that only look like Hugging Face configs are refused with one line, and nothing they name runs.
  These load in this process (``compactor.load``, the loader the CLI uses); two go through the CLI too.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import os
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _loading_models as lm
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.errors import UnsafePickleError

CLOSE = {"rtol": 1e-4, "atol": 1e-5}
Group = tuple[list[str], list[str]]  # (layers that lose output channels, layers that lose input channels)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "compactor.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# --- the models ----------------------------------------------------------------------------------------------
def mask_rows(layer: nn.Module, count: int) -> None:
    """Mask the ``count`` output channels of smallest L2 norm, as users do."""
    prune.ln_structured(layer, "weight", count, n=2, dim=0)


def zero_rows(layer: nn.Module) -> int:
    return int((layer.weight == 0).flatten(1).all(1).sum())


def timm_style() -> tuple[nn.Module, torch.Tensor, list[Group]]:
    torch.manual_seed(0)
    model = lm.ChannelsLastMlpNet().eval()
    mask_rows(model.fc1, 12)
    return model, torch.randn(2, 3, 8, 8), [(["fc1"], ["fc2"])]


def torchvision_vit() -> tuple[nn.Module, torch.Tensor, list[Group]]:
    torch.manual_seed(0)
    model = lm.VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()
    groups = []
    for i, block in enumerate(model.encoder.layers):
        mask_rows(block.mlp[0], 12)
        path = f"encoder.layers.encoder_layer_{i}.mlp"
        groups.append(([f"{path}.0"], [f"{path}.3"]))
    return model, torch.randn(2, 3, 8, 8), groups


def _bert_config() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )


def _tokens() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": torch.randint(0, 50, (2, 8), generator=generator), "attention_mask": mask}


def _bert_groups(model: nn.Module, prefix: str) -> list[Group]:
    groups = []
    for i, layer in enumerate(model.get_submodule(f"{prefix}encoder.layer")):
        mask_rows(layer.intermediate.dense, 16)
        groups.append(
            ([f"{prefix}encoder.layer.{i}.intermediate.dense"], [f"{prefix}encoder.layer.{i}.output.dense"])
        )
    return groups


def bert() -> tuple[nn.Module, Any, list[Group]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(_bert_config()).eval()
    return model, _tokens(), _bert_groups(model, "")


def bert_classifier() -> tuple[nn.Module, Any, list[Group]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config()).eval()
    return model, _tokens(), _bert_groups(model, "bert.")


def hf_vit() -> tuple[nn.Module, Any, list[Group]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    groups = []
    for i, layer in enumerate(model.vit.layers):
        mask_rows(layer.mlp.fc1, 16)
        groups.append(([f"vit.layers.{i}.mlp.fc1"], [f"vit.layers.{i}.mlp.fc2"]))
    return model, {"pixel_values": torch.randn(2, 3, 16, 16)}, groups


def hf_convnext() -> tuple[nn.Module, Any, list[Group]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3
    )
    model = transformers.ConvNextForImageClassification(config).eval()
    groups = []
    for i, stage in enumerate(model.convnext.encoder.stages):
        mask_rows(stage.layers[0].pwconv1, 16)
        path = f"convnext.encoder.stages.{i}.layers.0"
        groups.append(([f"{path}.pwconv1"], [f"{path}.pwconv2"]))
    return model, {"pixel_values": torch.randn(2, 3, 32, 32)}, groups


def hf_resnet() -> tuple[nn.Module, Any, list[Group]]:
    """A masked filter whose BatchNorm scale and shift are zero too emits zeros: it goes with the next
    conv's input channels."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=3
    )
    model = transformers.ResNetForImageClassification(config).eval()
    groups = []
    for i, stage in enumerate(model.resnet.encoder.stages):
        first = stage.layers[0].layer[0]
        mask_rows(first.convolution, first.convolution.out_channels // 2)
        dead = (first.convolution.weight == 0).flatten(1).all(1)
        with torch.no_grad():
            first.normalization.weight[dead] = 0.0
            first.normalization.bias[dead] = 0.0
        path = f"resnet.encoder.stages.{i}.layers.0.layer"
        groups.append(([f"{path}.0.convolution", f"{path}.0.normalization"], [f"{path}.1.convolution"]))
    return model, {"pixel_values": torch.randn(2, 3, 32, 32)}, groups


def hf_llama() -> tuple[nn.Module, Any, list[Group]]:
    """A masked gate neuron emits SiLU(0) * up = 0: it goes from gate_proj, up_proj and down_proj."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    groups = []
    for i, layer in enumerate(model.model.layers):
        mask_rows(layer.mlp.gate_proj, 24)
        path = f"model.layers.{i}.mlp"
        groups.append(([f"{path}.gate_proj", f"{path}.up_proj"], [f"{path}.down_proj"]))
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}, groups


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[nn.Module, Any, list[Group]]]
    holds: str  # a global the pickle names that loading without --trust-pickle once refused


CASES = [
    pytest.param(Case(timm_style, "_loading_models.Format"), id="timm-format-enum"),
    pytest.param(Case(torchvision_vit, "functools.partial"), id="torchvision-vit-partial"),
    pytest.param(Case(bert, "torch._C._nn.gelu"), id="bert"),
    pytest.param(Case(hf_vit, "transformers.models.vit.configuration_vit.ViTConfig"), id="vit"),
    pytest.param(
        Case(bert_classifier, "transformers.activations.GELUActivation"),
        id="bert-classifier",
        marks=pytest.mark.slow,
    ),
    pytest.param(Case(hf_convnext, "torch._C._nn.gelu"), id="convnext", marks=pytest.mark.slow),
    pytest.param(
        Case(hf_resnet, "transformers.models.resnet.configuration_resnet.ResNetConfig"),
        id="resnet",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Case(hf_llama, "transformers.generation.configuration_utils.GenerationConfig"),
        id="llama",
        marks=pytest.mark.slow,
    ),
]


# --- what the masks allow ----------------------------------------------------------------------------------
def _out_width(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    assert isinstance(m, nn.BatchNorm2d), type(m)
    return m.num_features


def _in_width(m: nn.Module) -> int:
    assert isinstance(m, (nn.Linear, nn.Conv2d)), type(m)
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _per_output(m: nn.Module) -> int:
    """Parameters one output channel of ``m`` holds."""
    return sum(p.numel() for p in m.parameters()) // _out_width(m)


def _per_input(m: nn.Module) -> int:
    """Parameters one input channel of ``m`` holds (its weight column)."""
    return m.weight.numel() // _in_width(m)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model: nn.Module, x: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("case", CASES)
def test_a_model_holding_more_than_modules_compacts_and_loads_back_without_trust(
    case: Case, tmp_path: Path
) -> None:
    model, x, groups = case.build()
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "inputs.pt")
    assert case.holds in torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "model.pt")

    r = cli("model.pt", "-o", "small.pt", "--example-inputs", "inputs.pt", "-q", cwd=tmp_path)

    assert r.returncode == 0, r.stderr
    small = compactor.load(tmp_path / "small.pt")
    removed = 0
    for producers, consumers in groups:
        count = zero_rows(model.get_submodule(producers[0]))
        assert count > 0
        for name in producers:
            dense = model.get_submodule(name)
            assert _out_width(small.get_submodule(name)) == _out_width(dense) - count, name
            removed += count * _per_output(dense)
        for name in consumers:
            dense = model.get_submodule(name)
            assert _in_width(small.get_submodule(name)) == _in_width(dense) - count, name
            removed += count * _per_input(dense)
    assert params(small) == params(model) - removed
    expected, found = outputs(model, x), outputs(small, x)
    assert len(found) == len(expected)
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, **CLOSE)


# --- red team: what the new allowances must not let in --------------------------------------------------------
HOOKED = textwrap.dedent(
    """
    import enum

    MARK = "hook_ran.txt"


    class Plain(str, enum.Enum):
        A = "a"


    class Missing(str, enum.Enum):
        A = "a"

        @classmethod
        def _missing_(cls, value):
            open(MARK, "w").write("ran")
            return cls.A


    class Meta(enum.EnumMeta):
        def __call__(cls, *args, **kwargs):
            open(MARK, "w").write("ran")
            return super().__call__(*args, **kwargs)


    class Called(enum.Enum, metaclass=Meta):
        A = "a"


    class Replaced(enum.Enum):
        A = "a"


    def _lookup(cls, value):
        open(MARK, "w").write("ran")
        return cls.A


    Replaced.__new__ = _lookup


    class EqualToAll(enum.EnumMeta):
        def __eq__(cls, other):
            return True

        __hash__ = enum.EnumMeta.__hash__


    class Equal(enum.Enum, metaclass=EqualToAll):
        A = "a"

        @classmethod
        def _missing_(cls, value):
            open(MARK, "w").write("ran")
            return cls.A
    """
)
MARKED = "open('{name}_ran.txt', 'w').write('ran')\n"
SPOOF = textwrap.dedent(
    """
    from torch import nn


    class Net(nn.Module):
        pass


    class PreTrainedConfig:
        __module__ = "transformers.configuration_utils"


    class SpoofConfig(PreTrainedConfig):
        pass


    class EqualToAll(type):
        def __eq__(cls, other):
            return True

        __hash__ = type.__hash__


    class EqualConfig(metaclass=EqualToAll):
        pass
    """
)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("loading")
    (d / "hooked_enums.py").write_text(HOOKED)
    (d / "not_enums.py").write_text(
        MARKED.format(name="not_enums") + "class Format(str):\n    NHWC = 'NHWC'\n"
    )
    (d / "fake_config.py").write_text(
        MARKED.format(name="fake_config") + "class PreTrainedConfig:\n    pass\n"
    )
    (d / "fake_subconfig.py").write_text(
        MARKED.format(name="fake_subconfig")
        + "from fake_config import PreTrainedConfig\n\nclass BertConfig(PreTrainedConfig):\n    pass\n"
    )
    (d / "transformers_fake").mkdir()
    (d / "transformers_fake" / "__init__.py").write_text("")
    (d / "transformers_fake" / "configuration_utils.py").write_text(
        MARKED.format(name="transformers_fake") + "class PreTrainedConfig:\n    pass\n"
    )
    (d / "spoof_models.py").write_text(SPOOF)
    return d


@pytest.fixture
def here(work: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(work)  # as the CLI runs: the directory beside the model is importable (last)
    return work


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()


def _archive(d: Path, name: str, pickle: bytes) -> Path:
    """A torch.save archive whose data.pkl is ``pickle``."""
    torch.save({"x": 1}, d / name)
    with zipfile.ZipFile(d / name) as src:
        entries = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    with zipfile.ZipFile(d / name, "w", zipfile.ZIP_STORED) as dst:
        for entry, data in entries:
            dst.writestr(entry, pickle if entry.endswith("data.pkl") else data)
    return d / name


def refusal(path: Path) -> str:
    with pytest.raises(UnsafePickleError) as info:
        compactor.load(path)
    return str(info.value)


def holding(d: Path, name: str, attribute: Any) -> Path:
    """``torch.save`` of a module that keeps ``attribute``, as a model keeps its activation function."""
    model = nn.Sequential(nn.Linear(4, 4))
    model.act = attribute
    torch.save(model, d / name)
    return d / name


def ran(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*ran.txt"))


# torch functions that read or write files, run processes or threads, load libraries, read raw memory,
# hand back uninitialised memory, build unchecked sparse tensors or change global state; and the builtins
# that stay refused
NOT_OPERATORS = [
    ("torch.serialization", "load"),
    ("torch", "load"),
    ("torch", "save"),
    ("torch.hub", "load"),
    ("torch.hub", "download_url_to_file"),
    ("torch.jit", "load"),
    ("torch.ops", "load_library"),
    ("torch._C", "_load_for_lite_interpreter"),
    ("torch._C", "import_ir_module"),
    ("torch", "import_ir_module"),
    ("torch", "from_file"),
    ("torch", "fork"),
    ("torch", "_from_blob"),
    ("torch", "frombuffer"),
    ("torch", "empty"),
    ("torch", "sparse_coo_tensor"),
    ("torch", "_unsafe_index_put"),
    ("torch", "manual_seed"),
    ("torch", "set_num_threads"),
    ("torch", "use_deterministic_algorithms"),
    ("torch", "compile"),
    ("torch._C._nn", "_parse_to"),
    ("torch.utils.cpp_extension", "load"),
    ("builtins", "getattr"),
    ("builtins", "eval"),
    ("os", "system"),
    ("subprocess", "Popen"),
]


@pytest.mark.parametrize(("module", "name"), NOT_OPERATORS, ids=[f"{m}.{n}" for m, n in NOT_OPERATORS])
def test_torch_functions_that_are_not_pure_operators_are_refused(here: Path, module: str, name: str) -> None:
    path = _archive(here, "function.pt", b"\x80\x02" + _global(module, name) + b".")
    message = refusal(path)
    assert message.startswith(f"{path} needs the global {module}.{name}, "), message
    assert message.endswith("pass --trust-pickle (Python: trust_pickle=True) only if you trust the file")


@pytest.mark.parametrize(
    "function",
    [torch.nn.functional.gelu, torch.nn.functional.relu, torch.special.expit, torch.linalg.vector_norm],
    ids=["gelu", "relu", "expit", "vector_norm"],
)
def test_torch_operators_a_model_keeps_load(here: Path, function: Callable[..., Any]) -> None:
    model = compactor.load(holding(here, "operator.pt", function))
    assert model.act is function


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        (
            functools.partial(os.system, "touch partial_ran.txt"),
            f"needs the global {os.system.__module__}.system, not a module, pruning method, config, enum, "
            f"container or torch operator",
        ),
        (
            functools.partial(nn.LayerNorm, 4, eps=builtins.getattr),
            "needs the global builtins.getattr, not a module, pruning method, config, enum, container or "
            "torch operator",
        ),
        (
            functools.partial(lm.Format, "NHWC"),
            "wraps _loading_models.Format in functools.partial while loading, which torch.save(model) never "
            "does (it saves a partial of a module class or a torch operator, such as "
            "partial(nn.LayerNorm, eps=1e-6))",
        ),
        (
            functools.partial(OrderedDict, a=1),
            "wraps collections.OrderedDict in functools.partial while loading",
        ),
    ],
    ids=["os.system", "getattr-argument", "enum", "container"],
)
def test_a_partial_of_anything_but_a_module_class_or_operator_is_refused(
    here: Path, attribute: functools.partial[Any], message: str
) -> None:
    path = holding(here, "partial.pt", attribute)
    assert f"{path} {message}" in refusal(path)
    assert ran(here) == []


def test_a_partial_whose_state_swaps_its_function_is_refused(here: Path) -> None:
    """``partial.__setstate__`` replaces the function the constructor was given."""
    layer_norm = _global("torch.nn.modules.normalization", "LayerNorm")
    swapped = _global("_loading_models", "Format") + b")}Nt"  # state: (Format, (), {}, None)
    pickle = b"\x80\x02" + _global("functools", "partial") + layer_norm + b"\x85R(" + swapped + b"b."
    path = _archive(here, "swapped.pt", pickle)
    assert f"{path} wraps _loading_models.Format in functools.partial while loading" in refusal(path)


ENUM = _global("hooked_enums", "Plain")


@pytest.mark.parametrize(
    ("name", "pickle", "message"),
    [
        (
            "missing.pt",
            _global("hooked_enums", "Missing") + _str("zz") + b"\x85R.",
            "calls hooked_enums.Missing while loading, which torch.save(model) never does (its lookup runs "
            "the enum's own code)",
        ),
        (
            "metaclass.pt",
            _global("hooked_enums", "Called") + _str("a") + b"\x85R.",
            "calls hooked_enums.Called while loading, which torch.save(model) never does (its lookup runs the "
            "enum's own code)",
        ),
        (
            "replaced_new.pt",
            _global("hooked_enums", "Replaced") + _str("zz") + b"\x85R.",
            "calls hooked_enums.Replaced while loading, which torch.save(model) never does (its lookup runs "
            "the enum's own code)",
        ),
        (
            "equal_to_all.pt",
            _global("hooked_enums", "Equal") + _str("zz") + b"\x85R.",
            "calls hooked_enums.Equal while loading, which torch.save(model) never does (its lookup runs the "
            "enum's own code)",
        ),
        (
            "newobj.pt",
            _global("hooked_enums", "Missing") + _str("zz") + b"\x85\x81.",
            "calls hooked_enums.Missing.__new__ while loading, which torch.save(model) never does (it saves an "
            "enum member as a lookup of its value)",
        ),
        (
            "newobj_plain.pt",
            ENUM + _str("a") + b"\x85\x81.",
            "calls hooked_enums.Plain.__new__ while loading",
        ),
        (
            "functional_api.pt",
            ENUM + _str("Made") + _str("X Y") + b"\x86R.",
            "calls hooked_enums.Plain with other than one value while loading",
        ),
        (
            "changed_member.pt",
            ENUM + _str("a") + b"\x85R}" + _str("_value_") + _str("b") + b"sb.",
            "changes a member of hooked_enums.Plain while loading, which torch.save(model) never does (enum "
            "members are shared; it saves one as its value)",
        ),
    ],
)
def test_an_enum_is_only_ever_looked_up_by_its_value(
    here: Path, name: str, pickle: bytes, message: str
) -> None:
    path = _archive(here, name, b"\x80\x02" + pickle)
    assert f"{path} {message}" in refusal(path)
    assert ran(here) == []
    if name == "changed_member.pt":  # hooked_enums was imported by the judging: its source shows enums
        assert sys.modules["hooked_enums"].Plain.A.value == "a"


def test_an_enum_from_a_module_that_is_not_allowed_is_refused(here: Path) -> None:
    assert "plistlib" not in sys.modules, "the test needs a standard-library module nothing imported"
    path = _archive(here, "stdlib_enum.pt", b"\x80\x02" + _global("plistlib", "PlistFormat") + b"K\x01\x85R.")
    assert refusal(path).startswith(
        f"{path} needs the global plistlib.PlistFormat, a standard-library module the model does not need "
        f"(not imported)"
    )
    path = _archive(
        here, "not_enum.pt", b"\x80\x02" + _global("not_enums", "Format") + _str("NHWC") + b"\x85R."
    )
    assert refusal(path).startswith(
        f"{path} needs the global not_enums.Format, not a module class, config or enum by its source (not imported)"
    )
    assert "plistlib" not in sys.modules and "not_enums" not in sys.modules and ran(here) == []


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("fake_config", "PreTrainedConfig"),
        ("fake_subconfig", "BertConfig"),
        ("transformers_fake.configuration_utils", "PreTrainedConfig"),
    ],
)
def test_a_class_named_like_a_hugging_face_config_elsewhere_is_refused_unimported(
    here: Path, module: str, name: str
) -> None:
    path = _archive(here, "fake_config.pt", b"\x80\x02" + _global(module, name) + b")\x81.")
    assert refusal(path).startswith(
        f"{path} needs the global {module}.{name}, not a module class, config or enum by its source (not imported)"
    )
    assert module not in sys.modules and ran(here) == []


@pytest.mark.parametrize("name", ["SpoofConfig", "EqualConfig"])
def test_a_config_is_one_of_transformers_own_classes_not_a_name(
    here: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """``spoof_models`` is imported (for its module class, as when a pickle names it first); its config classes
    only say they are transformers' (by ``__module__``, or by comparing equal to every class)."""
    monkeypatch.syspath_prepend(str(here))
    spoof = importlib.import_module("spoof_models")
    assert spoof.SpoofConfig.__mro__[1].__module__ == "transformers.configuration_utils"
    assert spoof.EqualConfig == transformers_config()
    path = _archive(here, "spoof.pt", b"\x80\x02" + _global("spoof_models", name) + b")\x81.")
    assert refusal(path).startswith(
        f"{path} needs the global spoof_models.{name}, not a module, pruning method, config, enum, "
        f"container or torch operator"
    )


def transformers_config() -> type:
    transformers = pytest.importorskip("transformers")
    config: type = transformers.PretrainedConfig
    return config


@pytest.mark.parametrize(
    ("name", "make", "line"),
    [
        (
            "partial_enum.pt",
            lambda d: holding(d, "partial_enum.pt", functools.partial(lm.Format, "NHWC")),
            "wraps _loading_models.Format in functools.partial while loading",
        ),
        (
            "enum_new.pt",
            lambda d: _archive(
                d, "enum_new.pt", b"\x80\x02" + _global("hooked_enums", "Missing") + _str("z") + b"\x85\x81."
            ),
            "calls hooked_enums.Missing.__new__ while loading",
        ),
    ],
)
def test_the_command_refuses_them_with_one_line(
    work: Path, name: str, make: Callable[[Path], Path], line: str
) -> None:
    make(work)
    r = cli(name, "-o", "refused_out.pt", "--input-shape", "1,4", cwd=work)
    assert r.returncode == 2
    assert error_line(r).startswith(f"error: {name} {line}")
    assert not (work / "refused_out.pt").exists() and ran(work) == []
