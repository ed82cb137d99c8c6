"""The engine over the zoo: exact outputs, exact channel counts (from the oracle), an honest report."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from zoo import (
    CASES,
    KEPT,
    Case,
    Link,
    ZooResults,
    actual_widths,
    expected_all,
    expected_widths,
    mobilenet_v2_masked,
    resnet18_masked,
)

import compactor
from compactor.engine.plan import Fate
from compactor.layers import shrinker_for

RTOL, ATOL = 1e-4, 1e-5


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": {n: list(m._forward_pre_hooks.values()) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before["state"].keys() == after["state"].keys()  # type: ignore[attr-defined]
    for k, v in before["state"].items():  # type: ignore[attr-defined]
        assert torch.equal(v, after["state"][k]), f"compact() changed the caller's {k}"  # type: ignore[index]
    assert before["hooks"] == after["hooks"], "compact() changed the caller's hooks"
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]


def _assert_no_pruning_state(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values()), (
            name
        )
    for key in model.state_dict():
        assert not key.endswith(("_orig", "_mask")), key


def _assert_no_empty_layer(model: nn.Module) -> None:
    for name, module in model.named_modules():
        shrinker = shrinker_for(module)
        if shrinker is None:
            continue
        for width in (shrinker.out_channels(module), shrinker.in_channels(module)):
            assert width is None or width > 0, f"{name} has 0 channels"


def _compact(case: Case, **kwargs: object) -> tuple[nn.Module, nn.Module, compactor.CompactionReport]:
    model = case.model()
    before = _snapshot(model)
    small, report = compactor.compact(model, case.inputs(1), **kwargs)  # type: ignore[arg-type]
    _assert_same(before, _snapshot(model))
    return model, small, report


def _check_outputs(
    model: nn.Module, small: nn.Module, case: Case, report: compactor.CompactionReport | None = None
) -> None:
    small.eval()
    with torch.no_grad():
        for seed in (11, 12):
            x = case.inputs(seed)
            expected, got = model(x), small(x)
            assert got.shape == expected.shape and got.dtype == expected.dtype
            if not case.noisy:
                torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
                continue
            # The masked model is itself ~1e-3 from exact arithmetic, and a folded bias of 2e4 rounds in
            # float32: the engine decided in float64 and reports the rounding it allowed. Fresh inputs,
            # so a margin of 2 over the bound measured on the verification inputs.
            assert report is not None and report.extra.get("rounding_floor")
            assert (got.double() - expected.double()).abs().max() <= 2 * report.extra["rounding_floor"]


def _assert_fates(
    model: nn.Module, links: Sequence[Link], shape: Sequence[int], report: compactor.CompactionReport
) -> None:
    """Per group, as many channels removed, folded, merged, carrying and kept as the oracle says."""
    for link, verdict in zip(links, expected_all(model, links, shape)):
        roots = {p[0] for p in link.paths}
        oracle = Counter(f for f in verdict.fates if f != "live")
        engine = Counter(
            KEPT if z.fate.startswith("kept") else z.fate for z in report.zeroed if z.layer in roots
        )
        assert engine == oracle, f"group of {link.root}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zoo(case: Case, zoo_results: ZooResults) -> None:
    model, small, report = _compact(case)
    zoo_results.put(case, (model, small, report))

    _check_outputs(model, small, case, report)
    _assert_no_pruning_state(small)
    _assert_no_empty_layer(small)
    original = dict(model.named_parameters())
    for name, p in small.named_parameters():
        source = original.get(name, original.get(f"{name}_orig"))
        assert source is not None, f"{name} appeared"
        assert (p.dtype, p.device, p.requires_grad) == (source.dtype, source.device, source.requires_grad), (
            name
        )

    # every rebuilt layer has exactly the channel count the oracle computes from masks and norms
    expected = expected_widths(model, case.links, case.shape)
    assert actual_widths(small, list(expected)) == expected
    by_name = {c.name: c for c in report.layers}
    for name, (out, inn) in expected.items():
        if name not in by_name:  # a bare parameter (LayerScale): no row in the layer table
            assert isinstance(small.get_parameter(name), nn.Parameter)
            continue
        assert by_name[name].out_after == out, name
        if inn is not None:
            assert by_name[name].in_after == inn, name

    # the fate of every zeroed channel, per group, as the oracle has it
    _assert_fates(model, case.links, case.shape, report)
    for link in case.links:
        roots = {p[0] for p in link.paths}
        if link.blocked:
            kept = [z for z in report.zeroed if z.layer in roots]
            assert kept and all(
                link.blocked in f"{z.fate} {z.reason}" for z in kept if z.fate != "kept: varies with position"
            )

    if case.restored:
        assert any(z.fate == Fate.KEPT_UNVERIFIED.value for z in report.zeroed)
    if case.dead:
        assert any(case.dead in w for w in report.warnings), report.warnings
    else:
        assert not report.warnings

    _check_report(report)


def _check_report(report: compactor.CompactionReport) -> None:
    d = report.to_dict()
    assert d["params"]["after"] <= d["params"]["before"]
    assert d["file_bytes"]["after"] > 0 and d["file_bytes"]["before"] > 0
    assert 0.0 <= d["max_abs_error"] <= d["tolerance"] * 100
    assert all({"name", "out_before", "out_after", "in_before", "in_after"} <= set(c) for c in d["layers"])
    for z in d["zeroed"]:
        assert z["reason"], z
    kept = [z for z in d["zeroed"] if not Fate(z["fate"]).removed]
    assert all(z["fate"].startswith("kept") or z["fate"] == "carrier" for z in kept)
    assert d["channels"]["zeroed"] == len(d["zeroed"])
    table = report.table()
    assert "compactor: dense vs compacted" in table
    assert f"[{report.inputs}]" in table  # square brackets printed, not eaten as rich markup


def test_caller_hooks_kept_and_training_flag_dtype_requires_grad_preserved() -> None:
    case = next(c for c in CASES if c.name == "conv_chain")
    model = case.model().double().train()
    model.b3[0].weight_orig.requires_grad_(False)
    before = _snapshot(model)
    small, _ = compactor.compact(model, case.inputs(1).double())
    _assert_same(before, _snapshot(model))
    assert any(isinstance(h, prune.BasePruningMethod) for h in model.b1[0]._forward_pre_hooks.values())
    assert small.training and all(m.training for m in small.modules())
    assert all(p.dtype == torch.float64 for p in small.parameters())
    assert {p.device for p in small.parameters()} == {torch.device("cpu")}
    assert not small.b3[0].weight.requires_grad and small.b1[0].weight.requires_grad
    model.eval(), small.eval()
    x = case.inputs(3).double()
    torch.testing.assert_close(small(x), model(x), rtol=1e-9, atol=1e-10)


def _assert_multiples(report: compactor.CompactionReport, n: int) -> None:
    for c in report.layers:
        for before, after in ((c.out_before, c.out_after), (c.in_before, c.in_after)):
            if before is not None and before != after:
                assert after is not None and after % n == 0, c


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_round_to_4_over_the_zoo(case: Case) -> None:
    """Every rebuilt count a multiple of 4, outputs still exact (a ``cat`` of a rounded and an untouched
    group, a GroupNorm, a restored group: the shared layer still lands on a multiple)."""
    model, small, report = _compact(case, round_to=4)
    _check_outputs(model, small, case, report)
    _assert_multiples(report, 4)


@pytest.mark.parametrize("n", [4, 8])
def test_round_to_keeps_as_few_as_needed(n: int) -> None:
    case = next(c for c in CASES if c.name == "conv_chain")
    model, small, report = _compact(case, round_to=n)
    _check_outputs(model, small, case, report)
    _assert_multiples(report, n)
    # each layer here reads one group: fewer than n channels more than the exact plan keeps
    plain = expected_widths(model, case.links, case.shape)
    for name, (out, _) in plain.items():
        got = actual_widths(small, [name])[name][0]
        assert out is not None and got is not None and out <= got < out + n
    assert report.fates[Fate.KEPT_ROUNDING.value] > 0
    reasons = {z.reason for z in report.zeroed if z.fate == Fate.KEPT_ROUNDING.value}
    assert all(f"multiple of {n}" in r for r in reasons)


def test_round_to_rejects_nonsense() -> None:
    case = next(c for c in CASES if c.name == "mlp")
    with pytest.raises(ValueError, match="round_to"):
        compactor.compact(case.model(), case.inputs(1), round_to=0)


def test_mis_mapped_member_blocks_its_group_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch-Pruning can map a group's channels outside a layer (a tensor feeding both a ``cat`` and a
    conv, in some versions). Simulate it on the group of ``b0`` of the dense block: that group is kept
    whole with the mapping problem as its reason, the other groups are still compacted, outputs exact."""
    case = next(c for c in CASES if c.name == "dense_concat")
    original = compactor.engine.coupling.tp_adapter._pruning_group

    def corrupt(self: Any, module: nn.Module, fn: Any, n: int, **kw: Any) -> Any:
        group = original(self, module, fn, n, **kw)
        if not (isinstance(module, nn.Conv2d) and module.in_channels == 3):  # not b0.0
            return group
        items = []
        for item in group.items:
            target = item.dep.target.module
            wrong = (
                isinstance(target, nn.Conv2d)
                and target.in_channels == 16
                and not self.is_out_channel_pruning_fn(item.dep.handler)
            )
            shifted = [i + 100 for i in item.idxs] if wrong else list(item.idxs)
            items.append(SimpleNamespace(dep=item.dep, idxs=shifted, root_idxs=list(item.root_idxs)))
        return SimpleNamespace(items=items)

    monkeypatch.setattr(compactor.engine.coupling.tp_adapter, "_pruning_group", corrupt)
    model, small, report = _compact(case, analysis="torch-pruning")  # its own answer, not the labels'
    _check_outputs(model, small, case, report)
    assert any("b3.0" in issue for issue in report.extra["graph_issues"]), report.extra
    b0 = [z for z in report.zeroed if z.layer == "b0.0"]
    assert b0 and all(z.fate == Fate.KEPT_READ_ELSEWHERE.value and "b3.0" in z.reason for z in b0)
    others = [link for link in case.links if link.root != "b0.0"]
    expected = expected_widths(model, others, case.shape)
    assert actual_widths(small, list(expected)) == expected
    assert small.b0[0].out_channels == 8


