"""The timm models of issue #11 that crashed, hung or ran for minutes (HaloNet, MaxViT, EfficientViT MIT and
MSRA, XCiT, GC-ViT, EfficientFormer, TinyViT), replicated in ``replicas_more``: each compacts within the time
limit, exactly (fresh inputs), with no channel found by a failed verification, and with the hidden widths
the weights dictate."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import replicas_more as R
import torch
from replicas_timm import pruned_count
from torch import nn
from torch.nn.utils import prune
from zoo import ChannelsLastFlatten

import compactor
from compactor.engine.plan import Fate
from compactor.engine.plan.fates import gated_reason
from compactor.modules import baked

RTOL, ATOL = 1e-4, 1e-5

# name: (model, input shape, (writer, reader) suffixes whose hidden channels go: the writer's rows the mask
# zeroes are removed or folded into the reader)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[tuple[str, str], ...]]] = {
    "halonet": (
        R.HaloNet,
        (1, 3, 32, 32),
        (("conv1_1x1.conv", "self_attn.q"), ("conv1_1x1.conv", "self_attn.kv")),
    ),
    "maxvit": (
        R.MaxVit,
        (1, 3, 64, 64),
        (("mlp.fc1", "mlp.fc2"), ("se.fc1", "se.fc2"), ("head.pre_logits.fc", "head.fc")),
    ),
    "efficientvit_mit_b": (R.EfficientVit, (1, 3, 64, 64), (("head.in_conv.conv", "head.classifier.0"),)),
    "efficientvit_mit_l": (
        R.EfficientVitLarge,
        (1, 3, 64, 64),
        (("head.in_conv.conv", "head.classifier.0"),),
    ),
    "efficientvit_msra": (
        R.EfficientVitMsra,
        (1, 3, 128, 128),
        (("m.pw1.conv", "m.pw2.conv"), ("se.fc1", "se.fc2")),
    ),
    "xcit": (R.Xcit, (1, 3, 32, 32), (("mlp.fc1", "mlp.fc2"),)),
    "gcvit": (R.GlobalContextVit, (1, 3, 64, 64), (("mlp.fc1", "mlp.fc2"), ("se.fc1", "se.fc2"))),
    "efficientformer": (R.EfficientFormer, (1, 3, 64, 64), (("mlp.fc1", "mlp.fc2"),)),
    "tinyvit": (R.TinyVit, (1, 3, 64, 64), (("mlp.fc1", "mlp.fc2"),)),
}


def _width(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Conv2d):
        return m.out_channels, m.in_channels
    assert isinstance(m, nn.Linear)
    return m.out_features, m.in_features


def _zero_rows(m: nn.Module) -> int:
    return int((m.weight.detach().flatten(1) == 0).all(1).sum())


def _compact(name: str) -> tuple[nn.Module, nn.Module, list[dict[str, Any]]]:
    make, shape, _ = CASES[name]
    torch.manual_seed(0)
    model = R.masked(make(), shape)
    model(torch.randn(*shape))  # a user's evaluation: attention-bias caches fill, grad on
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    small, report = compactor.compact(model, x, time_limit=60)
    with torch.no_grad():
        for seed in (5, 6):
            y = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(small(y), model(y), rtol=RTOL, atol=ATOL)
    fates: list[dict[str, Any]] = report.to_dict()["zeroed"]
    return model, small, fates


@pytest.mark.parametrize("name", list(CASES))
def test_compacts_exactly_with_every_fate_predicted(name: str) -> None:
    """No exception, no time-out, outputs equal on fresh inputs, no channel kept by a failed verification;
    every (writer, reader) pair loses exactly the writer's zeroed rows."""
    model, small, fates = _compact(name)
    assert [f for f in fates if f["fate"] == Fate.KEPT_UNVERIFIED.value] == []
    assert any(Fate(f["fate"]).removed for f in fates)
    dense, modules = baked(model), dict(small.named_modules())
    names = {n for n, _ in dense.named_modules()}
    pairs = 0
    for writer, reader in CASES[name][2]:
        for path, m in dense.named_modules():
            prefix = path[: -len(writer)]
            if not path.endswith(writer) or prefix + reader not in names:
                continue
            out, _ = _width(m)
            gone = _zero_rows(m)
            assert gone == pruned_count(out), path
            assert _width(modules[path])[0] == out - gone, path
            assert _width(modules[prefix + reader])[1] == out - gone, prefix + reader
            pairs += 1
    assert pairs >= len(CASES[name][2])


@pytest.mark.parametrize("make", [R.EfficientFormer, R.TinyVit, R.EfficientVitMsra])
def test_attention_bias_caches_hold_non_leaf_tensors_before_compaction(make: Callable[[], nn.Module]) -> None:
    """What made ``deepcopy`` fail (issue #11): the eval-mode forward with grad on caches
    ``attention_biases[:, idxs]``, a tensor with a grad_fn; compaction copies it (checked above)."""
    model = make().eval()
    shape = (1, 3, 128, 128) if make is R.EfficientVitMsra else (1, 3, 64, 64)
    model(torch.randn(*shape))
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    assert caches and all(c["cpu"].grad_fn is not None for c in caches)


