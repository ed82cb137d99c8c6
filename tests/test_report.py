"""What the report says, in JSON and in the table, beyond channel counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from zoo import BY_NAME, CASES, CAT_RESIDUAL_SHAPE, ZooResults, bake, cat_residual_masked

import compactor
from compactor.engine.coupling import Join, build_groups
from compactor.engine.plan import Fate
from compactor.errors import GraphError
from compactor.inputs import ExampleInputs
from compactor.layers import Side
from compactor.layers.conv import ConvShrinker
from compactor.report.filters import COUPLED, UNTRACED, PrunedFilter


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


# --- pruned filters: every all-zero output row, and why each one kept stays --------------------------------


def _zero_rows(model: nn.Module) -> dict[str, list[int]]:
    """The oracle: per Conv/ConvTranspose/Linear (not depthwise) of the model, its all-zero output rows."""
    rows = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (
            isinstance(m, nn.modules.conv._ConvNd) and not m.groups == m.in_channels > 1
        ):
            w = m.weight.detach()
            if isinstance(m, nn.modules.conv._ConvTransposeNd):  # [in, out / groups, ...]: group g's rows
                per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
                w = torch.cat([w[g * per_in : (g + 1) * per_in].transpose(0, 1) for g in range(m.groups)])
                assert w.shape[0] == per_out * m.groups
            zero = (w.flatten(1) == 0).all(1)
            if zero.any():
                rows[name] = torch.nonzero(zero).flatten().tolist()
    return rows


def _kept(report: compactor.CompactionReport) -> dict[tuple[str, str], dict[str, list[int]]]:
    """(layer, fate) -> reason -> kept rows, from the JSON."""
    d = json.loads(json.dumps(report.to_dict()))["pruned_filters"]
    return {
        (k["layer"], k["fate"]): {r["reason"]: r["rows"] for r in k["reasons"]} for k in d["kept_by_layer"]
    }


def _kept_zeroed_rows(report: compactor.CompactionReport) -> set[tuple[str, int]]:
    return {(z.layer, z.channel) for z in report.zeroed if not Fate(z.fate).removed}


def test_residual_block_reports_the_filters_its_residual_partner_keeps(zoo_results: ZooResults) -> None:
    """conv2 and the downsample write one residual stream: where both are zero (2, 5, 8, 13) the channel goes;
    conv2's 1 and 21 and the downsample's 30 stay, each coupled to the other's live channel through the add."""
    model, _, report = zoo_results.get(BY_NAME["residual_block"])
    zero = _zero_rows(model)
    assert set(zero) == {"stem.0", "conv1", "conv2", "down.0"}
    coupled = {
        ("conv2", COUPLED): {
            "live in down.0 (through an add)": sorted(set(zero["conv2"]) - set(zero["down.0"]))
        },
        ("down.0", COUPLED): {
            "live in conv2 (through an add)": sorted(set(zero["down.0"]) - set(zero["conv2"]))
        },
    }
    assert coupled[("conv2", COUPLED)] == {"live in down.0 (through an add)": [1, 21]}
    kept = _kept(report)
    assert {k: v for k, v in kept.items() if k[1] == COUPLED} == coupled
    # every other kept filter is a zeroed channel kept by its plan (here single-writer groups: one row each)
    others = {
        (layer, row)
        for (layer, fate), by in kept.items()
        if fate != COUPLED
        for rows in by.values()
        for row in rows
    }
    assert others == _kept_zeroed_rows(report)
    total = sum(map(len, zero.values()))
    d = report.to_dict()["pruned_filters"]
    assert (d["total"], d["kept"], d["removed"]) == (total, 3 + len(others), total - 3 - len(others))
    assert d["kept_by_reason"][COUPLED] == 3
    text = " ".join(report.table().split())
    assert (
        f"pruned filters (all-zero output rows): {total}, of which {d['removed']} removed "
        f"({d['removed'] / total:.0%}), {d['kept']} kept: 3 coupled to a live channel" in text
    )
    assert (
        "conv2: 2 of 6 kept, coupled to a live channel (rows 1, 21): live in down.0 (through an add)" in text
    )
    assert "down.0: 1 of 5 kept, coupled to a live channel (row 30): live in conv2 (through an add)" in text
    assert "no longer exist" not in text and "100%" not in text