@pytest.mark.slow
@pytest.mark.parametrize("build", [resnet18_masked, mobilenet_v2_masked], ids=["resnet18", "mobilenet_v2"])
def test_realistic_sizes(build: Any) -> None:
    model, links = build()
    shape = (2, 3, 32, 32) if build is resnet18_masked else (2, 3, 64, 64)
    gen = torch.Generator().manual_seed(1)
    small, report = compactor.compact(model, torch.randn(*shape, generator=gen))
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(*shape, generator=gen)
            torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)
    expected = expected_widths(model, links, shape)
    assert actual_widths(small, list(expected)) == expected
    _assert_fates(model, links, shape, report)
    assert report.params["after"] < report.params["before"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 9))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zoo_other_weights(case: Case, seed: int) -> None:
    """The zoo with other random weights and norms: same masks by method, different channels and constants."""
    model = case.model(seed)
    small, report = compactor.compact(model, case.inputs(1))
    _check_outputs(model, small, case, report)
    expected = expected_widths(model, case.links, case.shape)
    assert actual_widths(small, list(expected)) == expected
    _assert_fates(model, case.links, case.shape, report)


_HALF = [(c.name, torch.bfloat16) for c in CASES] + [
    (n, torch.float16) for n in ("conv_chain", "mlp", "roll_channels")
]


