"""Adversarial models for compactor's own channel labels (``engine/coupling/labels.py``): indexing, in-place writes,
shared layers, per-channel tensors the analysis cannot slice, rolls and shuffles along channels, and
reductions whose value depends on the input's size.

Every model is compacted with the labels forced; each test states which zeroed channels go and which stay
(and why), and checks the outputs on fresh inputs of the example's size and of another. A plan that only
verification catches shows up as the fate ``kept: verification failed``, which no test here accepts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import mask_channels

import compactor
from compactor.engine.coupling import label_groups
from compactor.inputs import ExampleInputs

Forward = Callable[["Net", torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]
X = (2, 3, 8, 8)
OTHER = (1, 3, 6, 10)  # another size: what verification does not try


def _set(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :4] = y
    return x


def _clip_negative(x: torch.Tensor) -> torch.Tensor:
    x[x < 0] = 0.5
    return x


def _relu_tail(x: torch.Tensor) -> torch.Tensor:
    x[:, 2:].relu_()
    return x


FORWARDS: dict[str, Forward] = {
    "slice_mid": lambda s, x: s.b(s.a(x)[:, 2:6]),
    "slice_step": lambda s, x: s.b(s.a(x)[:, ::2]),
    "slice_two_dims": lambda s, x: s.b(s.a(x)[:, 2:6, 1:]),
    "ellipsis_none": lambda s, x: s.b(
        s.a(x).permute(0, 2, 3, 1)[..., None, 2:6].squeeze(3).permute(0, 3, 1, 2)
    ),
    "index_tensor": lambda s, x: s.b(s.a(x)[:, torch.tensor([0, 2, 4, 6])]),
    "index_bool": lambda s, x: s.b(s.a(x)[:, torch.tensor([True, False] * 4)]),
    "index_select": lambda s, x: s.b(s.a(x).index_select(1, torch.tensor([0, 2, 4, 6]))),
    "setitem": lambda s, x: s.b8(_set(s.a(x), s.c(x))),
    "relu_tail": lambda s, x: s.b8(_relu_tail(s.a(x))),
    "mask_write": lambda s, x: s.b8(_clip_negative(s.a(x))),
    "shared_output": lambda s, x: (s.b8(s.a(x)), s.a(2 * x)),
    "shared_bn": lambda s, x: (s.b8(s.bn(s.a(x))), s.d(s.bn(s.e(x)))),
    "where_buffer": lambda s, x: s.b8(torch.where(s.mask, s.a(x), -s.a(x))),
    "arange": lambda s, x: s.b8(s.a(x) * torch.arange(s.a(x).shape[1]).view(1, -1, 1, 1)),
    "roll": lambda s, x: s.b8(s.a(x).roll(3, 1)),
    "roll_back": lambda s, x: s.b8(s.a(x).roll(-3, 1)),
    "shuffle": lambda s, x: s.b8(F.channel_shuffle(s.a(x), 2)),
    "softmax_positions": lambda s, x: s.b8(s.a(x).softmax(-1)),
    "sum_pool": lambda s, x: s.b8(s.a(x).sum((2, 3), keepdim=True)),
}


class Net(nn.Module):
    """``a`` writes 8 channels; ``b`` reads 4, ``b8`` reads 8; ``c`` writes 4 more; ``e`` 8 more."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.b8 = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.e = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("mask", torch.arange(8).view(1, 8, 1, 1) < 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return FORWARDS[self.kind](self, x)


def _net(kind: str, zero: dict[str, list[int]], bias: dict[int, float] | None = None) -> Net:
    """``zero``: per layer, the output channels masked (weight and bias); ``bias``: channels of ``a`` that
    then emit that constant instead of zero."""
    torch.manual_seed(1)
    model = Net(kind)
    for name, channels in zero.items():
        layer = getattr(model, name)
        mask_channels(layer, channels)
        with torch.no_grad():
            layer.bias[channels] = 0.0
    with torch.no_grad():
        for c, k in (bias or {}).items():
            model.a.bias[c] = k
    return model.eval()


