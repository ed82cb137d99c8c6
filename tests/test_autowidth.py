"""``round_to="auto"``: widths chosen by a timer (injected here, so every assertion is deterministic), the
padding exact, the parameters what the widths imply, and the report's "why not faster" lines."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from zoo import CASES, Case

import compactor
from compactor.api import default_target
from compactor.cli import main
from compactor.engine.plan import Fate
from compactor.engine.plan.autowidth import RUNOFF, STEPS, TIE, WHOLE_TIE_MAX, WHOLE_TIE_MIN
from compactor.inputs import ExampleInputs
from compactor.layers import shrinker_for
from compactor.measure.probes import BackendTimer, Probe, _widths_of, layer_times, timed_kind
from compactor.modules import baked
from compactor.report.report import EFFICIENCY_FLOOR, why_not_faster


class FakeTimer:
    """Seconds per probe from ``cost(probe)``. Whole models: the final check's dense and compacted ones from
    ``model_s``; the candidates auto compares whole from ``whole(model)``, by default the sum of ``cost`` over
    the model's timed layers at their widths; each run ``rounds`` rounds, round ``r`` of a model named ``n``
    scaled by ``jitter(n, r)`` (default: none). Records every probe, and the names of each whole-model run."""

    def __init__(
        self,
        cost: Callable[[Probe], float],
        model_s: tuple[float, float] = (2.0, 1.0),
        target: str = "torch-cpu",
        whole: Callable[[nn.Module], float] | None = None,
        rounds: int = 5,
        jitter: Callable[[str, int], float] = lambda n, r: 1.0,
    ) -> None:
        self.cost = cost
        self.model_s = model_s
        self.target = target
        self.whole = whole or self._summed
        self.rounds = rounds
        self.jitter = jitter
        self.probes: list[Probe] = []
        self.candidates: list[str] = []
        self.calls: list[list[str]] = []

    def layers(self, probes: Sequence[Probe]) -> list[float]:
        self.probes += probes
        return [self.cost(p) for p in probes]

    def models(self, models: dict[str, nn.Module], inputs: ExampleInputs) -> dict[str, list[float]]:
        fixed = {"dense": self.model_s[0], "small": self.model_s[1]}
        self.candidates += [n for n in models if n not in fixed and n not in self.candidates]
        first = len(self.calls) * self.rounds  # the rounds earlier runs took
        self.calls.append(list(models))
        seconds = {n: fixed[n] if n in fixed else self.whole(m) for n, m in models.items()}
        return {n: [s * self.jitter(n, first + r) for r in range(self.rounds)] for n, s in seconds.items()}

    def _summed(self, model: nn.Module) -> float:
        return sum(
            self.cost(Probe(n, m, (), torch.float32, *_widths_of(m)))
            for n, m in model.named_modules()
            if timed_kind(m)
        )


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    """64 hidden neurons, 33 of them zeroed (weights and bias): the exact plan keeps 31."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    mask = torch.ones(64, 16)
    mask[:33] = 0
    prune.custom_from_mask(model[0], "weight", mask)
    with torch.no_grad():
        model[0].bias[:33] = 0.0
    return model, torch.randn(2, 16)


def _hidden(p: Probe) -> int:
    """The width of the hidden layer a probe of the MLP sees (layer 0's outputs, layer 2's inputs)."""
    w = p.out_width if p.layer == "0" else p.in_width
    assert w is not None
    return w


def _params(widths: int) -> int:
    return 16 * widths + widths + widths * 8 + 8


