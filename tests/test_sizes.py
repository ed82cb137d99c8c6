"""A run at another input size: a channel whose constant depends on the input's size (a softmax or a sum over
positions) is kept, under Torch-Pruning's groups and compactor's labels alike, and the plan is verified at that
size too; a model with fixed sizes is compacted as before, and a plain constant is still folded."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import mask_channels

import compactor
from compactor.inputs import ExampleInputs, grown

X = (2, 3, 8, 8)
OTHER = (1, 3, 6, 10)
ANALYSES = ["torch-pruning", "auto"]

REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda y: y.softmax(-1),
    "sum": lambda y: y.sum((2, 3), keepdim=True),
    "pool": lambda y: F.avg_pool2d(y, 3, 1, 1),  # zero-padded: k * 1/9 at 1x1, k * 4/9 at 2x2, varying later
    "plain": lambda y: y.relu(),  # no reduction: the dead channel is a constant at every size
}


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(REDUCTIONS[self.kind](self.a(x)))


class Flat(nn.Module):
    """A Linear after a flatten: the model takes the example's size only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.a(x).softmax(-1).flatten(1))


def _dead(model: nn.Module, bias: float = 0.7) -> nn.Module:
    """Channel 1 of ``a`` is a dead filter that emits ``bias``."""
    torch.manual_seed(1)
    mask_channels(model.a, [1])
    with torch.no_grad():
        model.a.bias[1] = bias
    return model.eval()


def _fresh(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return _dead(model)


def _check(small: nn.Module, model: nn.Module, shapes: tuple[tuple[int, ...], ...]) -> None:
    with torch.no_grad():
        for shape in shapes:
            y = torch.randn(shape, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(small(y), model(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("analysis", ANALYSES)
@pytest.mark.parametrize("kind", ["softmax", "sum"])
def test_a_constant_that_depends_on_the_size_stays(
    kind: str, analysis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``softmax`` over positions makes the dead channel ``1 / W``, a sum ``k * H * W``: one constant at the
    example's size, another at 6x10. Kept (with the reason), the compacted model is exact at both."""
    model = _fresh(Net(kind))
    small, report = compactor.compact(model, torch.randn(X), analysis=analysis)
    _check(small, model, (X, OTHER))
    fates = {(z.layer, z.channel): (z.fate, z.reason) for z in report.zeroed}
    fate, why = fates[("a", 1)]
    assert fate == "kept: varies with position"
    assert "depends on the input's size" in why
    assert small.a.out_channels == 8 and small.b.in_channels == 8
    assert report.verified_runs == 4
    assert report.extra["sizes"] == "also observed and verified at [(2, 3, 16, 16):float32]"


@pytest.mark.parametrize("analysis", ANALYSES)
def test_a_zero_padded_pool_constant_at_a_tiny_size_stays(
    analysis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 1x1 a zero-padded 3x3 average pool makes the dead channel ``k / 9``, at 2x2 ``4k / 9``, and it
    varies with position beyond: kept, exact at 6x10."""
    model = _fresh(Net("pool"))
    small, report = compactor.compact(model, torch.randn(2, 3, 1, 1), analysis=analysis)
    _check(small, model, ((2, 3, 1, 1), OTHER))
    fate, why = next((z.fate, z.reason) for z in report.zeroed if (z.layer, z.channel) == ("a", 1))
    assert fate == "kept: varies with position" and "depends on the input's size" in why
    assert small.a.out_channels == 8
    assert report.extra["sizes"] == "also observed and verified at [(2, 3, 2, 2):float32]"


@pytest.mark.parametrize("analysis", ANALYSES)
def test_a_plain_constant_is_still_folded(analysis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``relu(0.7)`` into a 1x1 conv is 0.7 at every size: folded into ``b``'s bias, exact at 6x10 too."""
    model = _fresh(Net("plain"))
    small, report = compactor.compact(model, torch.randn(X), analysis=analysis)
    _check(small, model, (X, OTHER))
    fates = {(z.layer, z.channel): z.fate for z in report.zeroed}
    assert fates == {("a", 1): "folded"}
    assert small.a.out_channels == 7 and small.b.in_channels == 7


@pytest.mark.parametrize("analysis", ANALYSES)
def test_a_model_with_fixed_sizes_compacts_as_before(analysis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Linear after a flatten fails at another size: that run is left out (and said), and the plan is the
    one made at the example's size alone."""
    model = _fresh(Flat())
    small, report = compactor.compact(model, torch.randn(X), analysis=analysis)
    monkeypatch.setattr(ExampleInputs, "resized", lambda self, generator: None)
    before, before_report = compactor.compact(model, torch.randn(X), analysis=analysis)
    _check(small, model, (X,))
    widths = {n: tuple(p.shape) for n, p in small.named_parameters()}
    assert widths == {n: tuple(p.shape) for n, p in before.named_parameters()}
    assert [(z.layer, z.channel, z.fate) for z in report.zeroed] == [
        (z.layer, z.channel, z.fate) for z in before_report.zeroed
    ]
    assert report.verified_runs == before_report.verified_runs == 3
    assert report.extra["sizes"].startswith(
        "checked at the example's size only: the model fails at [(2, 3, 16, 16)"
    )
    assert (
        before_report.extra["sizes"] == "checked at the example's size only: no input has positions to resize"
    )


def test_resized_grows_positions_only() -> None:
    """Images grow from their third dimension on, signals their last, token ids (and masks) their second;
    channels, batches and features stay."""
    g = torch.Generator().manual_seed(0)
    inputs = ExampleInputs(
        args=(torch.randn(2, 3, 8, 12), torch.randn(2, 4, 7)),
        kwargs={
            "ids": torch.randint(0, 9, (2, 5)),
            "mask": torch.ones(2, 5, dtype=torch.long),
            "f": torch.randn(2, 6),
        },
    )
    other = inputs.resized(g)
    assert other is not None
    assert [tuple(t.shape) for t in other.args] == [(2, 3, 16, 16), (2, 4, 8)]
    assert {k: tuple(v.shape) for k, v in other.kwargs.items()} == {
        "ids": (2, 6),
        "mask": (2, 6),
        "f": (2, 6),
    }
    assert bool((other.kwargs["mask"] == 1).all())
    assert int(other.kwargs["ids"].min()) >= 0 and int(other.kwargs["ids"].max()) <= 8
    assert [grown(n) for n in (1, 7, 8, 12, 64, 224, 640)] == [2, 8, 16, 16, 96, 192, 608]
    assert ExampleInputs(args=(torch.randn(2, 6),)).resized(g) is None


def test_a_dead_model_is_still_said() -> None:
    """Every channel of ``a`` dead: the output differs at another size only by its shape, and the model still
    ignores its input, which the report says."""
    torch.manual_seed(0)
    model = Net("plain")
    mask_channels(model.a, list(range(8)))
    small, report = compactor.compact(model.eval(), torch.randn(X))
    _check(small, model, (X, OTHER))
    assert [w for w in report.warnings if "does not depend on its input" in w] == [
        "the model's output does not depend on its input (every channel of a is pruned); compaction kept it "
        "exact, but check the pruning"
    ]
