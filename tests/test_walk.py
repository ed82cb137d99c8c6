"""Issue 11: Torch-Pruning's tracer and coupling walk on the blocks where they failed (``replicas_walk``).

The walk is a fixpoint and settles where split/concat/add joins made Torch-Pruning's walk run forever; a
tracer failure (in the index-mapping pass, or anywhere in one root's walk) keeps only the channels it
touches, with the library's error as reason; compaction stays exact throughout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import replicas_walk as R
import torch
import torch_pruning as tp
from torch import nn
from zoo import CASES, mask_channels, mask_ln, perturb_norms

import compactor
from compactor.cli import main
from compactor.engine.coupling import Analysis, build_groups
from compactor.inputs import ExampleInputs

RTOL, ATOL = 1e-4, 1e-5
UNSETTLED = "does not settle"


def _masked(build: Callable[[], nn.Module], shape: tuple[int, ...]) -> nn.Module:
    """The replica masked as users mask: 30% of the filters of every conv and linear (L2), norms as after
    fine-tuning."""
    torch.manual_seed(0)
    model = build().eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] > 3:
            mask_ln(m, 0.3)
    return perturb_norms(model, shape).eval()


def _compact(
    model: nn.Module, shape: tuple[int, ...], analysis: Analysis = "auto"
) -> tuple[nn.Module, compactor.CompactionReport]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    small, report = compactor.compact(model, x, analysis=analysis)
    with torch.no_grad():
        for seed in (5, 6):
            y = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(small(y), model(y), rtol=RTOL, atol=ATOL)
    return small, report


def _zeroed_rows(m: nn.Module) -> int:
    return int((m.weight.detach().flatten(1).abs().sum(1) == 0).sum())


SPLIT_AND_JOIN = {
    "res2net": (R.Res2Net, (2, 3, 64, 64)),
    "rexnet": (R.ReXNet, (2, 3, 32, 32)),
    "inception_next": (R.InceptionNeXt, (2, 3, 64, 64)),
    "mambaout": (R.MambaOut, (2, 3, 64, 64)),
    "dpn": (R.DPN, (2, 3, 64, 64)),
}


@pytest.mark.parametrize("name", list(SPLIT_AND_JOIN))
def test_walks_settle_where_branches_split_and_join(name: str) -> None:
    """Res2Net, ReXNet, Inception-NeXt, MambaOut, DPN: every root's walk settles (none carries the bound's
    reason), and the compacted model computes the masked model's outputs."""
    build, shape = SPLIT_AND_JOIN[name]
    model = _masked(build, shape)
    groups = build_groups(compactor.modules.baked(model), ExampleInputs((torch.randn(*shape),), {}))
    assert groups and not [g.root for g in groups if any(UNSETTLED in i for i in g.issues)]
    _compact(model, shape)


def test_inception_next_mlp_neurons_go() -> None:
    """Inception-NeXt: the walk settles, so the MLP groups (fc1 -> GELU -> fc2, no split on the way) are
    planned: every masked hidden neuron emits GELU(bias), folded into fc2's bias, and goes."""
    shape = (2, 3, 64, 64)
    model = _masked(R.InceptionNeXt, shape)
    blocks = [b for stage in model.stages for b in stage if isinstance(b, R.MetaNeXtBlock)]
    masked = [_zeroed_rows(b.mlp.fc1) for b in blocks]
    assert all(masked)
    small, _ = _compact(model, shape)
    small_blocks = [b for stage in small.stages for b in stage if isinstance(b, R.MetaNeXtBlock)]
    for b, s, k in zip(blocks, small_blocks, masked):
        assert (s.mlp.fc1.out_channels, s.mlp.fc2.in_channels) == (b.mlp.fc1.out_channels - k,) * 2


