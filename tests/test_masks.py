"""Baking masks: the function is unchanged, and layers that share a weight keep their own values."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

import compactor
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