@pytest.mark.parametrize(("name", "dtype"), _HALF, ids=[f"{n}-{str(d)[6:]}" for n, d in _HALF])
def test_half_precision_compacts_like_float32(name: str, dtype: torch.dtype, zoo_results: ZooResults) -> None:
    """16-bit models: plans are decided on a float32 twin (bfloat16 rounding, ~4e-3, would hide the wrong
    ``torch.roll`` plan, whose error is ~3e-2), then checked in the model's own precision within a few
    ulps. The same channels go as in float32, and the result keeps the model's dtype.

    Where rounding the weights to 16 bits changes the math itself (``tv_mobilenet_v2``: one profile that
    ReLU6 clipping made a combination of others no longer is), the oracle, run on the rounded weights,
    says so, and the widths are the oracle's."""
    case = next(c for c in CASES if c.name == name)
    model32, _, report32 = zoo_results.get(case)
    model = case.model().to(dtype)
    small, report = compactor.compact(model, case.inputs(1).to(dtype))
    expected = expected_widths(model, case.links, case.shape)
    if expected != expected_widths(model32, case.links, case.shape):
        assert name == "tv_mobilenet_v2", "rounding changed the oracle's verdict"
        assert actual_widths(small, list(expected)) == expected
        _assert_fates(model, case.links, case.shape, report)
        return
    assert [(c.name, c.out_after, c.in_after) for c in report.layers] == [
        (c.name, c.out_after, c.in_after) for c in report32.layers
    ]
    assert Counter(z.fate for z in report.zeroed) == Counter(z.fate for z in report32.zeroed)
    assert all(p.dtype == dtype for p in small.parameters())
    x = case.inputs(11).to(dtype)
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=4 * eps, atol=4 * eps)


