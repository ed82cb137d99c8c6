"""Issue 3: zeroed channels are removed exactly, as often as the math allows.

The expected numbers are computed here from the masks and BatchNorm parameters (``zoo.expected_fates``:
a dead channel after conv -> BN -> ReLU carries ``relu(beta - gamma*mean/sqrt(var+eps))``; zero is
removed, a constant into a zero-padded conv is merged into one carrier per group (groups feeding the
same padded convs share one, ``zoo.expected_all``), into a Linear or an unpadded conv it is folded into
the bias), never read back from the compacted model.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from zoo import (
    BY_NAME,
    CARRIER,
    CASES,
    FOLDED,
    KEPT,
    MERGED,
    RELU,
    REMOVED,
    Link,
    Read,
    ResNet,
    ZooResults,
    actual_widths,
    expected_all,
    expected_fates,
    expected_widths,
    mask_ln,
)

import compactor
from compactor.engine.plan import Fate
from compactor.engine.plan.fates import gated_reason

RTOL, ATOL = 1e-4, 1e-5


def _assert_equal_outputs(
    model: nn.Module, small: nn.Module, shape: tuple[int, ...], seeds: tuple[int, ...] = (5, 6)
) -> None:
    model.eval(), small.eval()
    with torch.no_grad():
        for seed in seeds:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


def _engine_fates(report: compactor.CompactionReport, roots: set[str]) -> Counter[str]:
    return Counter(KEPT if z.fate.startswith("kept") else z.fate for z in report.zeroed if z.layer in roots)


def _oracle_fates(model: nn.Module, link: Link) -> Counter[str]:
    return Counter(f for f in expected_fates(model, link).fates if f != "live")


# --- (a) the PyTorch pruning tutorial -------------------------------------------------------------------


class LeNet(nn.Module):
    """The model of https://pytorch.org/tutorials/intermediate/pruning_tutorial.html, as written there.

    Its 3x3 convs and ``fc1`` of 16*5*5 inputs fit a 28x28 image (28 -> 26 -> 13 -> 11 -> 5), not the
    32x32 the tutorial mentions (which gives 16*6*6), so the tests feed 1x1x28x28.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, int(x.nelement() / x.shape[0]))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _tutorial_lenet() -> LeNet:
    torch.manual_seed(0)
    model = LeNet()
    module = model.conv1
    prune.random_unstructured(module, name="weight", amount=0.3)
    prune.l1_unstructured(module, name="bias", amount=3)
    prune.ln_structured(module, name="weight", amount=0.5, n=2, dim=0)
    return model


def test_tutorial_lenet_masks_kept() -> None:
    model = _tutorial_lenet()
    assert hasattr(model.conv1, "weight_mask") and hasattr(model.conv1, "bias_mask")
    x = torch.randn(1, 1, 28, 28)
    small, report = compactor.compact(model, x)

    # ln_structured zeroed 3 of 6 filters; each emits relu(its bias), into conv2 with no padding: fold
    link = Link((("conv1", RELU),), (Read("conv2"),))
    fates = expected_fates(model, link)
    dead = [c for c, f in enumerate(fates.fates) if f != "live"]
    assert len(dead) == 3
    assert all(f in (REMOVED, FOLDED) for f in fates.fates if f != "live")
    assert small.conv1.out_channels == 3 and small.conv2.in_channels == 3
    assert _engine_fates(report, {"conv1"}) == _oracle_fates(model, link)
    assert report.params["after"] == report.params["before"] - 3 * (9 + 1) - 16 * 3 * 9
    assert hasattr(model.conv1, "weight_mask")  # the caller's model keeps its masks
    assert not hasattr(small.conv1, "weight_mask") and not hasattr(small.conv1, "weight_orig")
    _assert_equal_outputs(model, small, (1, 1, 28, 28))


# --- (b) the forum model: a fully pruned conv, then fine-tuned ---------------------------------------------


