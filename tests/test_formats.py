"""Output formats: every format round-trips to the same outputs, and refuses bad input with one line."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _formats_models import DataDependent, LayerScaleCNN, SmallCNN, channel_pruned, example_input, trained
from torch import nn

import compactor
from compactor.errors import ExportError, InputFileError, StateDictError, UnsupportedFormatError
from compactor.io import save as formats
from compactor.io.safetensors import MANIFEST_KEY

X = example_input()


@pytest.fixture(scope="module")
def small() -> nn.Module:
    model, _ = compactor.compact(channel_pruned(), X)
    assert model.conv1.out_channels == 5 and model.conv2.out_channels == 12  # really compacted
    return model


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize(
    ("name", "explicit", "expected"),
    [
        ("a.pt", None, "pt"),
        ("a.PT2", None, "pt2"),
        ("a.onnx", None, "onnx"),
        ("a.safetensors", None, "safetensors"),
        ("a.bin", "onnx", "onnx"),
        ("a.pt", ".pt2", "pt2"),
    ],
)
def test_format_from_suffix_or_explicit(name: str, explicit: str | None, expected: str) -> None:
    assert formats.format_for(name, explicit) == expected


def test_unknown_suffix_lists_the_supported_ones(tmp_path: Path, small: nn.Module) -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        formats.save_output(small, tmp_path / "small.bin", X)
    assert str(info.value) == (
        f"-o {tmp_path / 'small.bin'}: unknown suffix '.bin'; use one of .pt, .pth, .pt2, .onnx, .safetensors "
        f"or pass --format pt|pt2|onnx|safetensors|hf"
    )
    with pytest.raises(
        UnsupportedFormatError, match=r"--format 'tflite' is not supported; choose one of pt\|pt2"
    ):
        formats.format_for("x.pt", "tflite")
    assert files_in(tmp_path) == []


def test_pt_round_trip(tmp_path: Path, small: nn.Module) -> None:
    size = formats.save_output(small, tmp_path / "small.pt", X)
    assert size == (tmp_path / "small.pt").stat().st_size
    reloaded = torch.load(tmp_path / "small.pt", weights_only=False)
    assert torch.equal(reloaded(X), small(X))


def test_pt2_runs_without_the_class_or_compactor(tmp_path: Path, small: nn.Module) -> None:
    formats.save_output(small, tmp_path / "small.pt2", X)
    torch.save(X, tmp_path / "x.pt")
    script = (
        "import sys\n"
        "sys.modules['compactor'] = None  # importing compactor or the model's module now fails\n"
        "sys.modules['_formats_models'] = None\n"
        "import torch\n"
        "program = torch.export.load('small.pt2')\n"
        "torch.save(program.module()(torch.load('x.pt')), 'y.pt')\n"
        "assert not any(n.startswith(('compactor', '_formats_models')) and m for n, m in sys.modules.items())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), small(X), rtol=1e-5, atol=1e-5)


def test_onnx_round_trip_is_one_file(tmp_path: Path, small: nn.Module) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    formats.save_output(small, tmp_path / "small.onnx", X)
    assert files_in(tmp_path) == ["small.onnx"]  # weights inside, no sidecar, no temporary left
    session = onnxruntime.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), small(X).detach(), rtol=1e-4, atol=1e-5)


def test_safetensors_loads_into_the_dense_architecture(tmp_path: Path, small: nn.Module) -> None:
    path = tmp_path / "small.safetensors"
    formats.save_output(small, path, X, arch=SmallCNN)
    head = path.read_bytes()
    (length,) = struct.unpack("<Q", head[:8])
    header = json.loads(head[8 : 8 + length])  # safetensors: a JSON header and raw bytes, no pickle
    spec = json.loads(header["__metadata__"][MANIFEST_KEY])
    assert spec["layers"]["conv1"] == {
        "type": "Conv2d",
        "out": 5,
        "in": 3,
        "bias": None,
        "attrs": {"in_channels": 3, "out_channels": 5, "groups": 1},
    }
    for arch in (SmallCNN, "_formats_models:small_cnn"):
        loaded = compactor.load(path, arch=arch).eval()
        assert {k: v.shape for k, v in loaded.state_dict().items()} == {
            k: v.shape for k, v in small.state_dict().items()
        }
        assert torch.equal(loaded(X), small(X))


def test_safetensors_rebuilds_grouped_convs_group_by_group(tmp_path: Path) -> None:
    """A ResNeXt block whose grouped conv lost inputs and outputs: rebuilt from the dense class with the
    same groups and per-group widths, then loaded bit-exactly (no pickle)."""
    from zoo import CASES, ResNeXtBlock

    case = next(c for c in CASES if c.name == "resnext_block")
    x = case.inputs()
    small, _ = compactor.compact(case.model(), x)
    assert (small.conv2.in_channels, small.conv2.out_channels, small.conv2.groups) == (16, 24, 4)
    path = tmp_path / "resnext.safetensors"
    formats.save_output(small, path, x, arch=ResNeXtBlock)
    loaded = compactor.load(path, arch=ResNeXtBlock).eval()
    assert (loaded.conv2.in_channels, loaded.conv2.out_channels, loaded.conv2.groups) == (16, 24, 4)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in small.state_dict().items()
    }
    assert torch.equal(loaded(x), small(x))


def test_safetensors_rebuilds_bare_parameters_and_added_biases(tmp_path: Path) -> None:
    model = trained(LayerScaleCNN())
    with torch.no_grad():
        model.conv1.weight[:3] = 0
        model.conv1.bias[:3] = 0
    small, _ = compactor.compact(model, X)
    assert small.gamma.shape == (5, 1, 1)
    formats.save_output(small, tmp_path / "ls.safetensors", X, arch=LayerScaleCNN)
    assert torch.equal(compactor.load(tmp_path / "ls.safetensors", arch=LayerScaleCNN)(X), small(X))

    no_bias = trained(SmallCNN())  # conv1 is built without a bias; a folded constant may give it one
    with_bias = copy.deepcopy(no_bias)
    with_bias.conv1.bias = nn.Parameter(torch.full((8,), 0.25))
    formats.save_output(with_bias, tmp_path / "bias.safetensors", X, arch=SmallCNN)
    loaded = compactor.load(tmp_path / "bias.safetensors", arch=SmallCNN).eval()
    assert torch.equal(loaded.conv1.bias, with_bias.conv1.bias)
    assert torch.equal(loaded(X), with_bias(X))


def test_safetensors_refuses_another_architecture(tmp_path: Path, small: nn.Module) -> None:
    path = tmp_path / "small.safetensors"
    formats.save_output(small, path, X)
    with pytest.raises(StateDictError) as info:
        compactor.load(path, arch=LayerScaleCNN)
    assert str(info.value) == (
        f"{path} has layer 'bn1' (BatchNorm2d) but the architecture has none; build the model the file was written from"
    )
    with pytest.raises(StateDictError) as info:
        compactor.load(path, arch=lambda: SmallCNN(width=2))
    assert str(info.value).startswith(
        f"{path}: layer 'conv1' has 5 output channels but the architecture only 2;"
    )


def test_safetensors_refuses_files_it_did_not_write(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from compactor.io.safetensors import load_safetensors

    save_file(SmallCNN().state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(
        InputFileError, match=r"has no compactor manifest \(metadata key 'compactor.manifest'\)"
    ):
        load_safetensors(tmp_path / "plain.safetensors", SmallCNN)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for load in (load_safetensors, lambda path, arch: compactor.load(path, arch=arch)):
        with pytest.raises(InputFileError, match=r"junk.safetensors is not a safetensors file \("):
            load(tmp_path / "junk.safetensors", SmallCNN)
        with pytest.raises(
            InputFileError, match=r"missing.safetensors does not exist or is not a file; check the path"
        ):
            load(tmp_path / "missing.safetensors", SmallCNN)


def test_load_reads_a_plain_safetensors_state_dict_into_its_architecture(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    dense = trained(SmallCNN()).eval()
    save_file(dense.state_dict(), str(tmp_path / "plain.safetensors"))
    loaded = compactor.load(tmp_path / "plain.safetensors", arch=SmallCNN)
    assert not loaded.training
    assert torch.equal(loaded(X), dense(X))


def test_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    model = DataDependent().eval()
    (tmp_path / "keep.pt2").write_bytes(b"previous")
    with pytest.raises(
        ExportError, match=r"^torch.export failed for DataDependent \(.*\); save as .pt or .safetensors"
    ):
        formats.save_output(model, tmp_path / "keep.pt2", torch.ones(1, 4))
    assert files_in(tmp_path) == ["keep.pt2"]
    assert (tmp_path / "keep.pt2").read_bytes() == b"previous"  # the old file is untouched


def test_export_keeps_the_training_flag(tmp_path: Path, small: nn.Module) -> None:
    small.train()
    try:
        formats.save_output(small, tmp_path / "small.safetensors", X)
        assert small.training
    finally:
        small.eval()


def test_masked_model_is_written_with_plain_weights(tmp_path: Path) -> None:
    masked = channel_pruned()
    formats.save_output(masked, tmp_path / "masked.safetensors", X, arch=SmallCNN)
    loaded = compactor.load(tmp_path / "masked.safetensors", arch=SmallCNN).eval()
    assert torch.equal(loaded(X), masked(X))


class _Cancelling(torch.nn.Module):
    """Adds and removes a large offset: float32 loses the low bits, float64 does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 3e3) - 3e3


def test_onnx_check_allows_runtime_rounding_only_as_large_as_torchs_own() -> None:
    from compactor.inputs import ExampleInputs
    from compactor.outputs import NOISE_FACTOR
    from compactor.outputs import runtime_tolerance as _runtime_tolerance

    x = ExampleInputs.of(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)))
    shallow = torch.nn.Sequential(torch.nn.Linear(16, 4)).eval()
    assert _runtime_tolerance(shallow, x, 1e-4) == 1e-4  # float32 rounding far below the tolerance
    noisy = torch.nn.Sequential(torch.nn.Linear(16, 4), _Cancelling()).eval()
    with torch.no_grad():
        out32 = noisy(x.args[0])
        out64 = noisy.double()(x.args[0].double())
    noisy.float()
    relative = (out32.double() - out64).abs().max().item() / max(1.0, out64.abs().max().item())
    assert relative > 1e-5
    assert _runtime_tolerance(noisy, x, 1e-6) == pytest.approx(NOISE_FACTOR * relative)