def test_16_bit_plans_are_judged_on_a_float32_twin_and_what_fails_there_in_float64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bf16 model's plans are judged on a float32 twin (half the memory of a float64 one); groups that the
    float32 twin rejects by a finite margin (here: every one, forced) are judged again in float64, where
    these exact plans hold, and ship."""
    from compactor.engine import verify
    from compactor.outputs import Verdict

    case = next(c for c in CASES if c.name == "mlp")
    model, x = case.model().to(torch.bfloat16), case.inputs(1).to(torch.bfloat16)
    _, plain = compactor.compact(model, x)
    assert plain.extra["judged_in"] == "float32"
    real = verify.compare

    def float32_says_no(candidate: nn.Module, *args: Any, **kwargs: Any) -> Verdict:
        if {p.dtype for p in candidate.parameters()} == {torch.float32}:
            return Verdict(False, 1e-3, ("float32 says no",))
        return real(candidate, *args, **kwargs)

    monkeypatch.setattr(verify, "compare", float32_says_no)
    said: list[str] = []
    small, report = compactor.compact(model, x, log=said.append)
    assert any("again in float64" in line for line in said)
    assert report.extra["judged_in"] == "float64"
    assert [(c.name, c.out_after, c.in_after) for c in report.layers] == [
        (c.name, c.out_after, c.in_after) for c in plain.layers
    ]
    assert any(c.out_after != c.out_before for c in report.layers)
    eps = torch.finfo(torch.bfloat16).eps
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=4 * eps, atol=4 * eps)


def test_rounding_does_not_restore_exact_groups() -> None:
    """float32 rounding of the masked model itself above the tolerance (a large bias cancelled by a
    BatchNorm; deep networks get there too): the groups that fail by a hair are judged again in float64,
    ship as the oracle says, and the result is as close to the masked model as its own rounding allows."""
    case = next(c for c in CASES if c.name == "cancelling_norm")
    model, small, report = _compact(case)
    expected = expected_widths(model, case.links, case.shape)
    assert actual_widths(small, list(expected)) == expected
    assert report.max_abs_error > report.tolerance  # rounding, beyond the relative tolerance
    assert report.max_abs_error <= report.extra["rounding_floor"]
    assert report.extra["float64_error"] <= report.tolerance  # and float64 copies agree, plainly
    assert "own rounding" in report.table() and "float64 copies" in report.table()
    _check_outputs(model, small, case, report)


class TiedScores(nn.Module):
    """A detector's choice in miniature: two scores equal but for ``1e-9 * tilt(x)``, the larger picks the
    output. float32 rounding (~1e-6 here) decides which is larger, float64 does not. The score layers read
    16 constant channels of ``lin1`` (zero rows: ``relu(bias)``), folded into their biases on removal,
    which rounds otherwise; the layers reach the output only through ``topk``'s integer indices."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(8, 64), nn.Linear(64, 1)
        self.half1, self.half2 = nn.Linear(64, 1), nn.Linear(64, 1, bias=False)
        self.tilt, self.values = nn.Linear(8, 1, bias=False), nn.Linear(8, 2)
        with torch.no_grad():
            self.lin1.weight[::4] = 0
            self.tilt.weight.mul_(1e-9)
            self.lin2.weight.mul_(8)
            self.half1.weight.copy_(self.lin2.weight * 0.5)  # half1 + half2 = lin2, exactly
            self.half1.bias.copy_(self.lin2.bias)
            self.half2.weight.copy_(self.lin2.weight - self.half1.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin1(x))
        scores = torch.cat([self.lin2(h) + self.tilt(x), self.half1(h) + self.half2(h)], 1)
        return self.values(x).gather(1, scores.topk(1, dim=1).indices)