def test_halonet_keeps_the_key_value_split_and_removes_the_rest() -> None:
    """Labels follow ``Tensor.unfold`` (the halo's overlapping key/value windows): kv's channels stay only
    because its output is split into k and v at sizes the code fixes and k meets q in a matmul; the
    projection after the attention reads every value channel."""
    model, small, fates = _compact("halonet")
    dense, modules = baked(model), dict(small.named_modules())
    for stage in ("stages.1", "stages.2"):
        kv = dense.get_submodule(f"{stage}.self_attn.kv")
        assert _width(modules[f"{stage}.self_attn.kv"])[0] == kv.out_channels
        reasons = {f["reason"] for f in fates if f["layer"] == f"{stage}.self_attn.kv"}
        assert reasons and all("unfold" not in r for r in reasons), reasons
    # the residual stream of the last stage: a channel goes where the shortcut's and conv3's rows are zero
    rows = [
        dense.get_submodule(f"stages.2.{w}").weight.detach().flatten(1).eq(0).all(1)
        for w in ("shortcut.conv", "conv3_1x1.conv")
    ]
    dead = int((rows[0] & rows[1]).sum())
    assert dead > 0
    assert _width(modules["head.fc"]) == (10, 64 - dead)


def test_maxvit_same_padded_convs_are_planned_as_convs() -> None:
    """timm's ``Conv2dSame`` (TF 'SAME' padding, computed from the input's size in the forward) computes a
    conv of its weights on a zero-padded input: its channels are planned like a padded conv's, and it stays
    a ``Conv2dSame``. The stem's constants merge into a carrier (the padding varies them at the borders). In
    the strided depthwise convs' groups, a zero filter times the squeeze-excite gate of a zero ``fc2`` row is
    a constant, folded; a dead factor times a live one stays, for the gate, not for the padding."""
    model, small, fates = _compact("maxvit")
    assert not [f for f in fates if "forward of its own" in f["reason"]]
    dense = baked(model)
    same = [n for n, m in dense.named_modules() if isinstance(m, R.Conv2dSame)]
    assert same == ["stem.conv1", "stages.0.0.conv.conv2_kxk", "stages.1.0.conv.conv2_kxk"]
    assert all(type(small.get_submodule(n)) is R.Conv2dSame for n in same)
    stem = Counter(f["fate"] for f in fates if f["layer"] == "stem.conv1")
    assert stem == {Fate.MERGED.value: 4, Fate.CARRIER.value: 1}
    assert small.get_submodule("stem.conv1").out_channels == 16 - 4
    for stage, width in (("stages.0.0", 64), ("stages.1.0", 128)):
        both = _dead(dense, f"{stage}.conv.conv2_kxk") & _dead(dense, f"{stage}.conv.se.fc2")
        assert len(both) > 0
        assert small.get_submodule(f"{stage}.conv.conv2_kxk").out_channels == width - len(both)
        assert small.get_submodule(f"{stage}.conv.se.fc2").out_channels == width - len(both)
        reasons = {f["reason"] for f in fates if f["layer"] == f"{stage}.conv.conv1_1x1"}
        conv, gate = f"{stage}.conv.conv1_1x1", f"{stage}.conv.se.fc2"
        assert gated_reason([conv], [gate]) in reasons and gated_reason([gate], [conv]) in reasons


def _dead(model: nn.Module, name: str) -> set[int]:
    w = model.get_submodule(name).weight
    return {i for i in range(w.shape[0]) if bool((w[i] == 0).all())}


def test_tf_efficientnet_lite_same_padded_convs_compact_exactly_at_every_size() -> None:
    """tf_efficientnet_lite's strided convs are ``Conv2dSame``: dead expand filters' constants reach a
    strided 3x3 and a 5x5 depthwise conv whose padding, 0+1 or 1+1 and 1+2 or 2+2, depends on the input's
    size. The profiles cover the border patterns of every size, so the result is exact at sizes other than
    the example's (odd and even, where the padding differs), and nothing is kept for the padding's sake."""
    shape = (1, 3, 64, 64)
    torch.manual_seed(0)
    model = R.masked(R.TfEfficientNetLite(), shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    small, report = compactor.compact(model, x, time_limit=60)
    fates = report.to_dict()["zeroed"]
    assert not [
        f for f in fates if "forward of its own" in f["reason"] or f["fate"] == Fate.KEPT_UNVERIFIED.value
    ]
    dense = baked(model)
    same = {n: m for n, m in dense.named_modules() if isinstance(m, R.Conv2dSame)}
    assert sorted(same) == ["blocks.1.0.conv_dw", "blocks.2.0.conv_dw", "conv_stem"]
    assert all(type(small.get_submodule(n)) is R.Conv2dSame for n in same)
    # dead filters of the conv writing into a depthwise conv (the stem's into a static-padded one, an expand
    # conv's into a 'SAME' one) are constants that vary at the borders: each is zero or the same at every
    # border pattern (removed, folded) but for a basis of the profiles (this seed's: 3, 4 and 5 channels);
    # a zero depthwise filter emits its bias whatever the writer's filter: a constant, folded
    groups = (
        ("conv_stem", "blocks.0.0.conv_dw", "blocks.0.0.conv_pw", 3),
        ("blocks.1.0.conv_pw", "blocks.1.0.conv_dw", "blocks.1.0.conv_pwl", 4),
        ("blocks.2.0.conv_pw", "blocks.2.0.conv_dw", "blocks.2.0.conv_pwl", 5),
    )
    for root, dw, reader, kept in groups:
        writer = dense.get_submodule(root)
        fate = Counter(f["fate"] for f in fates if f["layer"] == root)
        zeroed = _dead(dense, root) | _dead(dense, dw)
        assert _dead(dense, dw) - _dead(dense, root), dw  # the case is there
        assert fate[Fate.KEPT_VARYING.value] == kept and sum(fate.values()) == len(zeroed), root
        width = writer.out_channels - len(zeroed) + kept
        assert small.get_submodule(root).out_channels == small.get_submodule(dw).out_channels == width
        assert small.get_submodule(reader).in_channels == width
    with torch.no_grad():
        for size in [(64, 64), (63, 65), (37, 41), (9, 7), (2, 3)]:
            y = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0]))
            torch.testing.assert_close(small(y), model(y), rtol=RTOL, atol=ATOL)