def test_resnext_block_names_the_grouped_conv_and_the_mask_that_would_balance_it(
    zoo_results: ZooResults,
) -> None:
    """conv2 (groups=4) zeroes 2, 2, 2, 3 filters per group: the odd one (26) stays, and the report says which
    further mask would let it go; conv3's filter 4 meets the stem's live channel 4 at the residual add."""
    model, _, report = zoo_results.get(BY_NAME["resnext_block"])
    zero = _zero_rows(model)
    assert zero["conv2"] == [0, 1, 8, 9, 16, 17, 24, 25, 26] and zero["stem.0"] == [0, 9, 15]
    kept = _kept(report)
    assert kept[("conv3", COUPLED)] == {"live in stem.0 (through an add)": [4]}
    assert kept[("conv2", Fate.KEPT_LAYOUT.value)] == {
        "conv2: grouped conv (groups=4) loses the same number of channels in every group; its groups would lose "
        "2, 2, 2, 3: zero 1 more in each of groups 0, 1, 2 (outputs 0-7, 8-15, 16-23) to balance them": [26]
    }
    d = report.to_dict()["pruned_filters"]
    assert d["total"] == sum(map(len, zero.values())) and d["kept_by_reason"][COUPLED] == 1


def test_concatenated_branches_added_to_their_input_are_coupled_through_both() -> None:
    """cat([a(x), b(x)]) + x: a's filter 1 stays for the stem's live channel 1, the stem's filter 5 for b's
    live filter 1; both meet at the add after the concatenation. Channel 2 is zero in both writers."""
    model = cat_residual_masked()
    _, report = compactor.compact(model, torch.randn(*CAT_RESIDUAL_SHAPE))
    assert _zero_rows(model) == {"stem.0": [2, 5], "a.0": [1, 2]}
    kept = _kept(report)
    assert {k: v for k, v in kept.items() if k[1] == COUPLED} == {
        ("a.0", COUPLED): {"live in stem.0 (through a concatenation and an add)": [1]},
        ("stem.0", COUPLED): {"live in b.0 (through a concatenation and an add)": [5]},
    }
    zeroed = [z for z in report.zeroed if z.channel == 2]
    assert [z.layer for z in zeroed] == ["stem.0"]  # one channel, two filters: both go, or both stay
    d = report.to_dict()["pruned_filters"]
    both = 0 if Fate(zeroed[0].fate).removed else 2
    assert (d["total"], d["removed"], d["kept"]) == (4, 2 - both, 2 + both)


class _Spare(nn.Module):
    """A layer the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.used(x)
        return out


def test_a_layer_no_forward_calls_keeps_its_filters_as_untraced() -> None:
    torch.manual_seed(0)
    model = _Spare().eval()
    prune.custom_from_mask(model.spare, "weight", torch.ones(8, 8).index_fill_(0, torch.tensor([3, 4]), 0.0))
    _, report = compactor.compact(model, torch.randn(2, 8))
    why = "no forward on the example inputs called the layer"
    assert report.filters == (
        PrunedFilter("spare", 3, UNTRACED, why),
        PrunedFilter("spare", 4, UNTRACED, why),
    )
    assert f"spare: 2 of 2 kept, not traced (rows 3-4): {why}" in report.table()


def test_every_pruned_filter_of_the_zoo_is_counted_and_accounted_for(zoo_results: ZooResults) -> None:
    """Over the zoo: the report lists exactly the all-zero rows of the masked model; a removed one is gone
    from the compacted layer, a kept one is there, still zero, and its fate is a plan's or a live coupling."""
    kept_fates = {f.value for f in Fate if not f.removed} | {COUPLED}
    for case in CASES:
        model, small, report = zoo_results.get(case)
        listed: dict[str, list[int]] = {}
        for f in report.filters:
            listed.setdefault(f.layer, []).append(f.row)
            assert f.removed or f.fate in kept_fates, (case.name, f)
            assert f.fate != COUPLED or f.reason.startswith("live in "), (case.name, f)
        assert listed == _zero_rows(model), case.name
        modules = dict(small.named_modules())
        for layer in listed:
            kept = sum(not f.removed for f in report.filters if f.layer == layer)
            zero_after = _zero_rows(small).get(layer, [])
            assert len(zero_after) == kept, (case.name, layer)
            assert modules[layer].weight.shape[0] <= dict(model.named_modules())[layer].weight.shape[0]


