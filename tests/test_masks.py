"""Baking masks: the function is unchanged, and layers that share a weight keep their own values."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.errors import VerificationError
from compactor.modules import bake_masks, clone_module, has_pruning_state


class TiedCodec(nn.Module):
    """An embedding and an output layer sharing one weight (as BERT's decoder shares the word embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.hidden = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 12, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.relu(self.hidden(self.embed(ids))))


def test_baking_a_tied_weight_leaves_the_other_layer_alone() -> None:
    torch.manual_seed(0)
    model = TiedCodec().eval()
    prune.l1_unstructured(model.decoder, "weight", amount=0.5)
    ids = torch.randint(0, 12, (3, 5))
    expected = model(ids)
    embed_before = model.embed.weight.detach().clone()

    baked = clone_module(model)
    records = bake_masks(baked)

    assert [(r.layer, r.tensor, r.zeros, r.total) for r in records] == [("decoder", "weight", 48, 96)]
    assert not has_pruning_state(baked)
    torch.testing.assert_close(baked(ids), expected, rtol=0, atol=0)
    assert torch.equal(baked.embed.weight, embed_before)  # not masked through the tie
    assert int((baked.decoder.weight == 0).sum()) == 48


def test_compacting_a_model_with_a_pruned_tied_weight_verifies() -> None:
    torch.manual_seed(0)
    model = TiedCodec().eval()
    prune.ln_structured(model.hidden, "weight", amount=0.5, n=2, dim=0)
    with torch.no_grad():
        model.hidden.bias[model.hidden.weight_mask.sum(1) == 0] = -1.0  # dead: ReLU(-1) = 0
    prune.l1_unstructured(model.decoder, "weight", amount=0.25)
    ids = torch.randint(0, 12, (3, 5))
    small, report = compactor.compact(model, ids)
    assert small.hidden.out_features == 4
    torch.testing.assert_close(small(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert report.max_abs_error <= 1e-5


class Attending(nn.Module):
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``: a pruning hook on
    ``out_proj`` never runs, so its ``weight`` stays what it was when the mask was applied."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mid = nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(torch.relu(self.mid(self.att(h, h, h)[0])))


def _fine_tuned_attending() -> Attending:
    torch.manual_seed(0)
    model = Attending().eval()
    prune.ln_structured(model.inp, "weight", 0.25, n=1, dim=0)
    prune.ln_structured(model.att.out_proj, "weight", 0.25, n=1, dim=0)
    prune.ln_structured(model.mid, "weight", 0.25, n=1, dim=0)
    with torch.no_grad():  # a fine-tuning step: weight_orig moves, the hook-less weight does not
        model.att.out_proj.weight_orig.add_(torch.randn_like(model.att.out_proj.weight_orig) * 0.5)
    return model


def test_a_pruned_weight_read_without_its_hook_is_compacted_as_its_masks_define() -> None:
    """The stale ``out_proj.weight`` is said; the compacted model gives what ``prune.remove`` gives (not the
    stale value, which verification used to absorb into a rounding floor of 1.9 on outputs of about 1)."""
    model = _fine_tuned_attending()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    held = model(x).detach()
    small, report = compactor.compact(model, x)
    (stale,) = [w for w in report.warnings if "pruning hook never recomputes" in w]
    assert stale.startswith("att.out_proj.weight: ")
    assert "rounding_floor" not in report.extra and report.max_abs_error <= report.tolerance
    assert [(c.name, c.out_after, c.in_after) for c in report.layers if c.name in ("mid", "out")] == [
        ("mid", 24, 32),
        ("out", 8, 24),
    ]
    prune.remove(model.inp, "weight")
    prune.remove(model.att.out_proj, "weight")
    prune.remove(model.mid, "weight")
    with torch.no_grad():
        removed, got = model(x), small(x)
    torch.testing.assert_close(got, removed, rtol=1e-5, atol=1e-5)
    assert float((got - held).abs().max()) > 0.1  # the stale weight gave something else


def test_a_baked_model_that_is_not_the_held_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the refresh, the stale weight makes the float32 comparison fail by 0.5, float64 copies of the
    baked and compacted models agree, and the rounding floor (masked against the baked twin) would pass it:
    the check that the baked model gives the held model's outputs stops that, before anything is written."""
    from compactor.engine import masks

    monkeypatch.setattr(masks, "_refresh", lambda clone, hooked: [])
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(VerificationError, match="masks baked in does not give the outputs"):
        compactor.compact(_fine_tuned_attending(), x)