def _compact(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> tuple[nn.Module, dict[tuple[str, int], tuple[str, str]]]:
    small, report = compactor.compact(model, torch.randn(X), analysis="labels")
    with torch.no_grad():
        for shape in (X, OTHER):
            for seed in (3, 4):
                y = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                torch.testing.assert_close(small(y), model(y), rtol=1e-4, atol=1e-5)
    return small, {(z.layer, z.channel): (z.fate, z.reason) for z in report.zeroed}


SLICE = "the channel passes through a slice whose sizes are fixed in the forward code"


@pytest.mark.parametrize(
    ("kind", "zero", "removed", "kept"),
    [
        ("slice_mid", [0, 7], [7], [0]),  # 0 sits before the slice: its going would shift it; 7 after
        ("slice_step", [3, 7], [7], [3]),  # a strided slice: a channel between its picks moves them
        ("slice_two_dims", [0, 7], [7], [0]),  # channels and rows cut by one index
        ("ellipsis_none", [0, 3], [], [0, 3]),  # [..., None, 2:6] of channels-last: the last dimension
        ("index_tensor", [2, 3], [], [2, 3]),
        ("index_bool", [2, 3], [], [2, 3]),
        ("index_select", [2, 3], [], [2, 3]),
    ],
)
def test_an_index_holds_every_channel_whose_position_it_fixes(
    kind: str, zero: list[int], removed: list[int], kept: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``x[:, 2:6]`` reads channels 2 to 5 by position: a channel before it (or between a strided slice's
    picks, or anywhere for an index tensor) cannot go without moving what it reads; one past a slice whose
    bounds count from the start can."""
    _, fates = _compact(_net(kind, {"a": zero}), monkeypatch)
    assert {c for (layer, c), (fate, _) in fates.items() if layer == "a" and fate == "removed"} == set(
        removed
    )
    for c in kept:
        fate, why = fates[("a", c)]
        assert fate == "kept: read elsewhere" and why.startswith(SLICE), (c, fate, why)


def test_a_write_into_a_slice_holds_what_it_overwrites_and_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``x[:, :4] = c(x)``: channel 1 of ``a`` (overwritten) and of ``c`` (written) sit at positions the code
    fixes; channel 6 of ``a``, past the write, goes."""
    _, fates = _compact(_net("setitem", {"a": [1, 6], "c": [1]}), monkeypatch)
    assert fates[("a", 6)][0] == "removed"
    for key in (("a", 1), ("c", 1)):
        assert fates[key][0] == "kept: read elsewhere" and "(__setitem__)" in fates[key][1]


def test_an_in_place_op_on_a_slice_view_holds_the_channels_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``x[:, 2:].relu_()``: channel 1 lies before the slice, whose start is fixed."""
    _, fates = _compact(_net("relu_tail", {"a": [1]}), monkeypatch)
    assert fates[("a", 1)][0] == "kept: read elsewhere" and fates[("a", 1)][1].startswith(SLICE)


def test_a_write_through_a_mask_of_the_same_channels_fixes_no_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``x[x < 0] = 0.5`` writes element by element: channel 1 (exactly zero, never below 0) goes."""
    small, fates = _compact(_net("mask_write", {"a": [1]}), monkeypatch)
    assert fates == {("a", 1): ("removed", "emits exactly zero")}
    assert small.a.out_channels == 7


def test_a_layer_called_twice_writes_the_same_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``(b8(a(x)), a(2 * x))``: the second call's output is a model output, so ``a``'s channel 1 stays."""
    _, fates = _compact(_net("shared_output", {"a": [1]}), monkeypatch)
    assert fates == {("a", 1): ("kept: read elsewhere", "the channel is part of a model output")}


def test_a_layer_called_twice_reads_the_same_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """One BatchNorm after ``a`` and after ``e``: its channel 1 reads both, so ``a``'s dead channels 1 and
    5 are coupled to ``e``'s live ones and nothing goes (no plan for verification to undo)."""
    small, fates = _compact(_net("shared_bn", {"a": [1, 5]}), monkeypatch)
    assert fates == {}
    assert (small.a.out_channels, small.bn.num_features, small.e.out_channels) == (8, 8, 8)


@pytest.mark.parametrize("kind", ["where_buffer", "arange"])
def test_a_per_channel_tensor_without_labels_holds_the_channels(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``where(buffer, x, -x)`` with a per-channel buffer, ``x * arange(C)``: values that differ per channel
    and that compactor cannot slice."""
    _, fates = _compact(_net(kind, {"a": [1, 6]}), monkeypatch)
    for c in (1, 6):
        fate, why = fates[("a", c)]
        assert fate == "kept: read elsewhere" and "per-channel values compactor cannot slice" in why


@pytest.mark.parametrize(("kind", "removed", "kept"), [("roll", 2, 7), ("roll_back", 5, 2)])
def test_a_roll_along_channels_holds_the_channels_it_wraps(
    kind: str, removed: int, kept: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``roll(3, 1)`` brings channels 5 to 7 round to the front (``roll(-3, 1)`` takes 0 to 2 to the back):
    one of those going would bring another round; the others keep their order."""
    _, fates = _compact(_net(kind, {"a": [removed, kept]}), monkeypatch)
    assert fates[("a", removed)][0] == "removed"
    assert fates[("a", kept)] == ("kept: read elsewhere", f"{SLICE} (roll)")


def test_channel_shuffle_couples_the_same_place_in_every_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """``F.channel_shuffle(x, 2)``: channels 0 and 5 are dead but sit at different places of their groups
    (each coupled to a live one, 4 and 1): nothing goes."""
    small, fates = _compact(_net("shuffle", {"a": [0, 5]}), monkeypatch)
    assert fates == {}
    assert small.a.out_channels == 8


@pytest.mark.parametrize("kind", ["softmax_positions", "sum_pool"])
def test_a_constant_through_a_size_dependent_reduction_stays(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A constant channel (a dead filter with a bias) through ``softmax`` over positions (``1 / W``) or a sum
    over them (``k * H * W``) is a constant at the example's size only: folding it would be wrong at another."""
    _, fates = _compact(_net(kind, {"a": [1]}, bias={1: 0.7}), monkeypatch)
    fate, why = fates[("a", 1)]
    assert fate == "kept: varies with position" and "depends on the input's size" in why


def test_a_zero_channel_through_a_sum_still_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    small, fates = _compact(_net("sum_pool", {"a": [1]}), monkeypatch)
    assert fates == {("a", 1): ("removed", "emits exactly zero")}
    assert small.a.out_channels == 7


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(20, 8)
        self.l = nn.Linear(8, 8)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.l(self.e(t))


def test_an_embedding_writes_its_channels_on_the_last_dimension() -> None:
    """Eight tokens of eight features: the embedding's channels are its last dimension, not the sequence."""
    groups = label_groups(Tokens().eval(), ExampleInputs.of(torch.randint(0, 20, (2, 8))))
    group = next(g for g in groups if g.root == "e")
    one_each = tuple((i,) for i in range(8))
    assert {(m.name, m.side.value): m.idxs for m in group.members} == {
        ("e", "out"): one_each,
        ("l", "in"): one_each,
    }
