"""Sparse storage: the file shrinks with the non-zeros and reloads every tensor bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _formats_models import SmallCNN, example_input, trained, unstructured
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.errors import ExportError, InputFileError, StateDictError
from compactor.io import save as formats
from compactor.io import sparse
from compactor.io.sparse import sparsity_report
from compactor.modules import bake_masks, clone_module

X = example_input()


def baked(model: nn.Module) -> nn.Module:
    copy = clone_module(model)
    bake_masks(copy)
    return copy


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert sparse._bit_equal(a[key], b[key]), key


def test_sparsity_report_counts_zeros_per_layer() -> None:
    rows = {r.name: r for r in sparsity_report(unstructured(0.9))}
    assert list(rows) == ["conv1.weight", "conv2.weight", "fc.weight"]
    for row in rows.values():
        assert row.zeros == round(0.9 * row.total)  # random_unstructured prunes round(amount * n) weights
    assert rows["conv2.weight"].shape == (16, 8, 3, 3) and rows["conv2.weight"].zero_rows == 0
    assert rows["fc.weight"].to_dict()["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_file_shrinks_with_the_non_zeros_and_reloads_bit_exact(tmp_path: Path) -> None:
    sizes = {}
    for amount in (0.5, 0.9):
        model = unstructured(amount)
        report = sparse.save_sparse(model, tmp_path / f"s{amount}.safetensors")
        assert report.sparse_bytes == (tmp_path / f"s{amount}.safetensors").stat().st_size
        assert report.sparse_tensors == 3  # the three pruned weights; biases and BN stay dense
        sizes[amount] = report.sparse_bytes
        loaded = sparse.load_sparse(tmp_path / f"s{amount}.safetensors", SmallCNN).eval()
        assert_bit_equal(loaded.state_dict(), baked(model).state_dict())
        assert torch.equal(loaded(X), model(X))
    assert sizes[0.9] < sizes[0.5] < report.dense_bytes


def test_size_follows_the_non_zeros(tmp_path: Path) -> None:
    layer = nn.Linear(512, 512)
    prune.l1_unstructured(layer, "weight", amount=0.9)  # about half the pruned weights become -0.0
    exact = sparse.save_sparse(layer, tmp_path / "exact.safetensors")
    # 10% of the values (4 bytes each) + 1 bit per entry + 1 bit per zero for its sign
    assert exact.zero_signs == 1
    assert 0.15 < exact.ratio < 0.165, exact.summary()
    assert exact.dense_bytes > 512 * 512 * 4
    loaded = sparse.load_sparse(tmp_path / "exact.safetensors", lambda: nn.Linear(512, 512))
    assert_bit_equal(loaded.state_dict(), baked(layer).state_dict())

    unsigned = sparse.save_sparse(layer, tmp_path / "unsigned.safetensors", keep_zero_signs=False)
    assert unsigned.zero_signs == 0 and 0.125 < unsigned.ratio < 0.135, unsigned.summary()
    loaded = sparse.load_sparse(tmp_path / "unsigned.safetensors", lambda: nn.Linear(512, 512))
    assert torch.equal(loaded.weight, baked(layer).weight)  # -0.0 == +0.0
    assert not torch.signbit(loaded.weight[loaded.weight == 0]).any()


def test_dense_tensors_stay_dense(tmp_path: Path) -> None:
    model = trained(SmallCNN())
    report = sparse.save_sparse(model, tmp_path / "dense.safetensors")
    assert report.sparse_tensors == 0
    assert report.sparse_bytes <= report.dense_bytes + 200  # only the longer metadata
    assert_bit_equal(
        sparse.load_sparse(tmp_path / "dense.safetensors", SmallCNN).state_dict(), model.state_dict()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bit_exact_for_signed_zeros_nan_and_inf(tmp_path: Path, dtype: torch.dtype) -> None:
    layer = nn.Linear(16, 8).to(dtype)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), -1.5e-3])
        layer.weight[3, 7] = 2.0
    sparse.save_sparse(layer, tmp_path / "l.safetensors")
    loaded = sparse.load_sparse(tmp_path / "l.safetensors", lambda: nn.Linear(16, 8).to(dtype))
    assert_bit_equal(loaded.state_dict(), layer.state_dict())
    assert torch.signbit(loaded.weight[0, 0])  # -0.0 kept its sign


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(32, 32, bias=False)
            self.decoder = nn.Linear(32, 32, bias=False)
            self.decoder.weight = self.encoder.weight

    model = Tied()
    prune.l1_unstructured(model.encoder, "weight", amount=0.8)
    prune.remove(model.encoder, "weight")
    model.decoder.weight = model.encoder.weight
    sparse.save_sparse(model, tmp_path / "t.safetensors")
    tensors, info = sparse.encode(model.state_dict())
    assert info["tied"] == {"decoder.weight": "encoder.weight"}
    assert sorted(tensors) == ["encoder.weight::mask", "encoder.weight::values", "encoder.weight::zero_signs"]
    loaded = sparse.load_sparse(tmp_path / "t.safetensors", Tied)
    assert torch.equal(loaded.decoder.weight, model.encoder.weight)

    untied = Tied()
    untied.decoder.weight = nn.Parameter(untied.encoder.weight.detach() * 2)
    sparse.save_sparse(untied, tmp_path / "untied.safetensors")
    with pytest.raises(
        StateDictError,
        match=r"untied.safetensors: encoder.weight and decoder.weight are one tied "
        r"tensor in the architecture but differ in the file; build the model without the tie",
    ):
        sparse.load_sparse(tmp_path / "untied.safetensors", Tied)


def test_compacted_and_sparse_model_loads_into_the_dense_architecture(tmp_path: Path) -> None:
    model = unstructured(0.8)
    prune.ln_structured(model.conv2, "weight", amount=0.25, n=2, dim=0)  # whole filters as well
    small, _ = compactor.compact(model, X)
    assert small.conv2.out_channels < 16
    sparse.save_sparse(small, tmp_path / "both.safetensors")
    for arch in (SmallCNN, "_formats_models:small_cnn"):
        loaded = compactor.load(
            tmp_path / "both.safetensors", arch=arch
        ).eval()  # compactor.load sees sparse storage
        assert_bit_equal(loaded.state_dict(), small.state_dict())
        assert torch.equal(loaded(X), small(X))


def test_loads_into_a_given_module(tmp_path: Path) -> None:
    model = unstructured(0.7)
    sparse.save_sparse(model, tmp_path / "m.safetensors")
    target = SmallCNN()
    assert sparse.load_sparse(tmp_path / "m.safetensors", target) is target
    assert_bit_equal(target.state_dict(), baked(model).state_dict())


def test_refuses_other_files(tmp_path: Path) -> None:
    formats.save_output(trained(SmallCNN()), tmp_path / "dense.safetensors", X)
    with pytest.raises(
        InputFileError,
        match=r"dense.safetensors is not a compactor sparse-storage file \(no "
        r"'compactor.storage' metadata\); load a dense .safetensors with compactor.load",
    ):
        sparse.load_sparse(tmp_path / "dense.safetensors", SmallCNN)
    with pytest.raises(
        InputFileError, match=r"nothing.safetensors does not exist or is not a file; check the path"
    ):
        sparse.load_sparse(tmp_path / "nothing.safetensors", SmallCNN)


def test_a_failed_check_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(path: os.PathLike[str]) -> dict[str, torch.Tensor]:
        return {k: torch.zeros_like(v) for k, v in baked(unstructured()).state_dict().items()}

    monkeypatch.setattr(sparse, "decode_file", corrupt)
    with pytest.raises(
        ExportError, match=r"sparse storage does not reproduce conv1.weight exactly; nothing was"
    ):
        sparse.save_sparse(unstructured(), tmp_path / "u.safetensors")
    assert os.listdir(tmp_path) == []