def test_joins_name_the_writers_that_meet_at_each_add() -> None:
    model = bake(BY_NAME["residual_block"].model())
    groups = build_groups(model, ExampleInputs.of(BY_NAME["residual_block"].inputs()))
    # one group holds the residual stream (its root is either writer, by the analysis that traced it)
    assert [g.joins for g in groups if g.joins] == [(Join("add", (("conv2",), ("down.0",))),)]
    assert next(g.root for g in groups if g.joins) in ("conv2", "down.0")


def test_a_grouped_conv_says_what_would_balance_its_groups() -> None:
    conv = nn.Conv2d(16, 12, 1, groups=4)  # inputs: 4 per group; outputs: 3 per group
    shrinker = ConvShrinker()
    assert shrinker.what_would_remove(conv, Side.IN, torch.tensor([0, 1, 4, 9])) == (
        "its groups would lose 2, 1, 1, 0: zero 1 more in each of groups 1, 2 (inputs 4-7, 8-11), "
        "2 more in group 3 (inputs 12-15) to balance them"
    )
    assert shrinker.what_would_remove(conv, Side.OUT, torch.tensor([0, 3, 6, 9])) == ""  # balanced already
    assert shrinker.what_would_remove(nn.Conv2d(4, 4, 1), Side.OUT, torch.tensor([0])) == ""


def test_the_cli_reports_pruned_filters_kept_by_a_residual_add(tmp_path: Path) -> None:
    """The real command on a masked ResNet block: the pruned-filter line and the per-layer reasons on stdout,
    the same counts in --report's JSON."""
    case = BY_NAME["residual_block"]
    model = case.model()
    zero = _zero_rows(model)
    torch.save(model, tmp_path / "block.pt")
    shape = ",".join(map(str, case.shape))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the zoo's classes unpickle there too
    args = ["block.pt", "-o", "small.pt", "--input-shape", shape, "--report", "report.json"]
    r = subprocess.run(
        [sys.executable, "-m", "compactor.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "report.json").read_text())["pruned_filters"]
    total, coupled = sum(map(len, zero.values())), len(set(zero["conv2"]) ^ set(zero["down.0"]))
    kept_zeroed = d["kept"] - coupled
    assert (d["total"], d["removed"], d["kept_by_reason"][COUPLED]) == (
        total,
        total - coupled - kept_zeroed,
        3,
    )
    assert [(k["layer"], k["kept"], k["reasons"]) for k in d["kept_by_layer"] if k["fate"] == COUPLED] == [
        ("conv2", 2, [{"reason": "live in down.0 (through an add)", "rows": [1, 21]}]),
        ("down.0", 1, [{"reason": "live in conv2 (through an add)", "rows": [30]}]),
    ]
    out = " ".join(r.stdout.split())
    assert (
        f"pruned filters (all-zero output rows): {total}, of which {d['removed']} removed "
        f"({d['removed'] / total:.0%}), {d['kept']} kept: 3 coupled to a live channel, " in out
    )
    assert (
        "conv2: 2 of 6 kept, coupled to a live channel (rows 1, 21): live in down.0 (through an add)" in out
    )
    assert "down.0: 1 of 5 kept, coupled to a live channel (row 30): live in conv2 (through an add)" in out
    assert "zeroed channels (zero in every layer that writes them, or read by none):" in out
    assert "no longer exist" not in out


def test_when_the_tracer_fails_every_pruned_filter_stays_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise GraphError("torch-pruning could not trace the model (KeyError: x)")

    monkeypatch.setattr(compactor.engine.coupling.stage, "build_groups", fail)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    prune.custom_from_mask(model[0], "weight", torch.ones(6, 8).index_fill_(0, torch.tensor([1]), 0.0))
    _, report = compactor.compact(model, torch.randn(2, 8))
    assert report.filters == (PrunedFilter("0", 1, UNTRACED, "torch-pruning could not trace the model"),)
    assert report.to_dict()["pruned_filters"]["kept_by_reason"] == {UNTRACED: 1}