def test_tied_scores_are_verified_on_float64_copies() -> None:
    """Where the masked model's own float32 rounding flips its choices (outputs move by ~1), the rounding
    floor lets the float32 comparison pass, which proves little: the float64 copies of the masked and
    compacted models are compared with the plain tolerance, and the report gives that figure."""
    torch.manual_seed(0)
    model = TiedScores().eval()
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    small, report = compactor.compact(model, x)
    assert [(c.name, c.out_after, c.in_after) for c in report.layers if c.in_after != c.in_before] == [
        ("lin2", 1, 48),
        ("half1", 1, 48),
        ("half2", 1, 48),
    ]
    assert report.max_abs_error > 0.1  # 256 rows of coin flips: some choice flips in float32
    assert report.extra["judged_in"] == "float64" and report.extra["float64_error"] == 0.0
    assert "float64 copies of the masked and compacted models" in report.table()
    wide, wide_small = copy.deepcopy(model).double(), copy.deepcopy(small).double()
    with torch.no_grad():
        assert torch.equal(wide(x.double()), wide_small(x.double()))


def test_conv_torch_pruning_takes_for_depthwise_is_kept_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Conv2d(32, 16, groups=16)``: Torch-Pruning couples its 16 outputs with the first 16 channels of its
    32 inputs, as if depthwise. That coupling is wrong, so those groups keep every channel, with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.Flatten(2), nn.Linear(64, 4),
    )  # fmt: skip
    dead_in, dead_out = [1, 4, 20, 25], [1, 4, 9]
    prune.custom_from_mask(
        model[0], "weight", torch.ones_like(model[0].weight).index_fill_(0, torch.tensor(dead_in), 0)
    )
    prune.custom_from_mask(
        model[2], "weight", torch.ones_like(model[2].weight).index_fill_(0, torch.tensor(dead_out), 0)
    )
    model.eval()
    x = torch.randn(2, 3, 8, 8)

    small, report = compactor.compact(model, x, analysis="torch-pruning")

    assert [(m.in_channels, m.out_channels) for m in (small[0], small[2], small[5])] == [
        (3, 32),
        (32, 16),
        (16, 8),
    ]
    # dead in both "coupled" producers (1, 4), or a constant whatever the first writes there (9: proved by
    # shaking the first conv's channel with noise)
    assert sorted(z.channel for z in report.zeroed) == [1, 4, 9]
    assert all(z.fate == "kept: read elsewhere" and "as if depthwise" in z.reason for z in report.zeroed)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


