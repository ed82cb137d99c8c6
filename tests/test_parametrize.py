"""Models pruned with ``torch.nn.utils.parametrize`` and ``torch.ao.pruning``: in memory and as state_dicts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import parametrize

import compactor
from compactor.errors import StateDictError
from compactor.io.state_dict import load_state_dict_model


class RowMask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.view(-1, *([1] * (w.dim() - 1)))


def test_parametrized_conv_compacts_and_the_callers_model_keeps_working() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        model[0].bias[:3] = 0.0
    parametrize.register_parametrization(
        model[0], "weight", RowMask(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1.0]))
    )
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    small, report = compactor.compact(model, x)
    assert (small[0].out_channels, small[2].in_channels) == (5, 5)
    assert not parametrize.is_parametrized(small[0])
    torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)
    assert parametrize.is_parametrized(model[0])  # untouched, and still runs: the class was not shared
    torch.testing.assert_close(model(x), expected)
    assert report.fates["removed"] == 3


def ao_sparsified_mlp() -> tuple[nn.Module, WeightNormSparsifier]:
    """Half the rows of the first Linear zeroed by torch.ao.pruning (parametrization attached)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 16), zeros_per_block=16)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    return model.eval(), sparsifier


def ao_pruned_mlp() -> nn.Module:
    return ao_sparsified_mlp()[0]


def test_torch_ao_sparsifier_model_compacts() -> None:
    model = ao_pruned_mlp()
    rows_zero = int((model[0].weight.abs().sum(1) == 0).sum())
    assert rows_zero == 16
    x = torch.randn(5, 16)
    small, report = compactor.compact(model, x)
    # A dead row emits its bias b; ReLU(b) is 0 (removed) or a constant folded into the next bias.
    bias = model[0].bias.detach()[model[0].weight.abs().sum(1) == 0]
    assert report.fates["removed"] == int((bias <= 0).sum()) and report.fates["folded"] == int(
        (bias > 0).sum()
    )
    assert small[0].out_features == 32 - rows_zero
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.fixture
def mlp_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mlp_arch.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def mlp():
                return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mlp_arch:mlp"


def test_torch_ao_state_dict_after_squash_mask(tmp_path: Path, mlp_arch: str) -> None:
    model, sparsifier = ao_sparsified_mlp()
    x = torch.randn(3, 16)
    expected = model(x)
    sparsifier.squash_mask()  # the documented way: bake the masks into the weights, then save
    assert not parametrize.is_parametrized(model[0])
    torch.save(model.state_dict(), tmp_path / "ao.pt")
    loaded = load_state_dict_model(tmp_path / "ao.pt", mlp_arch).eval()
    torch.testing.assert_close(loaded(x), expected)
    small, _ = compactor.compact(loaded, x)
    assert small[0].out_features == 16
    torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)


def test_parametrized_state_dict_with_saved_row_mask(tmp_path: Path, mlp_arch: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    mask = (torch.arange(32) % 4 != 0).float()
    parametrize.register_parametrization(model[0], "weight", RowMask(mask))  # persistent buffer: in the file
    assert "0.parametrizations.weight.0.mask" in model.state_dict()
    torch.save(model.state_dict(), tmp_path / "rows.pt")
    loaded = load_state_dict_model(tmp_path / "rows.pt", mlp_arch).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert int((loaded[0].weight.abs().sum(1) == 0).sum()) == 8


def test_ao_state_dict_without_masks_is_refused(tmp_path: Path, mlp_arch: str) -> None:
    model = ao_pruned_mlp()
    assert "0.parametrizations.weight.original" in model.state_dict()
    assert not any(k.endswith(".mask") for k in model.state_dict())  # ao masks are not persistent
    torch.save(model.state_dict(), tmp_path / "ao_raw.pt")
    with pytest.raises(StateDictError, match=r"saved without its mask.*squash_mask\(\)"):
        load_state_dict_model(tmp_path / "ao_raw.pt", mlp_arch)