@pytest.mark.parametrize(("fastest", "width"), [(64, 64), (32, 32), (31, 31)])
def test_auto_keeps_the_width_the_timer_says_is_fastest(fastest: int, width: int) -> None:
    model, x = _mlp()
    timer = FakeTimer(lambda p: 1.0 if _hidden(p) == fastest else 2.0)
    small, report = compactor.compact(model, x, round_to="auto", timer=timer)
    assert small[0].out_features == width and small[2].in_features == width
    assert report.params["after"] == _params(width)
    auto = report.to_dict()["auto"]
    (choice,) = auto["choices"]
    # candidates: the exact 31, rounded up to 8/16/32 (all 32) and to 64 (the dense width): timed once each
    assert (choice["root"], choice["dense"], choice["exact"], choice["width"]) == ("0", 64, 31, width)
    assert sorted(choice["ms"]) == [31, 32, 64] and list(choice["layers"]) == ["0", "2"]
    assert auto["extra_params"] == _params(width) - _params(31)
    assert auto["padded"] == (width > 31) and auto["target"] == "torch-cpu"
    kept = [z for z in report.zeroed if z.fate == Fate.KEPT_AUTO.value]
    assert len(kept) == width - 31
    assert all(
        z.reason == f"kept so that 0 keeps {width} channels, which ran faster on torch-cpu" for z in kept
    )
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    # each layer timed on its real input: layer 0 on (2, 16), layer 2 on (2, hidden width)
    shapes = {(p.layer, _hidden(p)): p.shape for p in timer.probes}
    assert shapes[("0", 32)] == (2, 16) and shapes[("2", 32)] == (2, 32) and shapes[("2", 64)] == (2, 64)


def test_a_wider_width_must_be_faster_by_more_than_the_tie() -> None:
    model, x = _mlp()
    within = FakeTimer(  # 1.5% faster alone: noise, not a reason (and whole models tie: fewer parameters win)
        lambda p: 1.0 - (TIE / 2) * (_hidden(p) == 32), whole=lambda m: 1.0
    )
    small, report = compactor.compact(model, x, round_to="auto", timer=within)
    assert small[0].out_features == 31 and report.to_dict()["auto"]["choices"][0]["width"] == 31
    beyond = FakeTimer(lambda p: 1.0 - (2 * TIE) * (_hidden(p) == 32))
    small, _ = compactor.compact(model, x, round_to="auto", timer=beyond)
    assert small[0].out_features == 32


def _odd_is_slow(p: Probe) -> float:
    """A backend where a width off a multiple of 8 costs three times its width."""
    return sum(float(w if w % 8 == 0 else 3 * w) for w in (p.in_width, p.out_width) if w is not None)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_auto_over_the_zoo_stays_exact_at_the_widths_chosen(case: Case) -> None:
    """Carriers, merges, cat consumers, grouped convs, GroupNorm: whatever auto pads, the outputs are the
    masked model's and every group's root writes the width chosen for it (or its dense width, restored)."""
    model = case.model()
    small, report = compactor.compact(model, case.inputs(1), round_to="auto", timer=FakeTimer(_odd_is_slow))
    small.eval()
    with torch.no_grad():
        x = case.inputs(11)
        expected, got = model(x), small(x)
    tol = 1e-2 if case.noisy else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 0.1)
    modules = dict(small.named_modules())
    for choice in report.extra.get("auto", {}).get("choices", []):
        assert choice["exact"] in choice["ms"] and choice["width"] in choice["ms"]
        assert all(w <= choice["dense"] for w in choice["ms"])
        root = modules.get(choice["root"])
        shrinker = shrinker_for(root)
        if shrinker is not None:
            assert shrinker.out_channels(root) in (choice["width"], choice["dense"]), choice


