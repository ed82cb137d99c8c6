"""timm blocks from issue #11, replicated in ``replicas_timm``: each compacts exactly, with every fate predicted
at planning time (no group is restored by a failed verification), and the widths the weights dictate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import replicas_timm as R
import torch
from torch import nn

import compactor
from compactor.engine.coupling import Analysis
from compactor.engine.plan import Fate
from compactor.layers import own_forward
from compactor.measure.timing import count_macs
from compactor.modules import baked, clone_module


def _compact(
    make: Callable[[], nn.Module], shape: tuple[int, ...], analysis: Analysis = "auto"
) -> tuple[nn.Module, nn.Module, Any, torch.Tensor]:
    torch.manual_seed(0)
    model = R.masked(make(), shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    small, report = compactor.compact(model, x, analysis=analysis)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    fates = report.to_dict()["zeroed"]
    assert [
        f for f in fates if f["fate"] == Fate.KEPT_UNVERIFIED.value
    ] == []  # predicted, never found by failure
    return model, small, fates, x


def _widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = (m.out_channels, m.in_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.out_features, m.in_features)
    return out


def _dead(model: nn.Module, name: str) -> set[int]:
    w = model.get_submodule(name).weight
    return {i for i in range(w.shape[0]) if bool((w[i] == 0).all())}


def _zero_rows(layer: nn.Module) -> int:
    w = layer.weight.detach()
    return int((w.flatten(1) == 0).all(1).sum())


def _reasons(fates: list[dict[str, Any]], layer: str) -> set[str]:
    return {f["reason"] for f in fates if f["layer"] == layer}


# --- copies of models that cache computed tensors --------------------------------------------------------------


def test_clone_module_copies_a_cache_of_non_leaf_tensors() -> None:
    attn = R.LevitAttention(16, 4, 2, 2.0, resolution=3).eval()
    attn(torch.randn(1, 9, 16))  # eval mode, grad on: the cache holds attention_biases[:, idxs], a non-leaf
    cached = attn.attention_bias_cache["cpu"]
    assert cached.grad_fn is not None
    copy = clone_module(attn)
    assert isinstance(copy, R.LevitAttention)
    assert copy.attention_bias_cache["cpu"] is not cached
    assert copy.attention_bias_cache["cpu"].grad_fn is None
    torch.testing.assert_close(copy.attention_bias_cache["cpu"], cached.detach(), rtol=0, atol=0)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(copy(x), attn(x), rtol=0, atol=0)


def test_levit_with_a_filled_attention_bias_cache_compacts() -> None:
    shape = (1, 3, 64, 64)
    torch.manual_seed(0)
    model = R.masked(R.Levit(), shape)
    model(torch.randn(*shape))  # a user's evaluation fills every cache, grad on
    x = torch.randn(*shape)
    small, report = compactor.compact(model, x)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    widths, dense = _widths(small), _widths(baked(model))
    for i in range(2):
        ln1 = f"stages.{i}.mlp.ln1.linear"
        gone = _zero_rows(baked(model).get_submodule(ln1))
        assert gone == R.pruned_count(64)
        assert widths[ln1] == (64 - gone, 32)
        assert widths[f"stages.{i}.mlp.ln2.linear"] == (32, 64 - gone)
    kept = {n: w for n, w in dense.items() if ".mlp." not in n and not n.startswith("stem.")}
    assert {n: w for n, w in widths.items() if ".mlp." not in n and not n.startswith("stem.")} == kept
    # the stem's convs feed zero-padded 3x3 convs: their constant channels merge into one carrier each
    cin = 3
    for i, width in enumerate((4, 8, 16), start=1):
        zeros = _zero_rows(baked(model).get_submodule(f"stem.conv{i}.linear"))
        assert zeros == R.pruned_count(width)
        assert widths[f"stem.conv{i}.linear"] == (width - zeros + 1, cin)
        cin = width - zeros + 1
    assert widths["stem.conv4.linear"] == (
        32,
        cin,
    )  # it writes the residual stream, which every block adds to
    assert _reasons(report.to_dict()["zeroed"], "head.linear") == {"the channel is part of a model output"}


# --- MACs of models that pass a view of a parameter between modules -------------------------------------------


# (writer, reader) Linear pairs whose hidden channels go: the Mlps. TalkingHeadAttn's head mixing keeps its
# heads: one that proj_l zeroes is constant over the keys, so its softmax is 1/N, a constant at the example's
# token count only (test_labels_review: a constant through a size-dependent reduction stays)
PAIRS = (("mlp.fc1", "mlp.fc2"),)


def _macs_saved(dense: nn.Module) -> int:
    """What removing the zeroed rows of every pair's writer (and the reader's columns) saves, row by row."""
    rows: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: rows.__setitem__(n, a[0].numel() // m.in_features))
        for n, m in dense.named_modules()
        if n.endswith(tuple(w for w, _ in PAIRS))
    ]
    try:
        with torch.no_grad():
            dense(torch.randn(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    saved = 0
    for name, n in rows.items():
        writer, reader = next((w, r) for w, r in PAIRS if name.endswith(w))
        first = dense.get_submodule(name)
        second = dense.get_submodule(name[: -len(writer)] + reader)
        saved += n * _zero_rows(first) * (first.in_features + second.out_features)
    return saved


@pytest.mark.parametrize("make", [R.PoolingVisionTransformer, R.Cait], ids=["pit", "cait"])
def test_macs_count_after_compaction_with_a_cls_token(make: Callable[[], nn.Module]) -> None:
    model, small, fates, x = _compact(make, (1, 3, 32, 32))
    heads = {f["fate"] for f in fates if f["layer"].endswith("attn.proj_l")}
    assert heads <= {Fate.KEPT_VARYING.value} and (heads != set()) == (make is R.Cait)
    dense = baked(model)
    saved = _macs_saved(dense)
    assert saved > 0
    assert count_macs(small, x) == count_macs(dense, x) - saved
    widths, before = _widths(small), _widths(dense)
    for name, (out, cin) in before.items():
        writer = next((w for w, _ in PAIRS if name.endswith(w)), None)
        reader = next((w for w, r in PAIRS if name.endswith(r)), None)
        if writer is not None:
            gone = _zero_rows(dense.get_submodule(name))
            assert gone == R.pruned_count(out)
            assert widths[name] == (out - gone, cin)
        elif reader is not None:
            pair = next(p for p in PAIRS if p[0] == reader)
            gone = _zero_rows(dense.get_submodule(name[: -len(pair[1])] + pair[0]))
            assert widths[name] == (out, cin - gone)
        else:
            assert widths[name] == (out, cin), name


def test_count_macs_leaves_requires_grad_as_it_was() -> None:
    model = R.Cait().eval()
    model.head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert count_macs(model, torch.randn(1, 3, 32, 32)) > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# --- what verification used to find by failure, predicted ------------------------------------------------------


def test_ghostnet_cat_of_a_depthwise_conv_is_kept_by_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch-Pruning's answer, checked by the adapter (``auto`` answers with compactor's labels here: below)."""
    model, small, fates, _ = _compact(R.GhostNet, (1, 3, 32, 32), "torch-pruning")
    dense, widths = baked(model), _widths(small)
    # the cat of a depthwise conv's input and output: no channel of it is listed as removable
    for root in ("blocks.1.se.conv_expand", "blocks.1.shortcut.2", "conv_stem"):
        assert not any(Fate(f["fate"]).removed for f in fates if f["layer"] == root), root
    rd = _zero_rows(dense.get_submodule("blocks.1.se.conv_reduce"))
    assert rd == R.pruned_count(12)
    assert widths["blocks.1.se.conv_reduce"] == (12 - rd, 48)
    assert widths["blocks.1.se.conv_expand"] == (48, 12 - rd)
    head = _zero_rows(dense.get_submodule("conv_head"))
    # the stream blocks 1 and 2 write (cat(primary, cheap) + shortcut, 12 + 12 channels): a channel whose
    # writers are all zero there (both primary convs, both cheap depthwise filters, the shortcut's two rows)
    # is a constant at both of its places, folded
    both = [
        r
        for r in range(12)
        if all(
            r in _dead(dense, f"blocks.{b}.ghost2.{conv}.0")
            for b in (1, 2)
            for conv in ("primary_conv", "cheap_operation")
        )
        and {r, r + 12} <= _dead(dense, "blocks.1.shortcut.2")
    ]
    assert both and {f["channel"] for f in fates if f["layer"] == "blocks.1.ghost2.primary_conv.0"} == set(
        both
    )
    assert widths["conv_head"] == (64 - head, 24 - 2 * len(both))
    assert widths["classifier"] == (10, 64 - head)
    # the odd ghost module: cat of 14 + 14 channels, then [:, :27]: a slice with a size written in the code
    sliced = _reasons(fates, "blocks.2.ghost1.primary_conv.0")
    assert sliced == {"the channels pass through a slice whose sizes are fixed in the forward code"}
    assert widths["blocks.2.ghost1.primary_conv.0"] == (14, 24 - 2 * len(both))
    assert widths["blocks.2.ghost2.primary_conv.0"] == (12 - len(both), 27)


