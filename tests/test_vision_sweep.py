"""Every vision architecture transformers ships (issue #11): small config, random weights, 30% of every
Conv/Linear's output channels masked (``prune.ln_structured``), BatchNorm statistics as after training.
Each case runs in its own process under a time and memory limit (``benchmarks.vision_sweep``); the removed
fractions go to the sweep's report (``python -m benchmarks.vision_sweep``), not into assertions.

The fast tests check the sweep's own machinery on one small model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import vision_sweep as sweep

CASES = [c.name for c in sweep.all_cases()]


def _explain(result: dict[str, Any]) -> str:
    return "\n".join(
        str(result.get(k))
        for k in ("note", "error", "where", "raised", "traceback", "stack")
        if result.get(k)
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_transformers_vision_model_compacts_exactly(name: str) -> None:
    result = sweep.run_isolated(name)
    if result["status"] == "skipped":
        pytest.skip(result["note"])
    assert result["status"] not in (*sweep.FAILED, "build failed"), _explain(result)
    assert result["check"]["ok"], result["check"]["problems"]
    assert result["check"]["max_abs_error"] <= sweep.TOLERANCE * 100  # scale: |logits| stays well under 100
    assert result["pruned_filters"] > 0
    # every kept channel says why (a removal that verification refused is one such reason: Perceiver's
    # reshapes with sizes written in the code; exactness never rests on the prediction)
    kept = sum(n for fate, n in result["fates"].items() if fate.startswith("kept") or fate == "carrier")
    assert kept == sum(result["kept_reasons"].values())
    # something goes unless every zeroed channel is kept for a stated reason (GroupNorm groups in BiT, GRN's
    # mean over channels in ConvNeXt V2): the removed fractions are in benchmarks/VISION_SWEEP.md
    if result["removed"] + result["heads_removed"] > 0:
        assert result["params"]["after"] < result["params"]["before"]
    else:
        assert result["params"]["after"] == result["params"]["before"] and result["kept_reasons"]


def test_every_mapped_class_is_a_case_once() -> None:
    from transformers.models.auto import modeling_auto

    expected = set()
    for task, mapping in (
        ("classification", modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
        ("backbone", modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES),
    ):
        for model_type, names in mapping.items():
            for class_name in (names,) if isinstance(names, str) else names:
                expected.add((sweep.ALIASES.get(model_type, model_type), class_name, task))
    cases = sweep.all_cases()
    assert {(c.config_type, c.class_name, c.task) for c in cases} == expected
    assert len(cases) == len(expected) == len(set(CASES))
    buildable = {c.config_type for c in cases} - set(sweep.NEEDS)
    assert buildable <= set(sweep.CONFIGS)


def test_masking_zeroes_thirty_percent_of_every_layer_and_settles_batchnorm() -> None:
    case = sweep.case_named("resnet")
    model, inputs, pruned = sweep.prepared(case)
    layers = list(sweep.maskable(model))
    # the stem, two bottlenecks of three convs, the second stage's shortcut, the classifier
    assert len(layers) == 1 + 2 * 3 + 1 + 1
    expected = sum(round(m.weight.shape[dim] * sweep.AMOUNT) for _, m, dim in layers)
    assert pruned == expected
    for _, m, _ in layers:
        assert hasattr(m, "weight_mask") and hasattr(m, "weight_orig")  # masks attached, not removed
    # a dead filter of the stem (no bias) gives its BatchNorm a constant 0 input: running_mean is that 0
    stem = model.resnet.embedder.embedder
    dead = (stem.convolution.weight_mask.flatten(1).sum(1) == 0).nonzero().flatten()
    assert len(dead) == round(stem.convolution.out_channels * sweep.AMOUNT)
    assert torch.equal(stem.normalization.running_mean[dead], torch.zeros(len(dead)))
    alive = stem.convolution.weight_mask.flatten(1).sum(1) > 0
    assert bool((stem.normalization.running_mean[alive] != 0).all())
    assert bool((stem.normalization.bias != 0).all())
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {"pixel_values": (sweep.BATCH, 3, 32, 32)}


def test_check_catches_a_changed_output() -> None:
    case = sweep.case_named("resnet")
    model, _, _ = sweep.prepared(case)
    same = sweep.check(case, model, model)
    assert same == {"ok": True, "max_abs_error": 0.0, "problems": []}
    other = sweep.prepared(case)[0]
    with torch.no_grad():
        other.classifier[1].bias.add_(1e-2)
    changed = sweep.check(case, model, other)
    assert not changed["ok"]
    assert len(changed["problems"]) == 4 and "output.logits: max abs error" in changed["problems"][0]


def test_verdicts() -> None:
    base = {
        "check": {"ok": True, "problems": []},
        "warnings": [],
        "pruned_filters": 10,
        "removed": 0,
        "heads_removed": 0,
        "removed_fraction": 0.0,
        "kept_reasons": {"kept: read elsewhere: LayerNorm": 4},
    }
    assert sweep.verdict(base) == ("kept whole", "4 x kept: read elsewhere: LayerNorm")
    assert sweep.verdict(base | {"removed": 1, "removed_fraction": 0.2})[0] == "low"
    assert sweep.verdict(base | {"removed": 4, "removed_fraction": 0.5})[0] == "ok"
    assert sweep.verdict(base | {"heads_removed": 2, "removed_fraction": 1.0})[0] == "ok"
    failed = base | {
        "check": {"ok": False, "problems": ["inputs 1: output.logits: max abs error 1 > 0.0001"]}
    }
    assert sweep.verdict(failed) == ("inexact", "inputs 1: output.logits: max abs error 1 > 0.0001")