def test_candidates_are_the_exact_width_and_its_roundings_up_to_the_dense_width() -> None:
    model, x = _mlp()
    timer = FakeTimer(lambda p: 1.0)
    compactor.compact(model, x, round_to="auto", timer=timer)
    seen = sorted({_hidden(p) for p in timer.probes if p.layer == "0"})
    assert seen == sorted(
        {31} | {-(-31 // s) * s for s in STEPS if -(-31 // s) * s <= 64}
    )  # dense widths: 64 too


@pytest.mark.parametrize(
    ("gain", "width", "picked"),
    [
        (0.5, 32, "all x8"),  # past the run-off: decided by the first run
        (WHOLE_TIE_MIN / 2, 31, "per group"),  # under the floor: fewer parameters win
        ((WHOLE_TIE_MIN + WHOLE_TIE_MAX) / 2, 32, "all x8"),  # past the floor, and the rounds have no noise
    ],
)
def test_the_whole_model_check_overrules_layers_timed_alone(gain: float, width: int, picked: str) -> None:
    """Layers alone say the exact width (31) is fastest; whole models say 32 is ``gain`` faster. Past
    ``RUNOFF`` one run decides; within it, both are timed again and the rounded model wins where its gain is
    past ``WHOLE_TIE_MIN`` (these rounds are noiseless), its padding kept as auto's."""
    model, x = _mlp()
    timer = FakeTimer(
        lambda p: 1.0 if _hidden(p) == 31 else 2.0,
        whole=lambda m: 1.0 - gain * (m[0].out_features % 8 == 0),
    )
    small, report = compactor.compact(model, x, round_to="auto", timer=timer)
    assert small[0].out_features == width and report.params["after"] == _params(width)
    whole = report.to_dict()["auto"]["whole"]
    assert whole["picked"] == picked and whole["fastest"] == "all x8"
    assert set(whole["ms"]) == {"per group", "all x8"}  # exact and x16 give the same widths as these two
    assert whole["params"] == {"per group": _params(31), "all x8": _params(32)}
    assert sorted(timer.candidates) == ["all x8", "per group"]
    # the dense model and both candidates, timed again where they are within RUNOFF; what shipped was timed
    # there, so not again
    runs = 1 if gain > RUNOFF else 2
    assert timer.calls == [["dense", "per group", "all x8"]] * runs
    if runs == 2:
        assert whole["gaps"] == {
            "per group": {"slower": pytest.approx(1 / (1 - gain) - 1), "se": 0.0, "n": 10}
        }
    else:
        assert whole["gaps"] == {}
    expected = 1.0 - gain * (width == 32)
    assert report.to_dict()["auto"]["model_ms"] == {"before": 2000.0, "after": pytest.approx(expected * 1000)}
    kept = [z for z in report.zeroed if z.fate == Fate.KEPT_AUTO.value]
    assert len(kept) == width - 31
    assert all("multiple of 8" in c.reason for c in kept)


@pytest.mark.parametrize(
    ("gain", "noise", "width"),
    [
        (0.006, 0.0, 32),  # 0.6% faster in every round: a real gain, the padding kept
        (0.006, 0.04, 31),  # the same median gain in rounds ±4% apart: within the noise, fewer parameters win
        (0.015, 0.04, 32),  # past WHOLE_TIE_MAX: kept however noisy the rounds
    ],
)
def test_the_whole_model_check_weighs_a_gain_against_the_rounds_noise(
    gain: float, noise: float, width: int
) -> None:
    """The rounds of the candidate with fewer parameters swing ``noise`` either way (one round slow, the
    next fast), around ``gain`` slower than the padded one: its gap is told apart from noise only where the
    swing is small against the gain."""
    model, x = _mlp()

    def jitter(name: str, r: int) -> float:
        return 1.0 + (noise if r % 2 else -noise) * (name == "per group")

    timer = FakeTimer(
        lambda p: 1.0 if _hidden(p) == 31 else 2.0,
        whole=lambda m: 1.0 - gain * (m[0].out_features % 8 == 0),
        rounds=20,
        jitter=jitter,
    )
    small, report = compactor.compact(model, x, round_to="auto", timer=timer)
    assert small[0].out_features == width
    gap = report.to_dict()["auto"]["whole"]["gaps"]["per group"]
    assert gap["n"] == 40
    assert gap["slower"] == pytest.approx(
        ((1 + noise) / (1 - gain)) ** 0.5 * ((1 - noise) / (1 - gain)) ** 0.5 - 1
    )
    assert (gap["se"] > 0) == (noise > 0)


def test_the_fastest_whole_model_is_the_one_with_the_highest_paired_speedup() -> None:
    """The machine runs every other round 10% slow, and the padded model and the dense one feel it (they ran
    in those rounds' slow stretches) while the exact one does not: by unpaired medians the exact model is
    0.5% faster; paired with the dense model round by round, as a speedup is, the padded one is. It is the
    fastest; the exact one, no slower than it within these rounds' noise, is kept for its fewer parameters."""
    model, x = _mlp()

    def jitter(name: str, r: int) -> float:
        return (1.1 if r % 2 else 0.9) if name in ("dense", "all x8") else 1.0

    timer = FakeTimer(
        lambda p: 1.0 if _hidden(p) == 31 else 2.0,
        whole=lambda m: 0.995 if m[0].out_features == 31 else 1.0,
        rounds=20,
        jitter=jitter,
    )
    small, report = compactor.compact(model, x, round_to="auto", timer=timer)
    whole = report.to_dict()["auto"]["whole"]
    assert whole["ms"]["per group"] < whole["ms"]["all x8"]  # unpaired: the exact widths look faster
    assert whole["fastest"] == "all x8"
    gap = whole["gaps"]["per group"]
    assert gap["slower"] == pytest.approx(0.995 / 0.99**0.5 - 1) and gap["slower"] < 2 * gap["se"]
    assert whole["picked"] == "per group" and small[0].out_features == 31


def test_a_timer_that_answers_one_number_per_model_is_one_round() -> None:
    """A user's timer written to the earlier protocol (``models`` gives a median per model, not its rounds):
    each number is one round, so both whole-model checks still run and say what they measured."""
    model, x = _mlp()

    class MedianTimer(FakeTimer):
        def models(self, models: dict[str, nn.Module], inputs: ExampleInputs) -> dict[str, list[float]]:
            rounds = super().models(models, inputs)
            return {n: t[0] for n, t in rounds.items()}  # type: ignore[misc]  # the earlier protocol

    timer = MedianTimer(
        lambda p: 1.0 if _hidden(p) == 31 else 2.0, whole=lambda m: 1.0 - 0.5 * (m[0].out_features == 32)
    )
    small, report = compactor.compact(model, x, round_to="auto", timer=timer)
    auto = report.to_dict()["auto"]
    assert not auto["untimed"] and small[0].out_features == 32
    assert auto["whole"]["picked"] == "all x8" and auto["model_ms"] == {"before": 2000.0, "after": 500.0}


def test_slower_than_dense_is_a_warning_naming_the_layers() -> None:
    model, x = _mlp()

    def cost(p: Probe) -> float:  # the exact width wins (4 against 6), but layer 2 runs slower than dense
        if p.layer == "2":
            return 3.0 if _hidden(p) < 64 else 1.0
        return 5.0 if _hidden(p) == 64 else 1.0

    slower = FakeTimer(cost, model_s=(1.0, 1.5), whole=lambda m: 1.5)  # whole models: all alike, 1.5 s
    _, report = compactor.compact(model, x, round_to="auto", timer=slower)
    auto = report.to_dict()["auto"]
    assert auto["slower"] and auto["model_ms"] == {"before": 1000.0, "after": 1500.0}
    (warning,) = [w for w in report.warnings if "slower" in w]
    assert "torch-cpu (1500.00 ms against 1000.00 ms" in warning and "2 1000.000 → 3000.000 ms" in warning
    faster = FakeTimer(cost, model_s=(1.5, 1.0), whole=lambda m: 1.0)
    _, report = compactor.compact(model, x, round_to="auto", timer=faster)
    assert not report.to_dict()["auto"]["slower"] and not [w for w in report.warnings if "slower" in w]


def test_round_to_and_target_are_checked() -> None:
    model, x = _mlp()
    with pytest.raises(ValueError, match="round_to"):
        compactor.compact(model, x, round_to="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target"):
        compactor.compact(model, x, round_to="auto", target="tpu")  # type: ignore[arg-type]


def test_default_target_follows_the_output_format() -> None:
    model, _ = _mlp()
    assert default_target(model, "onnx") == "onnxruntime-cpu"
    assert default_target(model, "pt") == default_target(model) == "torch-cpu"


def test_real_timer_on_a_tiny_model() -> None:
    """The real timer (torch-cpu, one thread): probes of identical layers on identical shapes are timed once."""
    model, x = _mlp()
    timer = BackendTimer("torch-cpu", repeats=2)
    small, report = compactor.compact(model, x, round_to="auto", timer=timer)
    auto = report.to_dict()["auto"]
    (choice,) = auto["choices"]
    width = small[0].out_features  # the per-group choice, or what the whole-model check preferred to it
    assert (
        choice["width"] in (31, 32, 64) and width in (31, 32, 64) and report.params["after"] == _params(width)
    )
    whole = auto["whole"]
    assert whole["params"][whole["picked"]] == _params(width) if whole["ms"] else width == choice["width"]
    assert set(auto["model_ms"]) == {"before", "after"} and auto["seconds"] >= 0
    assert len(timer._cache) == 6  # 2 layers x 3 candidates, the dense ones reused for the check after
    times = layer_times(model, small, ExampleInputs.of(x), FakeTimer(lambda p: float(p.out_width or 0)))
    # the real timer may find the dense width fastest: then no layer was rebuilt and none is timed
    expected = [("0", 64000.0, width * 1000.0), ("2", 8000.0, 8000.0)] if width < 64 else []
    assert [(t["layer"], t["before_ms"], t["after_ms"]) for t in times] == expected


# --- why not faster --------------------------------------------------------------------------------------
def _report(after_ms: float, **extra: object) -> compactor.CompactionReport:
    model, x = _mlp()
    _, report = compactor.compact(model, x)
    return report.with_extra(
        macs={"before": 100, "after": 50},
        latency_ms={"torch-cpu": {"before": 1.0, "after": after_ms}},
        **extra,
    )


@pytest.mark.parametrize(("after_ms", "shown"), [(0.7, True), (0.625, False), (0.6, False)])
def test_why_not_faster_appears_exactly_below_the_efficiency_floor(after_ms: float, shown: bool) -> None:
    """Half the MACs: 1/0.7 = 1.43x is efficiency 0.71; 1.6x is exactly 0.8 (not below); 1.67x is 0.83."""
    report = _report(after_ms)
    lines = why_not_faster(report)
    assert bool(lines) is shown
    assert ("why not faster on torch-cpu" in report.table()) is shown
    assert report.to_dict().get("why_not_faster", []) == lines
    if shown:
        eff = (1.0 / after_ms) * 0.5
        assert lines[0] == (
            f"why not faster on torch-cpu: {1 / after_ms:.2f}x faster for 0.500 of the MACs, efficiency {eff:.2f} "
            f"< {EFFICIENCY_FLOOR} (speedup / MACs ratio)"
        )
        assert lines[1] == "  odd widths (off a multiple of 8): 0: 31, 2: 31"
        assert lines[-1].startswith("  try: --round-to auto --target torch-cpu")


def test_why_not_faster_lists_the_slowest_layers_timed() -> None:
    layers = [
        {"layer": "a", "before_ms": 1.0, "after_ms": 0.5, "widths": ""},
        {"layer": "b", "before_ms": 2.0, "after_ms": 1.5, "widths": ""},
    ]
    lines = why_not_faster(_report(0.7, layer_ms={"torch-cpu": layers}))
    assert (
        lines[1] == "  slowest layers, dense → compacted, each alone (ms): b 2.000 → 1.500, a 1.000 → 0.500"
    )


def test_why_not_faster_names_grouped_layouts_and_kept_channels() -> None:
    """A grouped conv that loses channels, and a carrier kept where constants meet zero padding."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
    ).eval()
    zeroed = [0, 1, 4, 5, 8, 9, 12, 13]  # two in each of the grouped conv's four input groups
    mask = torch.ones_like(model[0].weight)
    mask[zeroed] = 0
    prune.custom_from_mask(model[0], "weight", mask)
    with torch.no_grad():
        model[0].bias[zeroed] = 0.5  # a constant after BatchNorm and ReLU: merged, one carrier per conv group
    x = torch.randn(1, 3, 8, 8)
    small, report = compactor.compact(model, x)
    assert small[3].in_channels == 12 and small[3].groups == 4
    report = report.with_extra(
        macs={"before": 100, "after": 50}, latency_ms={"cuda": {"before": 1.0, "after": 1.0}}
    )
    lines = why_not_faster(report)
    assert (
        "  grouped layouts (each group loses as many channels; small groups run slowly): 3 (groups=4)"
        in lines
    )
    assert "  layers that did not shrink (zeroed channels kept): 0: 4 carrier" in lines
    assert report.layers[-1].groups == 4


def test_cli_round_to_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report_path = tmp_path / "small.pt", tmp_path / "r.json"
    assert main(["--demo", "-o", str(out), "--round-to", "auto", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["round_to"] == "auto" and report["auto"]["target"] == "torch-cpu"
    assert "--round-to auto on torch-cpu" in capsys.readouterr().out
    layers = {c["name"]: c for c in report["layers"]}
    assert report["auto"]["choices"]
    picked = report["auto"]["whole"]["picked"]  # by timing: the whole-model check may pick a uniform rounding
    for choice in report["auto"]["choices"]:
        if picked == "per group":
            assert layers[choice["root"]]["out_after"] == choice["width"]
        else:
            assert layers[choice["root"]]["out_after"] in (
                choice["exact"],
                -(-choice["exact"] // 8) * 8,
                -(-choice["exact"] // 16) * 16,
            )


def test_cli_refuses_a_round_to_that_is_not_a_number_or_auto(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--demo", "--round-to", "x"])
    assert e.value.code == 2 and "'x': give a channel multiple such as 8, or auto" in capsys.readouterr().err


def test_cli_refuses_a_target_without_round_to_auto(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--demo", "-o", str(tmp_path / "small.pt"), "--target", "torch-cpu"]) == 2
    assert "--target says where --round-to auto times widths: add --round-to auto" in capsys.readouterr().err


def test_a_backend_that_cannot_run_a_layer_leaves_the_exact_width_and_says_so() -> None:
    model, x = _mlp()

    def fail(p: Probe) -> float:
        raise RuntimeError("no kernel for this layer")

    small, report = compactor.compact(model, x, round_to="auto", timer=FakeTimer(fail))
    assert small[0].out_features == 31
    auto = report.to_dict()["auto"]
    assert not auto["choices"] and not auto["layers"]
    assert list(auto["untimed"]) == [
        "0 (RuntimeError: no kernel for this layer)",
        "the whole-model check (RuntimeError: no kernel for this layer)",
        "the layers alone (RuntimeError: no kernel for this layer)",
    ]
    assert "not timed (groups keep their exact widths): 0 (RuntimeError" in report.table()


def test_the_dense_time_is_the_dense_model_s_where_attention_heads_went_first() -> None:
    """A timer that reports each whole model's parameter count as its time: ``model_ms["before"]`` is the
    dense model's (all four heads), not the one the channel plans start from (a head already gone)."""
    import transformers

    class ParamTimer(FakeTimer):
        def models(self, models: dict[str, nn.Module], inputs: ExampleInputs) -> dict[str, list[float]]:
            return {n: [sum(p.numel() for p in m.parameters()) / 1000] for n, m in models.items()}

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    attention = model.encoder.layer[0].attention
    for layer, dim in ((attention.self.query, 0), (attention.self.key, 0), (attention.self.value, 0)):
        prune.custom_from_mask(layer, "weight", torch.ones(64, 64).index_fill_(dim, torch.arange(16, 32), 0))
    prune.custom_from_mask(
        attention.output.dense, "weight", torch.ones(64, 64).index_fill_(1, torch.arange(16, 32), 0)
    )
    ffn = model.encoder.layer[0].intermediate.dense
    prune.custom_from_mask(ffn, "weight", torch.ones(128, 64).index_fill_(0, torch.arange(40), 0))
    with torch.no_grad():
        ffn.bias[:40] = -5.0
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    dense = sum(p.numel() for p in baked(model).parameters())
    small, report = compactor.compact(model, ids, round_to="auto", timer=ParamTimer(lambda p: 1.0))
    assert [h["heads_after"] for h in report.extra["heads"]] == [3]
    auto = report.to_dict()["auto"]
    assert auto["model_ms"] == {
        "before": dense * 1.0,
        "after": sum(p.numel() for p in small.parameters()) * 1.0,
    }