def test_sk_resnet_split_attention_is_kept_by_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch-Pruning's answer, checked by the adapter (``auto`` answers with compactor's labels here: below)."""
    model, small, fates, _ = _compact(R.SKResNet, (1, 3, 16, 16), "torch-pruning")
    dense, widths = baked(model), _widths(small)
    for b in range(2):
        sk = f"layer1.{b}.conv2"
        rd = _zero_rows(dense.get_submodule(f"{sk}.attn.fc_reduce"))
        assert rd == R.pruned_count(8)
        assert widths[f"{sk}.attn.fc_reduce"] == (8 - rd, 16)
        assert widths[f"{sk}.attn.fc_select"] == (32, 8 - rd)
        assert _reasons(fates, f"layer1.{b}.conv1.conv") == {
            "the channels pass through a split whose sizes are fixed in the forward code"
        }
        assert all("torch-pruning mapped" in r for r in _reasons(fates, f"{sk}.attn.fc_select"))
        for path in range(2):
            assert widths[f"{sk}.paths.{path}.conv"] == (16, 8)
    writers = ["conv1", "layer1.0.conv3.conv", "layer1.1.conv3.conv"]
    rows = [dense.get_submodule(w).weight.detach().flatten(1).eq(0).all(1) for w in writers]
    dead = int((rows[0] & rows[1] & rows[2]).sum())  # the residual stream: every writer's row zero
    assert widths["conv1"] == (64 - dead, 3)
    assert widths["fc"] == (10, 64 - dead)


@pytest.mark.parametrize(
    ("make", "shape", "cut", "reason"),
    [
        (
            R.GhostNet,
            (1, 3, 32, 32),
            "blocks.2.ghost1.primary_conv.0",
            "slice whose sizes are fixed in the forward code",
        ),
        (
            R.SKResNet,
            (1, 3, 16, 16),
            "layer1.0.conv1.conv",
            "split whose sizes are fixed in the forward code",
        ),
    ],
    ids=["ghostnet", "sk_resnet"],
)
def test_the_labels_predict_the_same_widths_as_torch_pruning(
    make: Callable[[], nn.Module],
    shape: tuple[int, ...],
    cut: str,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``auto`` (Torch-Pruning's groups hold mappings that cannot be right, so compactor's own labels
    answer): every width equals Torch-Pruning's, nothing is found by failed verification, and the channels
    of the literal slice or split stay with that reason."""
    _, small_labels, fates, _ = _compact(make, shape)
    _, small_tp, _, _ = _compact(make, shape, "torch-pruning")
    assert _widths(small_labels) == _widths(small_tp)
    assert all(reason in r for r in _reasons(fates, cut)) and _reasons(fates, cut)


