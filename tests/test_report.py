"""What the report says, in JSON and in the table, beyond channel counts."""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.nn.utils import prune

import compactor


def test_unstructured_masks_are_said_plainly_with_per_layer_sparsity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    prune.l1_unstructured(model[2], "weight", amount=0.3)
    _, report = compactor.compact(model, torch.randn(2, 32))
    assert report.params["after"] == report.params["before"]  # nothing structured to remove
    d = json.loads(json.dumps(report.to_dict()))
    by_name = {layer["name"]: layer for layer in d["sparsity"]}
    assert by_name["0.weight"]["zeros"] == round(0.6 * 64 * 32) and by_name["0.weight"]["zero_rows"] == 0
    assert by_name["2.weight"]["zeros"] == round(0.3 * 8 * 64)
    text = report.table()
    assert "zeroed channels: none" in text
    assert "unstructured masks" in text and "--sparse-storage" in text and "0.weight 60%" in text


def test_structured_masks_give_no_unstructured_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    with torch.no_grad():
        model[0].bias[model[0].weight_mask.sum(1) == 0] = 0.0
    small, report = compactor.compact(model, torch.randn(2, 32))
    assert small[0].out_features == 32
    assert not report.warnings and report.to_dict()["sparsity"] == []


def test_unmeasured_backend_is_named_in_the_table() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    _, report = compactor.compact(model, torch.randn(1, 4))
    report = report.with_extra(
        latency_ms={"torch-cpu": {"before": 2.0, "after": 1.0}}, not_measured={"cuda": "no GPU"}
    )
    text = report.table()
    assert "latency torch-cpu (ms)" in text and "0.500" in text
    assert "latency cuda: not measured (no GPU)" in text
    assert report.to_dict()["not_measured"] == {"cuda": "no GPU"}


def test_odd_widths_get_a_round_to_hint_unless_rounded() -> None:
    """64 -> 31 neurons is off a multiple of 8: the table suggests --round-to 8; with round_to=8 it is 32 and
    nothing is said."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    mask = torch.ones(64, 16)
    mask[:33] = 0
    prune.custom_from_mask(model[0], "weight", mask)
    with torch.no_grad():
        model[0].bias[:33] = 0.0
    x = torch.randn(2, 16)
    small, report = compactor.compact(model, x)
    assert small[0].out_features == 31
    assert report.to_dict()["round_to"] == 1
    assert (
        "hint: 2 rebuilt layer(s) now have channel counts off a multiple of 8 (0: 31, 2: 31)"
        in report.table()
    )
    assert "--round-to 8 (round_to=8)" in report.table()
    small, report = compactor.compact(model, x, round_to=8)
    assert small[0].out_features == 32
    assert "hint:" not in report.table()