@pytest.mark.parametrize("analysis", ["torch-pruning", "auto"])
def test_swin_projections_called_functionally_stop_the_walk(
    analysis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's Swin runs ``F.linear(x, self.qkv.weight, ...)``: Torch-Pruning takes that for a
    channel-preserving op (and its walk through the attention did not end: 19.5 GiB). The walk stops
    there and the residual stream keeps its channels, saying why; the MLP hidden neurons still go."""
    shape = (1, 3, 32, 32)
    model = _masked(R.SwinTransformer, shape)
    small, report = _compact(model, shape, analysis)
    issues = report.extra["graph_issues"]
    if analysis == "torch-pruning":
        assert issues and not [i for i in issues if UNSETTLED in i]
        functional = re.compile(
            r"reads the weight of features\.\d\.\d\.attn\.(qkv|proj), a layer the forward never calls"
        )
        assert all(functional.search(i) for i in issues), issues
    else:  # compactor's labels: F.linear is an op they do not follow, so what it reads stays
        assert not issues
    blocks = [b for b in model.modules() if isinstance(b, R.SwinTransformerBlock)]
    small_blocks = [b for b in small.modules() if isinstance(b, R.SwinTransformerBlock)]
    for b, s in zip(blocks, small_blocks):
        assert s.mlp[0].out_features == b.mlp[0].out_features - _zeroed_rows(b.mlp[0])


def _dense() -> tuple[nn.Module, torch.Tensor]:
    """The zoo's DenseNet block (b0, b1, b2 masked, each into a concatenation), and b3 masked too: its
    channels go to the pooled Linear head, never through a concatenation."""
    case = next(c for c in CASES if c.name == "dense_concat")
    model = case.model()
    mask_channels(model.b3[0], [1, 5])
    return model, case.inputs(1)


def test_a_failing_index_mapping_keeps_only_the_roots_that_reach_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's index-mapping pass fails on one op (ShuffleNetV2's channel shuffle divides by zero,
    a concatenation it cannot size adds None): the roots whose channels reach that op keep them, with the
    error; the others compact as before; no crash."""
    model, x = _dense()
    _, before = compactor.compact(model, x, analysis="torch-pruning")

    def fails(graph: Any, node: Any) -> None:
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.dependency.index_mapping, "update_concat_index_mapping", fails)
    small, report = compactor.compact(model, x, analysis="torch-pruning")
    kept = {z.layer for z in report.zeroed if z.fate.startswith("kept")}
    reasons = {z.reason for z in report.zeroed if z.layer in kept}
    assert kept == {"b0.0", "b1.0", "b2.0"}  # the three branches the concatenation joins
    assert all(
        "its index mapping fails: ZeroDivisionError: integer division or modulo by zero" in r for r in reasons
    )
    assert {z.layer: z.fate for z in before.zeroed if z.layer == "b3.0"} == {"b3.0": "folded"}
    assert [z.fate for z in report.zeroed if z.layer == "b3.0"] == [
        z.fate for z in before.zeroed if z.layer == "b3.0"
    ]  # b3 reaches no concatenation: its channels go as before
    assert small.b3[0].out_channels == 6
    torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("error", [ZeroDivisionError, TypeError, KeyError, RecursionError, IndexError])
def test_any_exception_in_a_walk_keeps_that_root(monkeypatch: pytest.MonkeyPatch, error: type) -> None:
    """An index mapping that raises while one root is walked (``_GQAIndexMapping`` divides by zero on a
    5-D expand, in Hiera and GC-ViT) keeps that root's channels with the error; nothing crashes."""
    from torch_pruning.dependency.index_mapping import _ConcatIndexMapping

    model, x = _dense()

    def raises(self: Any, idxs: Any) -> Any:
        raise error("injected")

    monkeypatch.setattr(_ConcatIndexMapping, "__call__", raises)
    small, report = compactor.compact(model, x, analysis="torch-pruning")
    kept = [z for z in report.zeroed if z.fate.startswith("kept")]
    assert {z.layer for z in kept} == {"b0.0", "b1.0", "b2.0"}
    assert all(
        f"torch-pruning failed while coupling the channels of {z.layer} ({error.__name__}:" in z.reason
        for z in kept
    )
    torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


def test_a_model_the_tracer_cannot_trace_is_kept_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _dense()

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(tp.DependencyGraph, "_trace", fails)
    small, report = compactor.compact(model, x, analysis="torch-pruning")
    assert report.params["after"] == report.params["before"]
    assert (
        "torch-pruning could not trace the model (RecursionError: maximum recursion depth exceeded): no channel "
        "was removed (attention heads may still go)"
    ) in report.warnings
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


def test_under_auto_a_model_the_tracer_cannot_trace_is_compacted_by_the_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same failure under ``auto``: compactor's own channel labels answer, and the model compacts as
    it does when Torch-Pruning traces it (the zoo's oracle widths for the dense block)."""
    model, x = _dense()
    expected, _ = compactor.compact(model, x)

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(tp.DependencyGraph, "_trace", fails)
    small, report = compactor.compact(model, x)
    assert report.params["after"] < report.params["before"]
    widths = {n: tuple(p.shape) for n, p in small.named_parameters()}
    assert widths == {n: tuple(p.shape) for n, p in expected.named_parameters()}
    torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


def test_cli_exits_0_when_the_tracer_fails_in_a_walk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch_pruning.dependency.index_mapping import _ConcatIndexMapping

    def raises(self: Any, idxs: Any) -> Any:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(_ConcatIndexMapping, "__call__", raises)
    monkeypatch.chdir(tmp_path)
    assert main(["--demo", "-o", "small.pt", "--report", "report.json", "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "small.pt").exists() and report