def test_grouped_conv_with_one_output_per_group_is_a_grouped_conv_to_the_labels() -> None:
    """The same model under ``auto``: Torch-Pruning's group holds a mapping that cannot be right, so
    compactor's own channel labels answer. They see a grouped conv (two inputs, one output per group):
    its dead outputs 1, 4, 9 would each empty a whole group, so every channel stays, for that reason."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.Flatten(2), nn.Linear(64, 4),
    )  # fmt: skip
    prune.custom_from_mask(
        model[0], "weight", torch.ones_like(model[0].weight).index_fill_(0, torch.tensor([1, 4, 20, 25]), 0)
    )
    prune.custom_from_mask(
        model[2], "weight", torch.ones_like(model[2].weight).index_fill_(0, torch.tensor([1, 4, 9]), 0)
    )
    model.eval()
    x = torch.randn(2, 3, 8, 8)

    small, report = compactor.compact(model, x)

    assert [(m.in_channels, m.out_channels) for m in (small[0], small[2], small[5])] == [
        (3, 32),
        (32, 16),
        (16, 8),
    ]
    grouped = "grouped conv (groups=16) loses the same number of channels in every group"
    assert [(z.channel, z.fate) for z in report.zeroed if z.layer == "2"] == [
        (c, "kept: layer layout") for c in (1, 4, 9)
    ]
    assert all(grouped in z.reason for z in report.zeroed if z.fate == "kept: layer layout")
    # the inputs of the dead groups (2, 3; 8, 9; 18, 19) are read by nothing but cannot leave either
    layout = sorted(z.channel for z in report.zeroed if z.layer == "0" and z.fate == "kept: layer layout")
    assert layout == [2, 3, 8, 9, 18, 19, 20]
    assert not any(Fate(z.fate).removed for z in report.zeroed)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


def _pairs(group: Any) -> dict[tuple[object, object], set[tuple[int, int]]]:
    """Per (node, pruning function): the (layer-local index, root index) pairs a group holds."""
    pairs: dict[tuple[object, object], set[tuple[int, int]]] = {}
    for i in group.items:
        pairs.setdefault((i.dep.target, i.dep.handler), set()).update(zip(i.idxs, i.root_idxs))
    return pairs


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fixpoint_walk_matches_torch_pruning(case: Case) -> None:
    """compactor walks Torch-Pruning's dependencies itself, as a fixpoint (walks that never end settle):
    on every zoo model it reaches the same layers with the same indices as
    ``DependencyGraph.get_pruning_group``. Torch-Pruning keeps one root per layer-local index where two
    roots map onto it; compactor keeps both (and flags that member), so its pairs include the library's."""
    import torch_pruning as tp

    from compactor.engine.coupling.tp_adapter import _pruning_group, _tracing_state
    from compactor.engine.coupling.tp_groups import _is_producer

    model = case.model()
    compactor.modules.bake_masks(model)
    x = case.inputs(1)
    with _tracing_state(model):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        for module in [m for m in graph.module2node if isinstance(m, nn.Module) and _is_producer(m)]:
            pruner = graph.get_pruner_of_module(module)
            n = pruner.get_out_channels(module)
            ours = _pairs(_pruning_group(graph, module, pruner.prune_out_channels, n))
            theirs = _pairs(graph.get_pruning_group(module, pruner.prune_out_channels, list(range(n))))
            assert ours.keys() == theirs.keys()
            for key, pairs in theirs.items():
                assert {local for local, _ in ours[key]} == {local for local, _ in pairs}
                assert pairs <= ours[key]


class _Classifier(nn.Module):
    """A head whose Linear writes the model output itself (no op after it): Torch-Pruning adds no output
    node there, as in ``logits = self.classifier(pooled)`` of every Hugging Face classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(torch.relu(self.conv(x)).mean((2, 3)))}


def test_a_layer_writing_a_model_output_keeps_its_zeroed_channels_for_that_reason() -> None:
    torch.manual_seed(0)
    model = _Classifier().eval()
    prune.custom_from_mask(model.head, "weight", torch.ones(5, 8).index_fill_(0, torch.tensor([1, 3]), 0))
    with torch.no_grad():
        model.head.bias[[1, 3]] = 0  # logits 1 and 3 are exactly zero: removable but for the output
    x = torch.randn(2, 3, 8, 8)

    small, report = compactor.compact(model, x)

    kept = [(z.layer, z.channel, z.fate, z.reason) for z in report.zeroed]
    reason = "the channel is part of a model output"
    assert kept == [("head", c, Fate.KEPT_READ_ELSEWHERE.value, reason) for c in (1, 3)]
    assert small.head.out_features == 5
    torch.testing.assert_close(small(x)["logits"], model(x)["logits"], rtol=RTOL, atol=ATOL)


class _StartsWithBos(nn.Module):
    """Checks its token ids, as vision-language models check their image tokens: random ids fail."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not bool((ids[:, 0] == 1).all()):
            raise ValueError("every sequence must start with token 1")
        return self.fc(self.emb(ids)).mean(1)


def test_fresh_runs_keep_the_example_integers_where_random_ones_fail() -> None:
    torch.manual_seed(0)
    model = _StartsWithBos().eval()
    prune.custom_from_mask(model.fc, "weight", torch.ones(4, 8).index_fill_(1, torch.tensor([2, 5]), 0))
    ids = torch.randint(0, 10, (3, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1

    small, report = compactor.compact(model, ids)

    assert small.fc.in_features == 6 and small.emb.embedding_dim == 6
    note = [w for w in report.warnings if w.startswith("fresh inputs keep the example's integer inputs")]
    assert note == [
        "fresh inputs keep the example's integer inputs: random ones fail "
        "(ValueError: every sequence must start with token 1)"
    ]
    torch.testing.assert_close(small(ids), model(ids), rtol=RTOL, atol=ATOL)
