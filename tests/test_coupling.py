"""Channel coupling compactor decides itself (its own channel labels, ``engine/coupling/labels.py``): chunks, splits,
channel shuffles and channels-last permutes, on faithful replicas of the blocks users have.

Every test masks exact channels, predicts by hand which go and which stay (and why), and checks the
widths, the fates and the outputs."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from replicas_coupling import C2f, ConvNeXtTiny, GluTokens, ShuffleNetV2Tiny, YoloTiny
from torch import nn
from torch.nn import functional as F
from zoo import mask_channels, perturb_norms, zero_bn

import compactor
from compactor.engine.coupling import Analysis, build_groups, label_groups
from compactor.inputs import ExampleInputs

RTOL, ATOL = 1e-4, 1e-5


def _widths(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        m = mods[n]
        if isinstance(m, nn.Linear):
            out[n] = (m.in_features, m.out_features)
        else:
            out[n] = (m.in_channels, m.out_channels)
    return out


def _compact(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, compactor.CompactionReport]:
    model.eval()
    small, report = compactor.compact(model, x)
    with torch.no_grad():
        for seed in (3, 4):
            y = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(small(y), model(y), rtol=RTOL, atol=ATOL)
    return small, report


def _fates(report: compactor.CompactionReport, layer: str) -> dict[int, str]:
    return {z.channel: z.fate for z in report.zeroed if z.layer == layer}


def test_c2f_chunk_loses_as_many_channels_from_each_half() -> None:
    """YOLOv8 C2f: ``cv1(x).chunk(2, 1)``. Channels 0, 1 (first half) and 9 (second half) of cv1 emit
    exactly zero (BatchNorm slimmed): one can go from each half, 0 and 9; 1 stays for the layout."""
    torch.manual_seed(0)
    model = YoloTiny("c2f")
    model.block = C2f(16, 16, n=2, shortcut=False)
    zero_bn(model.block.cv1.bn, [0, 1, 9])
    model = perturb_norms(model, (2, 3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)

    small, report = _compact(model, x)

    assert _fates(report, "block.cv1.conv") == {0: "removed", 1: "kept: layer layout", 9: "removed"}
    assert "each piece loses as many channels" in next(z.reason for z in report.zeroed if z.channel == 1)
    names = ["block.cv1.conv", "block.m.0.cv1.conv", "block.cv2.conv"]
    assert _widths(small, names) == {
        "block.cv1.conv": (16, 14),
        "block.m.0.cv1.conv": (7, 8),  # the second half, less channel 9
        "block.cv2.conv": (30, 16),  # cat(y0, y1, m0, m1): positions 0 and 9 gone
    }


def test_c3k2_chunk_feeds_a_nested_c3k() -> None:
    """YOLO11 C3k2 with ``c3k=True``: the second half feeds a C3k (two 1x1 convs, residual bottlenecks);
    channels 2 (first half), 12 and 13 (second half) emit zero: 2 and 12 go, 13 stays."""
    torch.manual_seed(0)
    model = YoloTiny("c3k2")
    zero_bn(model.block.cv1.bn, [2, 12, 13])
    model = perturb_norms(model, (2, 3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)

    small, report = _compact(model, x)

    assert _fates(report, "block.cv1.conv") == {2: "removed", 12: "removed", 13: "kept: layer layout"}
    names = ["block.cv1.conv", "block.m.0.cv1.conv", "block.m.0.cv2.conv", "block.cv2.conv"]
    assert _widths(small, names) == {
        "block.cv1.conv": (16, 14),
        "block.m.0.cv1.conv": (7, 4),
        "block.m.0.cv2.conv": (7, 4),
        "block.cv2.conv": (22, 16),
    }


def test_gated_mlp_chunk_on_the_last_dimension_couples_the_two_halves() -> None:
    """timm GluMlp: ``fc1`` then ``chunk(2, dim=-1)`` and ``x1 * act(x2)``: input j of fc2 reads fc1's
    outputs j and j + 12 together. fc2 ignores inputs 3 and 7: fc1 loses rows 3, 7, 15, 19."""
    torch.manual_seed(0)
    model = GluTokens()
    mask_channels(model.mlp.fc2, [3, 7], dim=1)
    x = torch.randn(2, 7, 12)

    small, report = _compact(model, x)

    assert _widths(small, ["mlp.fc1", "mlp.fc2"]) == {"mlp.fc1": (16, 20), "mlp.fc2": (10, 16)}
    assert _fates(report, "mlp.fc1") == {3: "removed", 7: "removed"}
    groups = label_groups(model, ExampleInputs.of(x))
    fc1 = next(g for g in groups if g.root == "mlp.fc1")
    chunk = next(m for m in fc1.members if m.op == "chunk")
    assert chunk.pieces == (12, 12) and chunk.idxs[3] == (3, 15)


def test_channel_shuffle_removes_whole_rows_of_the_shuffle() -> None:
    """torchvision ShuffleNetV2: ``cat(branch1, branch2)`` then ``view(b, 2, 8) -> transpose -> view``.
    The shuffle's map moves when channels go unless both halves lose the same position: channel j of
    branch1 and of branch2 go together, and after the next block's shuffle, with the channels they meet
    there. Zeroing positions 1 and 5 of both branches of stage2.0 and positions 2 and 3 of stage2.1's
    branch2 makes two whole rows constant: one lands in each half of stage2.1's chunk, so both go."""
    torch.manual_seed(0)
    model = ShuffleNetV2Tiny()
    for layer, rows in (
        ("stage2.0.branch1.2", [1, 5]),
        ("stage2.0.branch2.5", [1, 5]),
        ("stage2.1.branch2.5", [2, 3]),
    ):
        mask_channels(dict(model.named_modules())[layer], rows)
    model = perturb_norms(model, (2, 3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)

    small, report = _compact(model, x)

    names = [
        "stage2.0.branch1.2",
        "stage2.0.branch2.5",
        "stage2.1.branch2.0",
        "stage2.1.branch2.5",
        "conv5.0",
    ]
    assert _widths(small, names) == {
        "stage2.0.branch1.2": (8, 6),
        "stage2.0.branch2.5": (8, 6),
        "stage2.1.branch2.0": (6, 8),  # x2 lost positions 10 and 11 (row 5)
        "stage2.1.branch2.5": (8, 6),
        "conv5.0": (12, 32),  # rows 2 and 3 of stage2.1's shuffle: inputs 4, 5, 6, 7
    }
    assert len([z for z in report.zeroed if _removed(z.fate)]) == 2  # one root channel per shuffle row


def _removed(fate: str) -> bool:
    return fate in ("removed", "folded", "merged")


def test_channel_shuffle_keeps_a_position_only_one_half_zeroed() -> None:
    """Only branch2 of stage2.0 zeroes channel 1: its shuffle row also holds branch1's live channel 1,
    so nothing goes, and the outputs stay exact (Torch-Pruning's map would have moved channels)."""
    torch.manual_seed(0)
    model = ShuffleNetV2Tiny()
    mask_channels(model.stage2[0].branch2[5], [1])
    model = perturb_norms(model, (2, 3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)

    small, report = _compact(model, x)

    assert _widths(small, ["stage2.0.branch2.5", "conv5.0"]) == {
        "stage2.0.branch2.5": (8, 8),
        "conv5.0": (16, 32),
    }
    assert not any(_removed(z.fate) for z in report.zeroed)


def test_convnext_block_permutes_to_channels_last_and_back() -> None:
    """torchvision CNBlock: ``Permute([0, 2, 3, 1])``, LayerNorm, Linear -> GELU -> Linear, ``Permute`` back.
    Rows 1, 2, 3 of the first Linear of block 0 are zero: GELU(bias) is a constant there, folded into the
    second Linear's bias. The residual stream passes LayerNorm (its statistics read every channel): kept."""
    torch.manual_seed(0)
    model = ConvNeXtTiny()
    mask_channels(model.blocks[0].block[3], [1, 2, 3])
    mask_channels(model.stem, [0])  # the residual stream: block 0's second Linear writes channel 0 too
    x = torch.randn(2, 3, 32, 32)

    small, report = _compact(model, x)

    assert _widths(small, ["blocks.0.block.3", "blocks.0.block.5", "stem"]) == {
        "blocks.0.block.3": (8, 29),
        "blocks.0.block.5": (29, 8),
        "stem": (3, 8),
    }
    assert _fates(report, "blocks.0.block.3") == {1: "folded", 2: "folded", 3: "folded"}
    assert _fates(report, "stem") == {}  # not zeroed: the Linears of both blocks write into that stream


class _LiteralSplit(nn.Module):
    """``x.split([6, 10], 1)``: sizes written in the code, so the channels of the split stay (each with the
    reason); a channel of the same conv that the split does not see is removed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 18, 1)
        self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(10, 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)[:, :16]  # a literal slice: channels 16, 17 are read by nothing
        a, b = y.split([6, 10], 1)
        return self.fc(torch.cat([self.a(a), self.b(b)], 1).mean((2, 3)))


def test_literal_split_and_slice_keep_only_the_channels_they_cut() -> None:
    torch.manual_seed(0)
    model = _LiteralSplit()
    mask_channels(model.conv, [2, 17])
    x = torch.randn(2, 3, 6, 6)

    small, report = _compact(model, x)

    assert small.conv.out_channels == 17
    fates = {z.channel: (z.fate, z.reason) for z in report.zeroed if z.layer == "conv"}
    assert fates[17][0] == "removed"
    assert fates[2][0] == "kept: read elsewhere" and "fixed in the forward code" in fates[2][1]


@pytest.mark.parametrize("analysis", ["torch-pruning", "labels"])
def test_both_analyses_agree_on_a_plain_residual_net(analysis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Torch-Pruning is right (no op it maps by rule), the labels find the same groups."""
    from zoo import CASES

    case = next(c for c in CASES if c.name == "residual_block")
    model = case.model()
    groups = build_groups(model, ExampleInputs.of(case.inputs()), analysis=analysis)
    found = {
        g.root: sorted((m.name, m.side.value, m.idxs) for m in g.layers())
        for g in groups
        if any(m.idxs and any(m.idxs) for m in g.layers())
    }
    other_analysis: Analysis = "torch-pruning" if analysis == "labels" else "labels"
    other = build_groups(model, ExampleInputs.of(case.inputs()), analysis=other_analysis)
    other_sets = {frozenset((m.name, m.side.value, m.idxs) for m in g.layers()) for g in other}
    assert {frozenset(v) for v in found.values()} == other_sets


# --- what the label tracer catches, and what it lets through ------------------------------------------------
class _PermuteFlatten(nn.Module):
    """conv -> ReLU -> permute to channels-last -> reshape -> Linear: a permute Torch-Pruning maps by rule,
    so under ``auto`` the labels answer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).permute(0, 2, 3, 1)
        out: torch.Tensor = self.fc(y.reshape(y.shape[0], -1))
        return out


@pytest.mark.parametrize("helper", ["tracer._broadcast", "moves._unite_split"])
@pytest.mark.parametrize("analysis", ["labels", "auto"])
def test_a_bug_in_the_label_tracer_is_raised_not_taken_for_an_op_it_cannot_follow(
    helper: str, analysis: Analysis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracer catches only what an op raises on the labels (:class:`CouplingUnfollowed`): an error of its
    own bookkeeping after an op (here one injected into a helper of the elementwise handler, and of the
    reshape handler) is raised as it is, neither turned into opaque channels nor into a fallback on
    Torch-Pruning's groups."""
    from compactor.engine import coupling

    module, name = helper.split(".")

    def bug(*args: object, **kwargs: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(getattr(coupling, module), name, bug)
    model, inputs = _PermuteFlatten().eval(), ExampleInputs.of(torch.randn(2, 3, 2, 2))
    with pytest.raises(KeyError, match="bug"):
        label_groups(model, inputs)
    with pytest.raises(KeyError, match="bug"):
        build_groups(model, inputs, analysis=analysis)


class _GroupedQueryAttention(nn.Module):
    """Four query heads share two key/value heads (``enable_gqa``): the attention's output has more heads than
    its values."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 2).transpose(1, 2)
        k = self.k(x).view(b, n, 2, 2).transpose(1, 2)
        v = self.v(x).view(b, n, 2, 2).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        out: torch.Tensor = self.out(y.transpose(1, 2).reshape(b, n, 8))
        return out


def test_an_op_the_labels_cannot_take_keeps_its_channels_and_the_trace_goes_on() -> None:
    """What an op raises on the label tensors (the values' labels cannot be shaped as the grouped-query
    output) is the op's: the channels that reach it stay, with its name and the error's type, and the other
    groups are found as before."""
    model = _GroupedQueryAttention().eval()
    groups = {g.root: g for g in label_groups(model, ExampleInputs.of(torch.randn(2, 5, 8)))}
    assert set(groups) == {"q", "k", "v", "out"}
    assert {why for _, why in groups["v"].opaque} == {
        "scaled_dot_product_attention (could not follow its channels: RuntimeError)"
    }
    assert {why for _, why in groups["q"].opaque} == {
        "scaled_dot_product_attention reads across them (queries and keys)"
    }
    assert groups["out"].opaque == ()


class _FailsWithoutGrad(_PermuteFlatten):
    """A model's own op that fails under the label trace (which runs without grad) and nowhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            torch.zeros(2, 3) @ torch.zeros(4, 5)
        return super().forward(x)


def test_an_op_of_the_model_that_fails_under_the_label_trace_falls_back_on_torch_pruning() -> None:
    """The model's op failing is not compactor's bug: the label trace names it (a :class:`GraphError`), and
    ``auto`` answers with Torch-Pruning's groups; the labels alone cannot answer."""
    from compactor.errors import CouplingUnfollowed, GraphError

    model, inputs = _FailsWithoutGrad().eval(), ExampleInputs.of(torch.randn(2, 3, 2, 2))
    with pytest.raises(CouplingUnfollowed, match=r"^matmul fails under the label trace \(RuntimeError: "):
        label_groups(model, inputs)
    assert sorted(g.root for g in build_groups(model, inputs)) == ["conv", "fc"]
    with pytest.raises(GraphError, match=r"^compactor could not follow the channels \(RuntimeError: "):
        build_groups(model, inputs, analysis="labels")


class _Narrowed(nn.Module):
    """``narrow(1, 0, 6)`` / ``select(1, i)`` of a conv's 8 channels: the positions they keep are fixed."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.a, self.b, self.op = nn.Conv2d(3, 8, 1), nn.Conv2d(6, 4, 1), op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        if self.op == "narrow":
            return self.b(y.narrow(1, 0, 6))
        return self.b(torch.stack([y.select(1, i) for i in range(6)], 1))


@pytest.mark.parametrize("op", ["narrow", "select"])
@pytest.mark.parametrize("analysis", ["labels", "auto"])
def test_narrow_and_select_take_their_dimension_second(op: str, analysis: Analysis) -> None:
    """``narrow(x, dim, start, length)`` and ``select(x, dim, index)`` name the dimension second (read as the
    third, the start: a cut along the batch, and the plan then failed verification): the cut channels are
    kept by prediction, with the reason, never by a failed verification."""
    torch.manual_seed(0)
    model = _Narrowed(op).eval()
    with torch.no_grad():
        for c in (2, 7):
            model.a.weight[c], model.a.bias[c] = 0.0, -1.0
    x = torch.randn(2, 3, 5, 5)
    small, report = compactor.compact(model, x, analysis=analysis)
    assert [(z.channel, z.fate) for z in report.zeroed] == [
        (2, "kept: read elsewhere"),
        (7, "kept: read elsewhere"),
    ]
    assert small.a.out_channels == 8
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


class _PadPool(nn.Module):
    """YOLO's downsampling: ``ZeroPad2d`` then ``MaxPool2d``; channel 1 zero, channel 5 a negative constant
    (zero weights, bias -1: max-pooled with the zero border it becomes 0 there, -1 inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Linear(4, 2)
        with torch.no_grad():
            self.c1.weight[[1, 5]] = 0
            self.c1.bias[1], self.c1.bias[5] = 0.0, -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(F.pad(self.c1(x), (0, 1, 0, 1)), 2, 2)
        return self.fc(self.c2(y).mean((2, 3)))


@pytest.mark.parametrize("analysis", ["labels", "torch-pruning"])
def test_a_zero_channel_through_zero_padding_and_max_pooling_is_still_zero(analysis: str) -> None:
    """Pooling is per channel, and a border the pad fills holds no other channel: the zero channel goes; the
    negative constant varies at the border and stays, for that reason (not "max_pool2d reads across them")."""
    model, x = _PadPool().eval(), torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    small, report = compactor.compact(model, x, analysis=analysis)  # type: ignore[arg-type]
    fates = {z.channel: (z.fate, z.reason) for z in report.zeroed}
    assert fates[1] == ("removed", "emits exactly zero")
    assert small.c1.out_channels == 7 and "reads across" not in fates[5][1]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