def test_torch_pruning_walk_stops_at_an_op_it_maps_by_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """MaxViT (issue #11: 101 s): the window partitions are reshapes and permutes, so Torch-Pruning's groups
    would be set aside for the labels; its walk stops at the first one instead of multiplying index lists.
    Where the labels then fail, Torch-Pruning's groups are finished after all and answer."""
    from compactor.engine.coupling import build_groups, labels, tp_adapter, tp_groups
    from compactor.errors import CouplingByRule, CouplingUnfollowed
    from compactor.inputs import ExampleInputs

    model = baked(R.masked(R.MaxVit(), (1, 3, 64, 64)))
    inputs = ExampleInputs((torch.randn(1, 3, 64, 64),), {})
    with pytest.raises(CouplingByRule, match="by rule"):
        tp_adapter._tp_groups(model, inputs, stop_by_rule=True)
    ours = build_groups(model, inputs)
    assert [g.root for g in ours] == [g.root for g in labels.label_groups(model, inputs)]

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise CouplingUnfollowed("an op the labels cannot replay")

    monkeypatch.setattr(labels, "label_groups", fail)
    small = ChannelsLastFlatten().eval()  # a permute before a Linear: suspect, but a walk of a moment
    tiny = ExampleInputs((torch.randn(1, 3, 2, 2),), {})
    with pytest.raises(CouplingByRule):
        tp_adapter._tp_groups(small, tiny, stop_by_rule=True)
    theirs = build_groups(small, tiny)
    assert theirs == tp_adapter._tp_groups(small, tiny)
    assert tp_groups._suspect(theirs)


@pytest.mark.parametrize("relu", [False, True])
def test_mix_ffn_merges_position_varying_channels_across_the_token_layout(relu: bool) -> None:
    """SegFormer's and PVTv2's Mix-FFN: a dead fc1 row is a constant, which the zero-padded depthwise conv
    turns into a map that varies at the borders, read by fc2 in the token layout ``[B, H*W, C]``. A 3x3 kernel
    has 16 border patterns; one direction is the bias, so per block a basis of 15 carriers stays and every other
    varying channel merges into it. With PVTv2's ReLU after fc1, a dead row with a negative bias emits 0: only
    the dwconv's own bias is left, the same everywhere, and it folds."""
    torch.manual_seed(0)
    model = R.MixFFNNet(relu=relu).eval()
    expected: Counter[str] = Counter()
    for mlp in model.mlps:
        prune.ln_structured(mlp.fc1, "weight", amount=0.6, n=2, dim=0)
        dead = mlp.fc1.weight_mask.sum(1) == 0
        varying = int((dead & (mlp.fc1.bias > 0)).sum()) if relu else int(dead.sum())
        expected[Fate.FOLDED.value] += int(dead.sum()) - varying
        if varying > 15:
            expected[Fate.CARRIER.value] += 15
            expected[Fate.MERGED.value] += varying - 15
        else:
            expected[Fate.KEPT_VARYING.value] += varying
    small, report = compactor.compact(model, torch.randn(1, 3, 64, 64), time_limit=60)
    assert Counter(z.fate for z in report.zeroed) == +expected
    assert sum(expected.values()) == 2 * 38
    gone = [
        sum(z.fate in ("folded", "merged") and z.layer == f"mlps.{i}.fc1" for z in report.zeroed)
        for i in (0, 1)
    ]
    for mlp, n in zip(small.mlps, gone):
        assert (mlp.fc1.out_features, mlp.dwconv.dwconv.out_channels, mlp.fc2.in_features) == (64 - n,) * 3
    with torch.no_grad():  # exact at sizes the example never showed: odd, and 1 token wide
        for shape in [(1, 3, 64, 64), (1, 3, 37, 41), (2, 3, 9, 7), (1, 3, 3, 5)]:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
            torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)