def test_nf_resnet_standardised_convs_are_kept_and_the_rest_goes() -> None:
    model, small, fates, _ = _compact(R.NFResNet, (1, 3, 16, 16))
    dense, widths = baked(model), _widths(small)
    for name, m in dense.named_modules():
        if isinstance(m, R.ScaledStdConv2d):
            assert widths[name] == (m.out_channels, m.in_channels)
            reasons = _reasons(fates, name)
            assert all("ScaledStdConv2d has a forward of its own" in r for r in reasons), name
    for b in range(2):
        rd = _zero_rows(dense.get_submodule(f"stages.{b}.attn_last.fc1"))
        assert rd == R.pruned_count(4)
        assert widths[f"stages.{b}.attn_last.fc1"] == (4 - rd, 32)
        assert widths[f"stages.{b}.attn_last.fc2"] == (32, 4 - rd)


# --- the check behind it ---------------------------------------------------------------------------------------


class _AnnotatedLinear(nn.Linear):
    """timm's ``Linear``: a forward of its own that computes nn.Linear's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(input, self.weight, self.bias)


def test_own_forward_tells_weight_standardisation_from_a_plain_override() -> None:
    std = R.ScaledStdConv2d(4, 6, 3)
    assert own_forward(std) == (
        "ScaledStdConv2d has a forward of its own that does not compute Conv2d's on its weights "
        "(weight standardisation, say): its channels are kept"
    )
    assert own_forward(_AnnotatedLinear(4, 3)) is None
    assert own_forward(nn.Conv2d(4, 6, 3)) is None
    assert own_forward(nn.BatchNorm2d(4)) is None


class _PadLargerHalfFirst(nn.Conv2d):
    """'SAME' padding's amount, but the larger half before: not what TensorFlow (or timm) does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compactor.layers.conv import same_padding

        pads = []
        for n, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = same_padding(n, k, s)
            pads += [total - total // 2, total // 2]
        return self._conv_forward(nn.functional.pad(x, pads), self.weight, self.bias)


def test_own_forward_knows_tf_same_padding_and_nothing_like_it() -> None:
    """timm's ``Conv2dSame`` is a conv on a zero-padded input (``known_variant``), planned as one; a conv that
    pads by the same amount but the other way round at odd totals is not, and is kept whole."""
    from replicas_more import Conv2dSame

    from compactor.layers import shrinker_for

    for stride in (1, 2):
        same = Conv2dSame(4, 6, 3, stride)
        assert own_forward(same) is None
        shrinker = shrinker_for(same)
        assert shrinker is not None and shrinker.known_variant(same) is not None
        assert not shrinker.can_fold(same)
    assert shrinker.can_fold(Conv2dSame(4, 6, 1, 2))  # a 1x1 window never reaches the padding
    other = _PadLargerHalfFirst(4, 6, 4, 2)  # 4 taps, stride 2: the totals 2 and 3 of even and odd sizes
    assert own_forward(other) == (
        "_PadLargerHalfFirst has a forward of its own that does not compute Conv2d's on its weights "
        "(weight standardisation, say): its channels are kept"
    )


class _PadByWidth(nn.Conv2d):
    """'SAME' padding of both axes by the input's width (code written for square images): what 'SAME' does on
    a square input only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compactor.layers.conv import same_padding

        total = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        pads = [total // 2, total - total // 2] * 2
        return self._conv_forward(nn.functional.pad(x, pads), self.weight, self.bias)


@pytest.mark.parametrize(
    ("cls", "k", "stride"),
    [(_PadByWidth, 5, 2), (_PadLargerHalfFirst, 2, 4), (_PadLargerHalfFirst, 5, 5)],
    ids=["by-width-5x5-s2", "larger-first-2x2-s4", "larger-first-5x5-s5"],
)
def test_same_probe_sees_every_padding_amount_and_unequal_axes(
    cls: type[nn.Conv2d], k: int, stride: int
) -> None:
    """Paddings that agree with 'SAME' on square inputs, or at the sizes whose totals are even (a stride past
    the window: 2 taps at stride 4 pad 0 or 1), are told apart from it: the probe takes every size modulo the
    stride on each axis, the axes of different sizes. Each would put windows where 'SAME' never does, where a
    profile measured on 'SAME''s border patterns does not hold."""
    from compactor.layers.conv import same_padded

    conv = cls(4, 4, k, stride, groups=4)
    assert not same_padded(conv)
    assert own_forward(conv) == (
        f"{cls.__name__} has a forward of its own that does not compute Conv2d's on its weights "
        "(weight standardisation, say): its channels are kept"
    )