class ForumNet(nn.Module):
    """Conv -> Conv -> BatchNorm -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.bn(self.conv2(self.conv1(x))), 1))


def _fine_tune(model: nn.Module, shape: tuple[int, ...], classes: int, steps: int, seed: int = 0) -> None:
    """A few SGD steps on random data, masks in place (as a user fine-tunes after pruning)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(*shape, generator=g)
        y = torch.randint(0, classes, (shape[0],), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def test_forum_fully_pruned_conv_fine_tuned() -> None:
    torch.manual_seed(0)
    model = ForumNet()
    prune.random_structured(model.conv2, "weight", amount=1.0, dim=1)
    _fine_tune(model, (8, 3, 6, 6), 4, steps=5)
    assert float(model.bn.bias.detach().abs().min()) > 0  # beta moved away from 0
    assert float(model.bn.running_mean.abs().min()) > 0  # running stats follow conv2's bias

    small, report = compactor.compact(model, torch.randn(2, 3, 6, 6))

    assert any("does not depend on its input" in w and "conv2" in w for w in report.warnings), report.warnings
    assert small.conv1.out_channels >= 1 and small.conv2.out_channels >= 1
    # conv2 reads nothing: conv1's channels all go but one; conv2 emits BN(bias), folded into fc but one
    assert (small.conv1.out_channels, small.conv2.in_channels, small.conv2.out_channels) == (1, 1, 1)
    assert small.bn.num_features == 1 and small.fc.in_features == 36
    _assert_equal_outputs(model, small, (2, 3, 6, 6))


# --- (c) a ResNet-style net, trained, pruned, trained again -------------------------------------------------


def test_resnet_trained_pruned_trained_exact_counts() -> None:
    torch.manual_seed(0)
    model = ResNet(widths=(16, 32), depths=(2, 2))  # 4 basic blocks, the third with a downsample
    shape = (8, 3, 12, 12)
    _fine_tune(model, shape, 10, steps=4, seed=1)
    blocks = model.blocks()
    for b in blocks:
        mask_ln(model.get_submodule(b).conv1, 0.5)
    _fine_tune(model, shape, 10, steps=4, seed=2)

    small, report = compactor.compact(model, torch.randn(2, 3, 12, 12))

    links = [Link(((f"{b}.conv1", f"{b}.bn1", RELU),), (Read(f"{b}.conv2"),)) for b in blocks]
    total: Counter[str] = Counter()
    for link in links:
        oracle = _oracle_fates(model, link)
        assert sum(oracle.values()) == model.get_submodule(link.root).out_channels // 2
        assert oracle[FOLDED] == 0  # conv2 is zero-padded: constants merge, none folds
        assert oracle[CARRIER] == (1 if oracle[MERGED] else 0)  # one carrier per group
        assert _engine_fates(report, {link.root}) == oracle, link.root
        total += oracle
    expected = expected_widths(model, links)
    assert actual_widths(small, list(expected)) == expected
    removed = total[REMOVED] + total[MERGED]
    assert removed == sum(1 for z in report.zeroed if Fate(z.fate).removed)
    assert total[REMOVED] > 0 and total[MERGED] > 0  # both kinds occur with this seed: the test tests both
    _assert_equal_outputs(model, small, (2, 3, 12, 12))


# --- (d) ignored inputs of a Linear; a conv bias folded blockwise through flatten ----------------------------


def test_linear_inputs_ignored_by_next_layer_are_removed_from_producer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    prune.ln_structured(model[2], "weight", amount=0.5, n=1, dim=1)
    ignored = int((model[2].weight.detach() == 0).all(0).sum())
    assert ignored == 16
    small, report = compactor.compact(model, torch.randn(4, 10))
    assert small[0].out_features == 32 - ignored and small[2].in_features == 32 - ignored
    assert sum(z.reason == "no layer reads it" for z in report.zeroed) == ignored
    _assert_equal_outputs(model, small, (4, 10))


class ConvBiasFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def test_conv_bias_folded_blockwise_through_flatten() -> None:
    torch.manual_seed(0)
    model = ConvBiasFlatten().eval()
    prune.ln_structured(model.conv, "weight", amount=0.5, n=2, dim=0)  # bias kept: dead filters emit it
    dead = [c for c in range(6) if bool((model.conv.weight.detach()[c] == 0).all())]
    assert len(dead) == 3
    small, report = compactor.compact(model, torch.randn(2, 3, 4, 4))

    assert small.conv.out_channels == 3 and small.fc.in_features == 3 * 16
    w = model.fc.weight.detach().view(5, 6, 16)
    bias = model.conv.bias.detach()
    expected_bias = model.fc.bias.detach() + sum(bias[c] * w[:, c].sum(1) for c in dead)
    torch.testing.assert_close(small.fc.bias.detach(), expected_bias)
    assert Counter(z.fate for z in report.zeroed) == {Fate.FOLDED.value: 3}
    _assert_equal_outputs(model, small, (2, 3, 4, 4))


# --- (e) how much of what the math allows is removed, over the zoo ----------------------------------------


def test_removed_fraction_over_the_zoo(zoo_results: ZooResults, capsys: pytest.CaptureFixture[str]) -> None:
    zeroed = removed = possible = 0
    lines = []
    for case in CASES:
        model, _, report = zoo_results.get(case)
        case_possible = sum(len(v.removed) for v in expected_all(model, case.links, case.shape))
        case_removed = sum(1 for z in report.zeroed if Fate(z.fate).removed)
        zeroed += len(report.zeroed)
        removed += case_removed
        possible += case_possible
        lines.append(
            f"  {case.name:24} zeroed {len(report.zeroed):3}  removed {case_removed:3} / {case_possible:3} possible"
        )
        assert case_removed == case_possible, case.name
    with capsys.disabled():
        print(
            f"\nzoo: {zeroed} zeroed channels, {removed} removed of {possible} the math allows "
            f"({removed / possible:.0%} of the maximum, {removed / zeroed:.0%} of all zeroed)"
        )
        print("\n".join(lines))
    assert removed == possible


class GatedStream(nn.Module):
    """``relu(conv(x)) * sigmoid(gate(x))`` (or ``+``): a dead conv channel emitting 0 is zero after a
    multiply, whatever the gate; after an add it is the gate's channel, alive."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = F.relu(self.conv(x)), torch.sigmoid(self.gate(x))
        return self.out(a * g if self.op == "mul" else a + g).mean((2, 3))


@pytest.mark.parametrize("op", ["mul", "add"])
def test_dead_channel_times_gate_is_removed_plus_gate_is_not(op: str) -> None:
    torch.manual_seed(0)
    model = GatedStream(op).eval()
    dead = [0, 1, 2, 3, 4]
    prune.custom_from_mask(model.conv, "weight", torch.ones(8, 3, 3, 3).index_fill_(0, torch.tensor(dead), 0))
    with torch.no_grad():  # dead filters emit relu(bias): 0 for 0, 1, 2, 4; 0.5 for 3 (varies with the gate)
        model.conv.bias[torch.tensor(dead)] = torch.tensor([0.0, 0.0, -0.3, 0.5, -1.0])
    small, report = compactor.compact(model, torch.randn(2, 3, 6, 6))
    _assert_equal_outputs(model, small, (2, 3, 6, 6))
    if op == "mul":
        assert (small.conv.out_channels, small.gate.out_channels, small.out.in_channels) == (4, 4, 4)
        assert Counter(z.fate for z in report.zeroed) == {Fate.REMOVED.value: 4, Fate.KEPT_VARYING.value: 1}
        # relu(0.5) * gate stays, and the reason names the dead factor and the live one
        assert next(z for z in report.zeroed if z.channel == 3).reason == gated_reason(["conv"], ["gate"])
    else:
        assert (small.conv.out_channels, small.gate.out_channels, small.out.in_channels) == (8, 8, 8)
        assert not report.zeroed


class DepthwiseSE(nn.Module):
    """An inverted residual's middle (timm ``InvertedResidual`` with ``SqueezeExcite``, torchvision
    ``MBConv``): pointwise expand, BN, SiLU, depthwise 3x3 (zero padded), BN, SiLU, ``x * sigmoid(fc2(silu(
    fc1(mean(x)))))``, pointwise project; ``se=False``: no gate (MobileNetV2)."""

    def __init__(self, se: bool = True) -> None:
        super().__init__()
        self.se = se
        self.pw, self.bn1 = nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.pwl, self.bn3 = nn.Conv2d(16, 6, 1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn2(self.dw(F.silu(self.bn1(self.pw(x))))))
        if self.se:
            h = h * torch.sigmoid(self.fc2(F.silu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.bn3(self.pwl(h))


def _depthwise_se(se: bool) -> nn.Module:
    torch.manual_seed(0)
    model = DepthwiseSE(se)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1)
    mask = torch.ones(16, dtype=torch.bool)
    for layer, dead in ((model.dw, [0, 1, 2, 3]), (model.fc2, [0, 1, 4, 5]), (model.pw, [6])):
        prune.custom_from_mask(
            layer,
            "weight",
            mask.index_fill(0, torch.tensor(dead), False).float().view(-1, 1, 1, 1).expand_as(layer.weight),
        )
    return model.eval()


@pytest.mark.parametrize("se", [True, False])
def test_zero_depthwise_filters_are_constants_and_with_a_constant_gate_go(se: bool) -> None:
    """A zero depthwise filter emits its bias whatever the expand conv writes: a constant (the expand
    conv's row is live). Without a gate it folds into the project conv (MobileNetV2). Behind a gate:
    times the constant gate of a zero ``fc2`` row (0, 1) it is a constant and goes; times a live gate (2,
    3) it varies with the input and stays; a live channel times a constant gate (4, 5) stays. Each kept
    one names its dead factor and its live one. Exact at other sizes (the constant has no border)."""
    model = _depthwise_se(se)
    small, report = compactor.compact(model, torch.randn(2, 4, 8, 8))
    fates = {z.channel: (z.fate, z.reason) for z in report.zeroed}
    if se:
        assert {r for r, (fate, _) in fates.items() if Fate(fate).removed} == {0, 1}
        assert (small.pw.out_channels, small.dw.out_channels, small.fc2.out_channels) == (14, 14, 14)
        assert (small.fc1.in_channels, small.pwl.in_channels) == (14, 14)
        assert {r: why for r, (_, why) in fates.items() if r not in (0, 1)} == {
            2: gated_reason(["dw"], ["fc2", "pw"]),
            3: gated_reason(["dw"], ["fc2", "pw"]),
            4: gated_reason(["fc2"], ["pw"]),
            5: gated_reason(["fc2"], ["pw"]),
            6: gated_reason(["pw"], ["fc2"]),  # a constant into the zero-padded depthwise conv, gated
        }
    else:  # 0-3 folded; 6 (the expand conv's zero row) is a border map, alone in its group
        assert set(fates) == {0, 1, 2, 3, 6}
        assert all(fates[r][0] == Fate.FOLDED.value for r in (0, 1, 2, 3))
        assert small.pwl.in_channels == 16 - 4 - Fate(fates[6][0]).removed
    # the depthwise conv's zero rows are pruned filters of their own, each with its channel's fate
    dw_rows = {f.row: (f.fate, f.reason) for f in report.filters if f.layer == "dw"}
    assert dw_rows == {r: fates[r] for r in range(4)}
    for shape in [(2, 4, 8, 8), (1, 4, 5, 9), (1, 4, 1, 2)]:
        _assert_equal_outputs(model, small, shape)


def test_a_ghost_modules_channel_read_at_two_inputs_merges_at_each() -> None:
    """timm's ``GhostModule``: ``cat([x1, cheap(x1)])`` with ``cheap`` depthwise. A zero primary filter makes
    one root channel that the next conv reads at two inputs: a constant at the first (folded) and, through
    the zero-padded depthwise conv, a map of the border pattern at the second (16 patterns for a 3x3, maps
    one pixel wide included). Each input is profiled and merged on its own (was: kept, "read at several
    inputs"): at most a basis of 16 channels stays, and the result is exact at every size."""
    import replicas_timm as R

    torch.manual_seed(0)
    model = nn.Sequential(R.GhostModule(4, 64), nn.Conv2d(64, 6, 1))
    with torch.no_grad():
        for bn in (model[0].primary_conv[1], model[0].cheap_operation[1]):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(0, 1), bn.running_mean.uniform_(-1, 0)
    prune.custom_from_mask(
        model[0].primary_conv[0], "weight", torch.ones(32, 4, 1, 1).index_fill_(0, torch.arange(28), 0)
    )
    model.eval()
    small, report = compactor.compact(model, torch.randn(2, 4, 8, 8))
    assert len(report.zeroed) == 28 and not [z for z in report.zeroed if "several inputs" in z.reason]
    fates = Counter(z.fate for z in report.zeroed)
    gone = sum(n for fate, n in fates.items() if Fate(fate).removed)
    assert fates[Fate.MERGED.value] > 0 and fates[Fate.CARRIER.value] > 0 and 28 - gone <= 16
    assert small[0].primary_conv[0].out_channels == small[0].cheap_operation[0].out_channels == 32 - gone
    assert small[1].in_channels == 2 * (32 - gone)
    for shape in [(2, 4, 8, 8), (1, 4, 5, 9), (1, 4, 1, 2), (1, 4, 2, 1)]:
        _assert_equal_outputs(model, small, shape)


# --- (f) position-varying constants: exact at every resolution (issue 11) ---------------------------------

_VARYING = ("inverted_residual", "tv_mobilenet_v2", "mnasnet", "efficientnet_mbconv", "inception_pool")


@pytest.mark.parametrize("name", _VARYING)
def test_position_varying_merges_are_exact_at_other_resolutions(name: str, zoo_results: ZooResults) -> None:
    """Compacted at one input size, the model gives the masked model's outputs at others: odd, uneven,
    and small enough that the deepest maps are 1 or 2 pixels wide (border patterns the example lacks)."""
    case = BY_NAME[name]
    model, small, report = zoo_results.get(case)
    kinds = Counter(z.fate for z in report.zeroed)
    if name == "efficientnet_mbconv":  # the squeeze-excite gate multiplies every dead expand filter
        assert kinds == {Fate.KEPT_VARYING.value: 48}
        assert {z.reason for z in report.zeroed} == {gated_reason(["mb.block.0.0"], ["mb.block.2.fc2"])}
    else:
        assert kinds[Fate.MERGED.value] > 0 and kinds[Fate.CARRIER.value] > 0
    for shape in [(1, 3, 32, 32), (1, 3, 37, 41), (2, 3, 9, 7), (1, 3, 3, 5)]:
        _assert_equal_outputs(model, small, shape, seeds=(7,))


@pytest.mark.parametrize(
    ("k", "stride", "pad", "dilation"),
    [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (5, 2, 2, 1), (3, 1, 2, 2), (4, 2, 1, 1)],
)
def test_border_patterns_are_every_pattern_at_any_size(k: int, stride: int, pad: int, dilation: int) -> None:
    """``axis_patterns`` enumerates sizes up to a bound; ten times further finds nothing new."""
    from compactor.layers.conv import axis_patterns

    found = set(axis_patterns(k, stride, pad, pad, dilation))
    far: set[tuple[int, ...]] = set()
    for n in range(1, 10 * (k * dilation + 2 * pad + 2 * stride)):
        for i in range((n + 2 * pad - dilation * (k - 1) - 1) // stride + 1):
            far.add(tuple(u for u in range(k) if 0 <= i * stride - pad + u * dilation < n))
    assert found == far
    assert len(found) == {(3, 1, 1, 1): 4, (3, 2, 1, 1): 4, (5, 1, 2, 1): 9, (5, 2, 2, 1): 6}.get(
        (k, stride, pad, dilation), len(far)
    )


@pytest.mark.parametrize(("k", "stride", "dilation"), [(3, 1, 1), (3, 2, 1), (5, 2, 1), (4, 2, 1), (3, 2, 2)])
def test_same_border_patterns_are_every_pattern_at_any_size(k: int, stride: int, dilation: int) -> None:
    """TensorFlow's 'SAME' padding changes with the input's size (and turns asymmetric, the larger half
    after): ``same_axis_patterns`` finds what ten times its bound finds."""
    from compactor.layers.conv import same_axis_patterns, same_padding

    found = set(same_axis_patterns(k, stride, dilation))
    far: set[tuple[int, ...]] = set()
    for n in range(1, 10 * (3 * k * dilation + 2 * stride)):
        total = same_padding(n, k, stride, dilation)
        before = total // 2
        for i in range((n + total - dilation * (k - 1) - 1) // stride + 1):
            far.add(tuple(u for u in range(k) if 0 <= i * stride - before + u * dilation < n))
    assert found == far
    assert len(found) == {(3, 1, 1): 4, (3, 2, 1): 4, (5, 2, 1): 6}.get((k, stride, dilation), len(far))


@pytest.mark.parametrize("same", [False, True], ids=["static", "tf-same"])
@pytest.mark.parametrize(("k", "stride"), [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_border_values_are_what_the_conv_computes_at_every_size(k: int, stride: int, same: bool) -> None:
    """A zero-padded depthwise conv on constant channels, run at every size from 1x1 to 12x12: each output
    value is one of ``border_values``, and every one of them occurs. ``tf-same``: timm's ``Conv2dSame``,
    padded in its forward by the input's size."""
    from replicas_more import Conv2dSame

    from compactor.layers import shrinker_for

    torch.manual_seed(0)
    conv = (
        Conv2dSame(4, 4, k, stride, groups=4) if same else nn.Conv2d(4, 4, k, stride, k // 2, groups=4)
    ).double()
    k_in = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    shrinker = shrinker_for(conv)
    assert shrinker is not None and not shrinker.can_fold(conv)
    values = shrinker.border_values(conv, torch.arange(4), k_in)
    per_axis = {(3, 1): 4, (3, 2): 4, (5, 1): 9, (5, 2): 6}[(k, stride)]
    assert values is not None and values.shape == (4, per_axis**2)
    seen: set[int] = set()
    with torch.no_grad():
        for h in range(1, 13):
            for w in range(1, 13):
                out = conv(k_in.view(1, 4, 1, 1).expand(1, 4, h, w)).flatten(2)[0]  # [channels, positions]
                match = (out[:, :, None] - values[:, None, :]).abs().amax(0) < 1e-12  # [positions, patterns]
                assert bool(match.any(1).all()), (h, w)
                seen |= set(match.nonzero()[:, 1].tolist())
    assert seen == set(range(values.shape[1]))
    plain = nn.Conv2d(4, 4, k, stride, 0, groups=4)
    assert shrinker.border_values(plain, torch.arange(4), k_in) is None  # no padding: a constant stays one


class SpatialBetween(nn.Module):
    """Dead expand filters into a padded depthwise conv, then an op that reads neighbours before the
    projection (``pool``), or a functional zero pad before an unpadded depthwise conv (``pad``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.expand, self.bn1 = nn.Conv2d(4, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, 1, 1 if kind == "pool" else 0, groups=24, bias=False)
        self.bn2, self.project = nn.BatchNorm2d(24), nn.Conv2d(24, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.expand(x)))
        if self.kind == "pad":
            y = F.pad(y, (1, 1, 1, 1))
        y = F.relu6(self.bn2(self.dw(y)))
        if self.kind == "pool":
            y = F.max_pool2d(y, 3, 1, 1)
        return self.project(y).mean((2, 3))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("pool", "do not act on each position alone"),  # the probe reads neighbours' values back
        ("pad", "a layer of its own per channel"),  # no depthwise layer to probe: proportional maps only
    ],
)
def test_position_varying_channels_stay_where_the_math_does_not_hold(kind: str, reason: str) -> None:
    torch.manual_seed(0)
    model = SpatialBetween(kind)
    dead = list(range(0, 24, 2))
    mask_channels = torch.ones(24, 4, 1, 1).index_fill_(0, torch.tensor(dead), 0)
    prune.custom_from_mask(model.expand, "weight", mask_channels)
    with torch.no_grad():  # dead filters emit relu6(beta) > 0: constants, varying after the depthwise conv
        model.bn1.bias.copy_(torch.rand(24) + 0.5)
        model.bn2.running_mean.copy_(torch.randn(24) * 0.3)
        model.bn2.running_var.copy_(torch.rand(24) + 0.5)
    model.eval()
    small, report = compactor.compact(model, torch.randn(2, 4, 10, 10))
    assert [z.channel for z in report.zeroed] == dead
    kept = [z for z in report.zeroed if z.fate == Fate.KEPT_VARYING.value]
    gone = [z for z in report.zeroed if z.fate != Fate.KEPT_VARYING.value]
    assert kept and all(reason in z.reason for z in kept), {z.reason for z in kept}
    assert all(z.fate == Fate.REMOVED.value and "emits exactly zero" in z.reason for z in gone)  # relu6 clips
    assert small.expand.out_channels == 24 - len(gone)
    for shape in [(1, 4, 10, 10), (1, 4, 7, 9)]:
        _assert_equal_outputs(model, small, shape, seeds=(3,))


def test_a_coupling_cache_traces_a_structure_once_and_each_model_is_verified() -> None:
    """Two models built alike (the blocks of one LLM) with different zeros: one trace, each plan its own."""
    from compactor.engine.coupling.groups import CouplingCache

    cache = CouplingCache()
    widths = []
    for dead in ([8], [8, 9, 10]):  # beside the depthwise zeros 0-3 and the expand conv's 6
        model = _depthwise_se(False)
        prune.custom_from_mask(
            model.pw, "weight", torch.ones(16, 4, 1, 1).index_fill_(0, torch.tensor(dead), 0)
        )
        small, report = compactor.compact(model, torch.randn(2, 4, 8, 8), coupling_cache=cache)
        _assert_equal_outputs(model, small, (1, 4, 5, 9))
        widths.append(len(report.zeroed))
    assert cache.traced == 1 and widths == [6, 8]
