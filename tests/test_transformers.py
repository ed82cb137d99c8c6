"""Hugging Face Transformers models (issue 5): FFN neurons, attention heads, vision backbones.

Every model is built from a tiny config with random weights (nothing downloads). Biases and norm
parameters are randomised too, as in a trained model: a fresh BERT has all-zero biases, which would hide
the constant-folding cases. Each test masks the way users do (``torch.nn.utils.prune``), compacts, checks
the exact sizes the math allows, and compares outputs with the masked model on padded batches.
"""

from __future__ import annotations

import copy
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from benchmarks.models import prune_per_group
from compactor.engine.heads import HeadChange, HeadFate, compact_heads, head_layers
from compactor.io.save import save_output

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, FFN = 64, 4, 128
HEAD = HIDDEN // HEADS
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


# --- models and inputs -------------------------------------------------------------------------------
def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero biases and non-trivial norm parameters, like a trained model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif "LayerNorm" in name or "layernorm" in name or "normalization" in name:
                p.copy_(1 + torch.randn(p.shape, generator=generator) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(1 + torch.rand(m.num_features, generator=generator))
    return model


def bert(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=32,
        attn_implementation=attn,
    )
    return randomise(transformers.BertModel(config)).eval()


def text_inputs(all_padding_row: bool = False) -> dict[str, torch.Tensor]:
    """Three sequences: no padding, three pad tokens, one real token (and optionally one all padding)."""
    generator = torch.Generator().manual_seed(0)
    rows = 4 if all_padding_row else 3
    ids = torch.randint(0, 100, (rows, 8), generator=generator)
    mask = torch.ones(rows, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 1:] = 0
    if all_padding_row:
        mask[3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return [t for t in (out.get("last_hidden_state"), out.get("pooler_output")) if t is not None]


def assert_same(a: nn.Module, b: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    for x, y in zip(outputs(a, inputs), outputs(b, inputs), strict=True):
        torch.testing.assert_close(y, x, **CLOSE)


def reloaded(model: nn.Module) -> nn.Module:
    """``torch.save`` the whole module and load it back (a pickled module needs ``weights_only=False``)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def mask_heads(linear: nn.Linear, heads: Iterable[int], dim: int = 0) -> None:
    """What users do for head pruning: ``custom_from_mask`` over the head's rows (or columns of the output)."""
    mask = torch.ones_like(linear.weight)
    for h in heads:
        mask.narrow(dim, h * HEAD, HEAD).zero_()
    prune.custom_from_mask(linear, "weight", mask)


def mask_whole_heads(attention: nn.Module, heads: Iterable[int]) -> None:
    """Mask heads consistently across query, key, value (rows) and the output projection (columns)."""
    heads = list(heads)
    for linear in (attention.self.query, attention.self.key, attention.self.value):
        mask_heads(linear, heads)
    mask_heads(attention.output.dense, heads, dim=1)


def zero_neuron_biases(linear: nn.Linear) -> None:
    """Zero the bias of each output neuron whose weight row the mask removed."""
    with torch.no_grad():
        linear.bias[(linear.weight == 0).all(dim=1)] = 0


def fates(report: compactor.CompactionReport) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for z in report.zeroed:
        found.setdefault(z.fate, set()).add(z.reason)
    return found


# --- 1. BERT FFN neurons through compactor.compact --------------------------------------------------
def test_bert_ffn_neurons_masked_rows_are_removed() -> None:
    model = bert()
    for layer in model.encoder.layer:
        prune.ln_structured(layer.intermediate.dense, "weight", 0.5, n=2, dim=0)
        zero_neuron_biases(layer.intermediate.dense)
    inputs = text_inputs()

    small, report = compactor.compact(model, inputs)

    for layer in small.encoder.layer:
        assert (layer.intermediate.dense.out_features, layer.output.dense.in_features) == (FFN // 2, FFN // 2)
        assert layer.attention.self.query.out_features == HIDDEN  # nothing else moved
    assert set(fates(report)) == {"removed"}
    assert report.params["after"] < report.params["before"]
    assert_same(model, small, inputs)


def test_bert_ffn_neurons_ignored_by_output_dense_are_removed() -> None:
    model = bert()
    for layer in model.encoder.layer:
        prune.ln_structured(layer.output.dense, "weight", 0.25, n=2, dim=1)
    inputs = text_inputs()

    small, report = compactor.compact(model, inputs)

    for layer in small.encoder.layer:
        assert (layer.intermediate.dense.out_features, layer.output.dense.in_features) == (96, 96)
    assert fates(report) == {"removed": {"no layer reads it"}}
    assert_same(model, small, inputs)


def test_bert_dead_ffn_neuron_with_bias_folds_gelu_of_bias() -> None:
    """A zero row with bias b emits GELU(b) for every token: folded into output.dense's bias."""
    model = bert()
    layer = model.encoder.layer[0]
    prune.ln_structured(layer.intermediate.dense, "weight", 0.25, n=2, dim=0)  # biases stay non-zero
    dead = (layer.intermediate.dense.weight == 0).all(dim=1)
    bias_before = layer.output.dense.bias.detach().clone()
    inputs = text_inputs()

    small, report = compactor.compact(model, inputs)

    new = small.encoder.layer[0]
    assert (new.intermediate.dense.out_features, new.output.dense.in_features) == (96, 96)
    assert small.encoder.layer[1].intermediate.dense.out_features == FFN
    assert set(fates(report)) == {"folded"}
    gelu_b = nn.functional.gelu(layer.intermediate.dense.bias.detach()[dead])
    expected = bias_before + layer.output.dense.weight.detach()[:, dead] @ gelu_b
    torch.testing.assert_close(new.output.dense.bias.detach(), expected, **CLOSE)
    assert_same(model, small, inputs)


def test_bert_hidden_channels_are_kept_because_of_layernorm() -> None:
    """Zero hidden channel c in every writer of the residual stream: LayerNorm still reads it."""
    model = bert()
    channels = [3, 7]
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Embedding):
                m.weight[:, channels] = 0
            elif name.endswith("output.dense"):  # attention output and FFN output write the stream
                m.weight[channels] = 0
                m.bias[channels] = 0
    inputs = text_inputs()

    small, report = compactor.compact(model, inputs)

    kept = [z for z in report.zeroed if z.channel in channels]
    assert kept and all(z.fate == "kept: read elsewhere" and "LayerNorm" in z.reason for z in kept)
    assert small.embeddings.word_embeddings.embedding_dim == HIDDEN
    assert all(layer.output.dense.out_features == HIDDEN for layer in small.encoder.layer)
    assert_same(model, small, inputs)


# --- 2. attention heads: compactor.heads.compact_heads -----------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_whole_heads_masked_across_qkvo_are_removed_saved_and_reloaded(attn: str) -> None:
    model = bert(attn)
    mask_whole_heads(model.encoder.layer[0].attention, [1, 3])
    mask_whole_heads(model.encoder.layer[1].attention, [0])
    inputs = text_inputs()
    weight_before = model.encoder.layer[0].attention.self.query.weight.clone()

    small, changes = compact_heads(model, inputs)

    assert [(c.layer, c.heads_before, c.heads_after, c.removed) for c in changes] == [
        ("encoder.layer.0.attention.self", 4, 2, (1, 3)),
        ("encoder.layer.1.attention.self", 4, 3, (0,)),
    ]
    for layer, heads in zip(small.encoder.layer, (2, 3)):
        sa = layer.attention.self
        assert (sa.num_attention_heads, sa.all_head_size) == (heads, heads * HEAD)
        assert sa.query.out_features == sa.key.out_features == sa.value.out_features == heads * HEAD
        assert layer.attention.output.dense.in_features == heads * HEAD
    assert small.config.num_attention_heads == HEADS  # shared config: describes the dense model
    assert_same(model, small, inputs)
    assert_same(model, reloaded(small), inputs)
    # the caller's model is untouched: masks still attached, shapes unchanged
    assert prune.is_pruned(model)
    assert torch.equal(model.encoder.layer[0].attention.self.query.weight, weight_before)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_value_heads_removed_and_constant_heads_folded(attn: str) -> None:
    """v rows zero, v bias zero: outputs 0. v rows zero, v bias b: outputs b (softmax rows sum to 1)."""
    model = bert(attn)
    sa0, sa1 = model.encoder.layer[0].attention.self, model.encoder.layer[1].attention.self
    mask_heads(sa0.value, [0, 2])
    with torch.no_grad():
        sa0.value.bias[0:HEAD] = 0  # head 0 outputs exactly zero, head 2 the constant bias
    mask_heads(sa1.value, [1])
    out_bias = model.encoder.layer[1].attention.output.dense.bias.detach().clone()
    inputs = text_inputs()

    small, changes = compact_heads(model, inputs)

    by_layer = {c.layer: c for c in changes}
    first = by_layer["encoder.layer.0.attention.self"]
    assert (first.heads_after, first.removed) == (2, (0, 2))
    assert [d.fate for d in first.decisions] == [HeadFate.REMOVED, HeadFate.FOLDED]
    second = by_layer["encoder.layer.1.attention.self"]
    assert (second.heads_after, second.removed) == (3, (1,))
    dense = model.encoder.layer[1].attention.output.dense
    cols = slice(HEAD, 2 * HEAD)
    expected = out_bias + dense.weight.detach()[:, cols] @ sa1.value.bias.detach()[cols]
    torch.testing.assert_close(small.encoder.layer[1].attention.output.dense.bias.detach(), expected, **CLOSE)
    assert_same(model, small, inputs)
    assert_same(model, reloaded(small), inputs)


def test_folding_needs_one_visible_key_under_sdpa() -> None:
    """An all-padding sequence: SDPA returns 0 (not b_v) for a fully masked row, eager a uniform average.

    Folding the constant head is exact wherever a query sees at least one key; ``fold_constant_heads=False``
    keeps such heads for inputs that contain sequences made only of padding.
    """
    inputs = text_inputs(all_padding_row=True)
    for attn, folded_exact in (("eager", True), ("sdpa", False)):
        model = bert(attn)
        mask_heads(model.encoder.layer[0].attention.self.value, [2])
        small, _ = compact_heads(model)
        same = [torch.allclose(x, y, **CLOSE) for x, y in zip(outputs(model, inputs), outputs(small, inputs))]
        assert all(same) is folded_exact, attn
        assert_same(model, small, {k: v[:3] for k, v in inputs.items()})  # every real sequence: exact

    kept, changes = compact_heads(model, fold_constant_heads=False)
    assert [d.fate for d in changes[0].decisions] == [HeadFate.KEPT_FOLDING_OFF]
    assert kept.encoder.layer[0].attention.self.num_attention_heads == HEADS
    assert_same(model, kept, inputs)


def checker(reference: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[nn.Module], str | None]:
    """A ``verify`` callback for compact_heads: None if the candidate reproduces ``reference``, else why."""
    expected = outputs(reference, inputs)

    def check(candidate: nn.Module) -> str | None:
        got = outputs(candidate, inputs)
        worst = max((a - b).abs().max().item() for a, b in zip(expected, got, strict=True))
        return None if worst <= 1e-5 else f"max abs error {worst:.3g}"

    return check


def test_verify_callback_retries_without_folding() -> None:
    """With an all-padding sequence under SDPA the fold fails; the retry keeps the constant head only."""
    model = bert("sdpa")
    sa = model.encoder.layer[0].attention.self
    mask_heads(sa.value, [0, 2])
    with torch.no_grad():
        sa.value.bias[0:HEAD] = 0  # head 0 outputs exactly zero: removable without folding
    inputs = text_inputs(all_padding_row=True)

    small, changes = compact_heads(model, inputs, verify=checker(model, inputs))

    assert [(d.head, d.fate) for d in changes[0].decisions] == [
        (0, HeadFate.REMOVED),
        (2, HeadFate.KEPT_FOLDING_OFF),
    ]
    assert small.encoder.layer[0].attention.self.num_attention_heads == 3
    assert_same(model, small, inputs)


def test_verify_callback_that_always_fails_keeps_every_head() -> None:
    model = bert()
    mask_whole_heads(model.encoder.layer[0].attention, [1])
    calls: list[nn.Module] = []

    def refuse(candidate: nn.Module) -> str:
        calls.append(candidate)
        return "outputs differ"

    small, changes = compact_heads(model, verify=refuse)

    assert len(calls) == 2  # with folding, then without
    assert (changes[0].heads_after, changes[0].removed) == (HEADS, ())
    assert changes[0].decisions[0].fate is HeadFate.KEPT_UNVERIFIED
    assert "outputs differ" in changes[0].reason
    assert small.encoder.layer[0].attention.self.query.out_features == HIDDEN
    assert not prune.is_pruned(small)  # masks baked, as on success
    assert_same(model, small, text_inputs())


@pytest.mark.parametrize("projections", [("query", "key"), ("key",)])
def test_heads_with_zero_query_and_key_are_kept_with_a_reason(projections: tuple[str, ...]) -> None:
    """Uniform attention still averages the values: removing the head would change the output.

    Zero key rows alone suffice: every key then carries the key bias, so every score in a row is equal.
    """
    model = bert()
    sa = model.encoder.layer[0].attention.self
    for name in projections:
        mask_heads(getattr(sa, name), [1])
    inputs = text_inputs()

    small, changes = compact_heads(model, inputs)

    assert len(changes) == 1 and changes[0].removed == ()
    assert changes[0].decisions[0].fate is HeadFate.KEPT_UNIFORM
    assert "uniform attention" in changes[0].reason
    assert small.encoder.layer[0].attention.self.num_attention_heads == HEADS
    assert_same(model, small, inputs)


def test_every_head_masked_keeps_one() -> None:
    model = bert()
    mask_whole_heads(model.encoder.layer[0].attention, range(HEADS))
    inputs = text_inputs()

    small, changes = compact_heads(model, inputs)

    change = changes[0]
    assert (change.heads_after, change.removed) == (1, (1, 2, 3))
    assert change.decisions[0].fate is HeadFate.KEPT_MIN_ONE
    assert small.encoder.layer[0].attention.self.query.out_features == HEAD
    assert_same(model, small, inputs)


def test_head_change_is_a_frozen_record_with_to_dict() -> None:
    model = bert()
    mask_whole_heads(model.encoder.layer[0].attention, [2])
    _, changes = compact_heads(model)
    change = changes[0]
    assert isinstance(change, HeadChange)
    with pytest.raises(AttributeError):
        change.heads_after = 4  # type: ignore[misc]
    d = change.to_dict()
    assert d["removed"] == (2,) and d["decisions"][0]["fate"] == "removed"


def test_heads_then_compact_gives_a_smaller_exact_model() -> None:
    """What ``compact`` does once heads are wired in: heads first, then channel groups (FFN)."""
    model = bert()
    mask_whole_heads(model.encoder.layer[0].attention, [1])
    for layer in model.encoder.layer:
        prune.ln_structured(layer.intermediate.dense, "weight", 0.5, n=2, dim=0)
        zero_neuron_biases(layer.intermediate.dense)
    inputs = text_inputs()

    headed, _ = compact_heads(model, inputs)
    small, _ = compactor.compact(headed, inputs)

    assert small.encoder.layer[0].attention.self.num_attention_heads == 3
    assert small.encoder.layer[0].attention.self.value.out_features == 3 * HEAD
    assert [layer.intermediate.dense.out_features for layer in small.encoder.layer] == [FFN // 2] * 2
    assert_same(model, small, inputs)
    assert_same(model, reloaded(small), inputs)


def test_compact_updates_head_counts_of_masked_heads() -> None:
    model = bert()
    mask_whole_heads(model.encoder.layer[0].attention, [1, 3])
    small, _ = compactor.compact(model, text_inputs())
    sa = small.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.all_head_size, sa.query.out_features) == (2, 2 * HEAD, 2 * HEAD)


# --- attention layouts and pairing edge cases --------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "clip"])
def test_proj_layout_heads(family: str) -> None:
    """ViT (``o_proj``) and CLIP (``out_proj``, ``num_heads``): q/k/v/o on one module, ``head_dim``."""
    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    if family == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=4, **common))
    else:
        model = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(image_size=16, patch_size=4, **common)
        )
    model = randomise(model).eval()
    attentions = [m for m in model.modules() if hasattr(m, "v_proj")]
    for attention in attentions:
        mask = torch.ones_like(attention.v_proj.weight)
        mask[8:16] = 0  # head 1 of 4 (head_dim 8): constant output, folded
        prune.custom_from_mask(attention.v_proj, "weight", mask)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}

    small, changes = compact_heads(model, inputs)

    assert [(c.heads_after, c.removed) for c in changes] == [(3, (1,))] * 2
    assert all(d.fate is HeadFate.FOLDED for c in changes for d in c.decisions)
    new = [m for m in small.modules() if hasattr(m, "v_proj")]
    heads_attr = "num_attention_heads" if family == "vit" else "num_heads"
    assert all(getattr(m, heads_attr) == 3 and m.v_proj.out_features == 24 for m in new)
    assert_same(model, small, inputs)


class SelfAttentionNoOutput(nn.Module):
    """BERT-style attribute names, but no ``output.dense`` next to it: nothing to pair with."""

    def __init__(self) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size, self.all_head_size = 2, 4, 8
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, 4).transpose(1, 2) for f in (self.query, self.key, self.value))
        return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)


class Output(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)


class AttentionWithDetour(nn.Module):
    """``self`` + ``output.dense`` like BertAttention, but a Linear sits between them: not BERT's pairing."""

    def __init__(self) -> None:
        super().__init__()
        self.self = SelfAttentionNoOutput()
        self.mix = nn.Linear(8, 8)
        self.output = Output()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.mix(self.self(x)))


def _zero_value_head(attention: SelfAttentionNoOutput) -> None:
    with torch.no_grad():
        attention.value.weight[:4] = 0
        attention.value.bias[:4] = 0


def test_attention_without_output_dense_is_reported_and_kept() -> None:
    model = nn.Sequential(SelfAttentionNoOutput())
    _zero_value_head(model[0])
    x = torch.randn(2, 5, 8)

    small, changes = compact_heads(model, x)

    assert [(c.layer, c.heads_after) for c in changes] == [("0", 2)]
    assert changes[0].decisions[0].fate is HeadFate.KEPT_NO_PAIRING
    torch.testing.assert_close(small(x), model(x))


def test_pairing_is_confirmed_by_tracing_when_inputs_are_given() -> None:
    model = AttentionWithDetour()
    _zero_value_head(model.self)
    x = torch.randn(2, 5, 8)

    _, unconfirmed = compact_heads(model)  # structure alone pairs self with output.dense
    small, changes = compact_heads(model, x)

    assert unconfirmed[0].heads_after == 1
    assert changes[0].heads_after == 2 and changes[0].decisions[0].fate is HeadFate.KEPT_NO_PAIRING
    assert "does not read" in changes[0].reason
    torch.testing.assert_close(small(x), model(x))


# --- 3. vision backbones through compactor.compact ---------------------------------------------------
def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def assert_same_image(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ya, yb = a(pixel_values=x), b(pixel_values=x)
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(yb[key], ya[key], **CLOSE)


def mask_all_convs(model: nn.Module, amount: float, skip: Iterable[str] = ()) -> None:
    for name, m in model.named_modules():
        if any(s in name for s in skip):
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            prune.ln_structured(m, "weight", amount, n=2, dim=0)


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_inner_channels_are_removed(layer_type: str) -> None:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type=layer_type, num_channels=3
    )
    model = randomise(transformers.ResNetModel(config)).eval()
    mask_all_convs(model, 0.5)
    x = image()

    small, report = compactor.compact(model, x)

    stages = small.encoder.stages
    # A conv inside a residual block writes channels that only the block's next conv reads. A masked
    # filter emits the BatchNorm shift, a constant after ReLU: folded into a 1x1 consumer's bias, or merged
    # into one carrier channel that a zero-padded 3x3 consumer keeps.
    expected, found = [], []
    for old, new in zip(model.encoder.stages, stages, strict=True):
        for block, new_block in zip(old.layers, new.layers, strict=True):
            for i in range(len(block.layer) - 1):
                padded = block.layer[i + 1].convolution.padding != (0, 0)
                expected.append(block.layer[i].convolution.out_channels // 2 + int(padded))
                found.append(new_block.layer[i].convolution.out_channels)
    assert found == expected
    assert {"merged", "carrier"} <= set(fates(report))
    # the last stage writes the model output: its zeroed channels are kept, with that reason
    assert stages[-1].layers[-1].layer[-1].convolution.out_channels == config.hidden_sizes[-1]
    assert "the channel is part of a model output" in fates(report)["kept: read elsewhere"]
    assert report.params["after"] < report.params["before"]
    assert_same_image(model, small, x)


def convnext() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, patch_size=4, num_channels=3
    )
    model = transformers.ConvNextModel(config)
    with torch.no_grad():  # layer scale starts at 1e-6: make the block's branch matter
        for layer in model.modules():
            if getattr(layer, "layer_scale_parameter", None) is not None:
                layer.layer_scale_parameter.fill_(0.5)
    return randomise(model).eval()


def test_convnext_pwconv1_expansion_neurons_are_removed() -> None:
    """dwconv -> LayerNorm(channels_last) -> pwconv1 (4x) -> GELU -> pwconv2: the 4x neurons can go."""
    model = convnext()
    for stage in model.encoder.stages:
        for layer in stage.layers:
            prune.ln_structured(layer.pwconv1, "weight", 0.5, n=2, dim=0)
            zero_neuron_biases(layer.pwconv1)
    x = image()

    small, report = compactor.compact(model, x)

    widths = [
        (layer.pwconv1.out_features, layer.pwconv2.in_features)
        for s in small.encoder.stages
        for layer in s.layers
    ]
    assert widths == [(32, 32), (64, 64)]
    assert set(fates(report)) == {"removed"}
    assert_same_image(model, small, x)


def test_convnext_residual_stream_is_kept_because_of_layernorm() -> None:
    """Zero channel c of stage 0's stream in both writers (patch embedding, pwconv2): LayerNorm reads it."""
    model = convnext()
    c = 5
    with torch.no_grad():
        patch = model.embeddings.patch_embeddings
        patch.weight[c] = 0
        patch.bias[c] = 0
        for layer in model.encoder.stages[0].layers:
            layer.pwconv2.weight[c] = 0
            layer.pwconv2.bias[c] = 0
    x = image()

    small, report = compactor.compact(model, x)

    kept = [z for z in report.zeroed if z.channel == c]
    assert kept and all(z.fate == "kept: read elsewhere" and "LayerNorm" in z.reason for z in kept)
    assert small.embeddings.patch_embeddings.out_channels == 16
    assert_same_image(model, small, x)


@pytest.mark.slow  # 17 inverted-residual blocks whatever the width: ~15 s on a loaded CPU
def test_mobilenet_v2_expansion_channels_are_removed() -> None:
    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_channels=3)
    model = randomise(transformers.MobileNetV2Model(config)).eval()
    for layer in model.layer:  # mask each expansion filter with its BatchNorm scale and shift, as pruners do
        prune.ln_structured(layer.expand_1x1.convolution, "weight", 0.5, n=2, dim=0)
        dead = layer.expand_1x1.convolution.weight_mask.flatten(1).sum(1) == 0
        with torch.no_grad():
            layer.expand_1x1.normalization.weight[dead] = 0
            layer.expand_1x1.normalization.bias[dead] = 0
    x = image()

    small, report = compactor.compact(model, x)

    for old, new in zip(model.layer, small.layer, strict=True):
        expanded = old.expand_1x1.convolution.out_channels
        # expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> reduce 1x1: the expansion halves
        assert new.expand_1x1.convolution.out_channels == expanded // 2
        assert new.conv_3x3.convolution.groups == expanded // 2
        assert new.reduce_1x1.convolution.in_channels == expanded // 2
    assert report.params["after"] < report.params["before"]
    assert_same_image(model, small, x)


def regnet() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.RegNetConfig(
        embedding_size=16,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        groups_width=8,
        layer_type="y",
        num_channels=3,
    )
    return randomise(transformers.RegNetModel(config)).eval()


def mask_half_of_each_group(layer: nn.Module, groups: int) -> None:
    """Mask the smaller half of the filters of each of ``groups`` equal runs (a group-aware pruner), with
    their BatchNorm scale and shift, so that they emit exactly 0."""
    conv = prune_per_group(layer.convolution, 0.5, groups)
    dead = conv.weight_mask.flatten(1).sum(1) == 0
    with torch.no_grad():
        layer.normalization.weight[dead] = 0
        layer.normalization.bias[dead] = 0


def test_regnet_grouped_conv_channels_are_removed_group_by_group() -> None:
    """RegNetY block: 1x1 -> 3x3 grouped (8 channels a group) -> squeeze-excite -> 1x1. Half of each group
    masked on both sides of the grouped conv: every layer halves, the grouped conv keeps its groups."""
    model = regnet()
    for stage in model.encoder.stages:
        for block in stage.layers:
            groups = block.layer[1].convolution.groups
            mask_half_of_each_group(block.layer[0], groups)
            mask_half_of_each_group(block.layer[1], groups)
    x = image()

    small, report = compactor.compact(model, x)

    for old, new in zip(model.encoder.stages, small.encoder.stages, strict=True):
        for block, new_block in zip(old.layers, new.layers, strict=True):
            width, groups = block.layer[1].convolution.out_channels, block.layer[1].convolution.groups
            grouped = new_block.layer[1].convolution
            assert (grouped.in_channels, grouped.out_channels, grouped.groups) == (
                width // 2,
                width // 2,
                groups,
            )
            assert new_block.layer[0].convolution.out_channels == width // 2
            se = new_block.layer[2].attention
            assert (se[0].in_channels, se[2].out_channels) == (width // 2, width // 2)
            assert new_block.layer[3].convolution.in_channels == width // 2
    assert set(fates(report)) == {"removed"}
    assert_same_image(model, small, x)


def test_regnet_uneven_masks_keep_every_group_the_same_width() -> None:
    """Masks that ignore the groups (``ln_structured`` per layer) and BatchNorm shifts left as trained:
    constants merge into a carrier per group, each group loses as many as the least pruned one."""
    model = regnet()
    mask_all_convs(model, 0.5)
    for stage in model.encoder.stages:
        for block in stage.layers:
            prune.ln_structured(block.layer[1].convolution, "weight", 0.5, n=2, dim=0)
    x = image()

    small, report = compactor.compact(model, x)

    shrunk = []
    for old, new in zip(model.encoder.stages, small.encoder.stages, strict=True):
        for block, new_block in zip(old.layers, new.layers, strict=True):
            grouped, before = new_block.layer[1].convolution, block.layer[1].convolution
            assert grouped.groups == before.groups
            assert grouped.weight.shape == (grouped.out_channels, grouped.in_channels // grouped.groups, 3, 3)
            shrunk.append(
                grouped.in_channels < before.in_channels or grouped.out_channels < before.out_channels
            )
    assert any(shrunk)
    assert "kept: layer layout" in fates(report)
    assert all(
        "loses the same number of channels in every group" in r for r in fates(report)["kept: layer layout"]
    )
    assert_same_image(model, small, x)


def test_llama_mlp_neurons_go_and_rotary_coupling_is_kept() -> None:
    """LLaMA: gate_proj -> SiLU, times up_proj -> down_proj. A masked gate neuron emits SiLU(0) * up = 0, so
    it goes from all three. Torch-Pruning's coupling walk from q_proj/k_proj never ends through the rotary
    embedding (VainF/Torch-Pruning#527): compactor bounds it and keeps those channels, with the reason."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaModel(config).eval()
    for layer in model.layers:
        prune.ln_structured(layer.mlp.gate_proj, "weight", 0.5, n=2, dim=0)
        prune.ln_structured(layer.self_attn.q_proj, "weight", 0.25, n=2, dim=0)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    small, report = compactor.compact(model, {"input_ids": ids})

    for layer in small.layers:
        mlp = layer.mlp
        assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (
            64,
            64,
            64,
        )
        assert layer.self_attn.q_proj.out_features == 64
    # Torch-Pruning's walk through the rotary embedding does not settle, so compactor's own labels answer:
    # rotate_half couples q_proj's row j with row j + 8 of its head, the split into heads couples row j of
    # every head, so a q_proj channel is zeroed only where all 8 of its rows are; none is here. The q_proj
    # rows stay (a pruned-filter line each), and the MLP neurons go.
    assert Counter(z.fate for z in report.zeroed) == {"removed": 128}
    kept_q = [k for k in report.to_dict()["pruned_filters"]["kept_by_layer"] if k["layer"].endswith("q_proj")]
    assert sum(k["kept"] for k in kept_q) == 2 * 16  # 25% of 64 rows per layer
    with torch.no_grad():
        torch.testing.assert_close(
            small(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state, **CLOSE
        )


def _llama_ignored_query_heads() -> Any:
    """Llama with 2 key/value heads of 4 query heads each (head_dim 8): o_proj ignores query heads 1, 2 and 5
    in layer 0 (group 0 has two, group 1 one: one goes from each) and 0, 1, 6, 7 in layer 1 (two from each)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer, heads in zip(model.model.layers, ((1, 2, 5), (0, 1, 6, 7))):
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
    return model


def test_query_heads_within_kept_key_value_groups_go_evenly(tmp_path: Path) -> None:
    """Grouped-query attention: every key/value group keeps as many query heads as the group with the fewest
    ignored ones leaves; ``num_key_value_groups`` follows, also through safetensors and a directory."""
    model = _llama_ignored_query_heads()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    small, report = compactor.compact(model, {"input_ids": ids})
    attention = [layer.self_attn for layer in small.model.layers]
    assert [(a.q_proj.out_features, a.o_proj.in_features, a.num_key_value_groups) for a in attention] == [
        (48, 48, 3),
        (32, 32, 2),
    ]
    assert [a.k_proj.out_features for a in attention] == [16, 16]
    heads = {h["layer"]: h for h in report.extra["heads"]}
    assert heads["model.layers.0.self_attn"]["query_heads"] == (4, 3)
    assert "query heads [1, 5] removed" in heads["model.layers.0.self_attn"]["reason"]
    assert "query heads [2] kept" in heads["model.layers.0.self_attn"]["reason"]
    assert heads["model.layers.1.self_attn"]["query_heads"] == (4, 2)
    assert "query heads per group 4 → 2" in report.table()
    other = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=other).logits, model(input_ids=other).logits, **CLOSE)
        assert torch.equal(
            small.generate(other[:, :5], max_new_tokens=8, do_sample=False),
            model.generate(other[:, :5], max_new_tokens=8, do_sample=False),
        )
    for out in ("small.safetensors", "small"):
        save_output(small, tmp_path / out, {"input_ids": ids}, format="safetensors" if "." in out else "hf")
        back = compactor.load(
            tmp_path / out,
            **({"arch": lambda: transformers.LlamaForCausalLM(model.config)} if "." in out else {}),
        )
        assert [layer.self_attn.num_key_value_groups for layer in back.model.layers] == [3, 2]
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=other).logits, model(input_ids=other).logits, **CLOSE)


def test_models_are_left_untouched() -> None:
    model = bert()
    prune.ln_structured(model.encoder.layer[0].intermediate.dense, "weight", 0.5, n=2, dim=0)
    snapshot = copy.deepcopy(model.state_dict())
    compactor.compact(model, text_inputs())
    compact_heads(model)
    assert model.state_dict().keys() == snapshot.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())


def test_head_layers_names_the_projections_that_hold_heads() -> None:
    layers = head_layers(bert())
    sa, dense = "encoder.layer.1.attention.self", "encoder.layer.1.attention.output.dense"
    assert {k: v for k, v in layers.items() if v == sa} == {
        (f"{sa}.query", "out"): sa,
        (f"{sa}.key", "out"): sa,
        (f"{sa}.value", "out"): sa,
        (dense, "in"): sa,
    }
    assert len(layers) == 8  # two layers, four projections each


def test_channels_of_a_head_are_kept_with_a_head_reason() -> None:
    """Zero output.dense columns that do not make up whole heads: exact compaction must keep them."""
    model = bert()
    for layer in model.encoder.layer:
        prune.ln_structured(layer.attention.output.dense, "weight", 0.3, n=2, dim=1)
    inputs = text_inputs()

    small, report = compactor.compact(model, inputs)

    assert all(layer.attention.output.dense.in_features == HIDDEN for layer in small.encoder.layer)
    assert_same(model, small, inputs)
    # The split into heads (``view(b, n, 4, 16)``) couples column j of every head: a channel is zeroed where
    # output.dense ignores column j in all four heads; each stays, with the head reason.
    whole_rows = 0
    for layer in model.encoder.layer:
        zero = (layer.attention.output.dense.weight == 0).all(0).reshape(HEADS, HEAD)
        whole_rows += int(zero.all(0).sum())
    kept = [z for z in report.zeroed if "attention.self" in z.layer]
    assert len(kept) == whole_rows
    assert all(z.fate == "kept: read elsewhere" and "head" in z.reason for z in kept)


def test_a_concatenation_torch_pruning_cannot_size_keeps_the_channels_that_reach_it() -> None:
    """GPT-2: Torch-Pruning cannot size one concatenation (``int + None`` in its index mapping). That ends
    no run and keeps no more than it must: the roots whose channels reach it (the fused ``c_attn``) keep them,
    with the library's error as reason, and the 8 masked neurons of ``c_fc`` (a ``Conv1D``) go."""
    from torch.nn.utils import prune
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32)).eval()
    prune.custom_from_mask(
        model.transformer.h[0].mlp.c_fc, "weight", _columns_off(model.transformer.h[0].mlp.c_fc.weight, 8)
    )
    ids = torch.randint(0, 50, (1, 12))
    # the adapter's own answer (auto: the labels answer)
    small, report = compactor.compact(model, {"input_ids": ids}, analysis="torch-pruning")
    assert report.params["before"] - report.params["after"] == 8 * (32 + 1) + 8 * 32  # c_fc and c_proj
    assert (small.transformer.h[0].mlp.c_fc.nf, small.transformer.h[0].mlp.c_proj.nx) == (120, 120)
    issues = report.extra["graph_issues"]
    assert [i.split("which the channels of ")[1] for i in issues] == [
        "transformer.h.0.attn.c_attn reach: kept",
        "transformer.h.1.attn.c_attn reach: kept",
    ]
    assert all(
        i.startswith("torch-pruning cannot map channels through _ConcatOp_")
        and "(its index mapping fails: TypeError: unsupported operand type(s) for +: 'int' and 'NoneType')"
        in i
        for i in issues
    ), issues
    torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def _columns_off(weight: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones_like(weight)
    mask[:, :n] = 0  # GPT-2's Conv1D holds [in, out]: its first n output neurons
    return mask


def test_a_backbone_with_transformers_capturing_hooks_compacts_and_saves(tmp_path: Any) -> None:
    """A transformers 5 backbone asks for hidden states: its first forward installs output-capturing hooks,
    local functions that pickle cannot store. The report's file size and a ``.pt`` are written without
    them; the caller's model keeps its hooks, and the reloaded model installs its own. (``compactor.load``
    refuses this file for now: the pickle rebuilds the ``BackboneType`` enum by calling it.)"""
    from compactor.io.save import save_output

    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, out_features=["stage1", "stage2"]
    )
    model = randomise(transformers.ConvNextBackbone(config)).eval()
    for stage in model.encoder.stages:
        for layer in stage.layers:
            prune.ln_structured(layer.pwconv1, "weight", 0.5, n=2, dim=0)
    x = image()
    with torch.no_grad():
        expected = model(pixel_values=x).feature_maps
    hooked = {n: len(m._forward_hooks) for n, m in model.named_modules() if m._forward_hooks}
    assert hooked  # the forward installed them
    with pytest.raises(AttributeError, match="Can't pickle local object"):
        torch.save(model, io.BytesIO())

    small, report = compactor.compact(model, x)

    assert 0 < report.file_bytes["after"] < report.file_bytes["before"]
    assert {n: len(m._forward_hooks) for n, m in model.named_modules() if m._forward_hooks} == hooked
    path = tmp_path / "small.pt"
    assert save_output(small, path, x) == path.stat().st_size
    with torch.no_grad():
        got = torch.load(path, weights_only=False)(pixel_values=x).feature_maps
    assert len(got) == len(expected) == 2
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, **CLOSE)


def _head_zeroed(family: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """A small model of ``family`` with value head 1 (of 4, head_dim 8) zeroed in every attention module
    that q/k/v/o layouts name, and inputs for it."""
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    size = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2}
    if family == "opt":
        config = transformers.OPTConfig(
            vocab_size=100, hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2,
            word_embed_proj_dim=32, max_position_embeddings=64,
        )  # fmt: skip
        model, inputs = transformers.OPTForCausalLM(config), {"input_ids": ids}
    elif family == "bart":
        config = transformers.BartConfig(
            vocab_size=100, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, encoder_layers=1, decoder_layers=1, max_position_embeddings=64,
        )  # fmt: skip
        model, inputs = transformers.BartModel(config), {"input_ids": ids, "decoder_input_ids": ids}
    elif family == "bert":
        model, inputs = (
            transformers.BertModel(transformers.BertConfig(vocab_size=100, **size)),
            {"input_ids": ids},
        )
    else:
        model = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=4, **size))
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    model = randomise(model).eval()
    with torch.no_grad():
        for m in model.modules():
            value = getattr(m, "v_proj", None) or getattr(m, "value", None)
            if isinstance(value, nn.Linear):
                value.weight[8:16] = 0
                if value.bias is not None:
                    value.bias[8:16] = 0
    return model, inputs


@pytest.mark.parametrize("family", ["opt", "bart", "bert", "vit"])
def test_a_head_removed_is_written_as_a_directory_and_reloaded(family: str, tmp_path: Path) -> None:
    """The head counts the forwards read (OPT and BART view with ``self.num_heads``) travel in the manifest:
    a directory of a model that lost a head reloads with the same outputs."""
    model, inputs = _head_zeroed(family)
    small, report = compactor.compact(model, inputs)
    assert report.extra["heads"] and all(h["heads_after"] == 3 for h in report.extra["heads"])
    save_output(small, tmp_path / "small", inputs, format="hf")
    back = compactor.load(tmp_path / "small")
    for new, old in zip(back.modules(), small.modules()):
        for attr in ("num_heads", "num_attention_heads", "all_head_size"):
            assert getattr(new, attr, None) == getattr(old, attr, None)
    with torch.no_grad():
        expected, got = model(**inputs), back(**inputs)
    key = "logits" if family == "opt" else "last_hidden_state"
    torch.testing.assert_close(got[key], expected[key], **CLOSE)


def test_every_head_count_the_heads_stage_sets_is_one_a_manifest_records() -> None:
    from compactor.engine.heads import LAYOUTS
    from compactor.io.manifest import HEAD_COUNTS

    assert {a for layout in LAYOUTS for a in layout.count_attrs()} <= set(HEAD_COUNTS)


def _neox_widths(model: Any) -> list[Any]:
    return [b.attention.query_key_value.out_features for b in model.gpt_neox.layers]


def _phi3_counts(model: Any) -> list[Any]:
    """Per layer: key/value heads, the count its forward splits qkv_proj by (its own config's query heads),
    ... and qkv_proj's rows; the model's config keeps its 4 query heads."""
    assert model.config.num_attention_heads == 4
    return [
        (a.num_key_value_heads, a.num_key_value_groups, a.config.num_attention_heads, a.qkv_proj.out_features)
        for a in (b.self_attn for b in model.model.layers)
    ]


def _falcon_counts(model: Any) -> list[Any]:
    return [(b.self_attention.num_heads, b.self_attention.num_kv_heads) for b in model.transformer.h]


def _fused_head_zeroed(
    family: str,
) -> tuple[Any, dict[str, torch.Tensor], Callable[[Any], list[Any]], list[Any]]:
    """A small decoder of ``family`` (hidden 32, 4 query heads of 8) whose fused or differently named
    projections lose one head in both layers; the inputs; what counts its heads; and that count after."""
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    falcon = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
        model: Any = randomise(transformers.GPT2LMHeadModel(config))
        attentions = [b.attn for b in model.transformer.h]
        value = (2 * 32 + 8, 2 * 32 + 16)  # c_attn holds [queries | keys | values]: value head 1
        for a in attentions:
            with torch.no_grad():
                a.c_attn.weight[:, value[0] : value[1]] = 0  # Conv1D: [in, out]
                a.c_attn.bias[value[0] : value[1]] = 0
        return (
            model,
            {"input_ids": ids},
            lambda m: [(b.attn.num_heads, b.attn.split_size) for b in m.transformer.h],
            [(3, 24)] * 2,
        )
    if family == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100)
        model = randomise(transformers.DistilBertModel(config))
        for layer in model.transformer.layer:
            with torch.no_grad():
                layer.attention.v_lin.weight[8:16] = 0
                layer.attention.v_lin.bias[8:16] = 0
        return model, {"input_ids": ids}, lambda m: [b.attention.n_heads for b in m.transformer.layer], [3, 3]
    if family == "phi3":  # qkv_proj: [4 query heads | 2 keys | 2 values]; value head 1 goes with its group
        config = transformers.Phi3Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=100, pad_token_id=0,
        )  # fmt: skip
        model = randomise(transformers.Phi3ForCausalLM(config))
        fused, rows, count = [b.self_attn.qkv_proj for b in model.model.layers], (56, 64), _phi3_counts
        expected = [(1, 2, 2, 32)] * 2
    elif family == "neox":
        config = transformers.GPTNeoXConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
        )
        model = randomise(transformers.GPTNeoXForCausalLM(config))
        fused, rows = (
            [b.attention.query_key_value for b in model.gpt_neox.layers],
            (40, 48),
        )  # [q k v] per head
        count: Callable[[Any], list[Any]] = _neox_widths
        expected: list[Any] = [72, 72]
    else:
        extra = {
            "falcon-new": {"new_decoder_architecture": True, "num_kv_heads": 2},
            "falcon-mq": {"multi_query": True},
            "falcon": {"multi_query": False},
        }[family]
        model = randomise(transformers.FalconForCausalLM(transformers.FalconConfig(**falcon, **extra)))
        fused = [b.self_attention.query_key_value for b in model.transformer.h]
        # new architecture: per key/value head [its 2 queries, key, value]; per head: [query, key, value]
        rows = {"falcon-new": (56, 64), "falcon-mq": (0, 0), "falcon": (40, 48)}[family]
        count = _falcon_counts
        expected = {"falcon-new": [(2, 1)] * 2, "falcon-mq": [(3, 1)] * 2, "falcon": [(3, 4)] * 2}[family]
        if family == "falcon-mq":  # one key/value head for all: the output projection ignores query head 2
            for b in model.transformer.h:
                with torch.no_grad():
                    b.self_attention.dense.weight[:, 16:24] = 0
    for layer in fused:
        with torch.no_grad():
            layer.weight[rows[0] : rows[1]] = 0
            if layer.bias is not None:
                layer.bias[rows[0] : rows[1]] = 0
    return model, {"input_ids": ids}, count, expected


@pytest.mark.parametrize(
    "family", ["gpt2", "distilbert", "neox", "falcon-new", "falcon-mq", "falcon", "phi3"]
)
def test_heads_of_fused_and_other_layouts_go_and_reload_from_a_directory(family: str, tmp_path: Path) -> None:
    """GPT-2's ``c_attn`` (a Conv1D, [q | k | v]), Falcon's three packings of ``query_key_value`` (per key/value
    head, multi-query, per head), GPT-NeoX's (per head), DistilBERT's ``q_lin``..``out_lin`` and Phi-3's
    ``qkv_proj`` (a key/value head with its query heads; its forward splits at its config's head count, so
    the layer gets a config of its own): the zeroed head goes, the counts its forward reads follow, and the
    written directory reloads with the same outputs, also at another sequence length."""
    model, inputs, count, expected = _fused_head_zeroed(family)
    model.eval()
    small, report = compactor.compact(model, inputs)
    assert count(model) != expected and count(small) == expected
    assert len(report.extra["heads"]) == 2
    save_output(small, tmp_path / "small", inputs, format="hf")
    back = compactor.load(tmp_path / "small")
    assert count(back) == expected
    longer = {"input_ids": torch.randint(3, 100, (1, 13), generator=torch.Generator().manual_seed(1))}
    key = "last_hidden_state" if family == "distilbert" else "logits"
    if family == "phi3":  # the manifest gives each layer its own config's count; config.json keeps 4
        assert json.loads((tmp_path / "small" / "config.json").read_text())["num_attention_heads"] == 4
    for x in (inputs, longer):
        with torch.no_grad():
            torch.testing.assert_close(back(**x)[key], model(**x)[key], **CLOSE)
            torch.testing.assert_close(small(**x)[key], model(**x)[key], **CLOSE)


def _t5(zeroed: dict[str, list[int]]) -> tuple[Any, dict[str, torch.Tensor]]:
    """A two-layer T5 (4 heads of 8) whose attention ``zeroed`` names (a path under the model, its blocks as
    ``{}``) outputs zero from the value head of each listed block."""
    config = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, vocab_size=100)
    model: Any = randomise(transformers.T5Model(config)).eval()
    for path, blocks in zeroed.items():
        for b in blocks:
            with torch.no_grad():
                model.get_submodule(path.format(b)).v.weight[8:16] = 0  # head 1
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


ENCODER, CROSS = "encoder.block.{}.layer.0.SelfAttention", "decoder.block.{}.layer.1.EncDecAttention"


def test_t5_heads_go_where_the_whole_stack_loses_them_and_reload(tmp_path: Path) -> None:
    """T5's first layer of a stack computes one position bias per head and every layer adds it: a head zeroed
    in every layer of the encoder (and in every cross-attention of the decoder) goes from all of them, with
    its column of ``relative_attention_bias``; the directory reloads, exact at another length too."""
    model, inputs = _t5({ENCODER: [0, 1], CROSS: [0, 1]})
    small, report = compactor.compact(model, inputs)
    assert {h["layer"]: (h["heads_after"], list(h["removed"])) for h in report.extra["heads"]} == {
        ENCODER.format(b): (3, [1]) for b in (0, 1)
    } | {CROSS.format(b): (3, [1]) for b in (0, 1)}
    first = small.encoder.block[0].layer[0].SelfAttention
    assert (first.n_heads, first.inner_dim, first.relative_attention_bias.weight.shape) == (3, 24, (32, 3))
    assert small.decoder.block[0].layer[0].SelfAttention.n_heads == 4  # its heads are all live
    assert not report.warnings, report.warnings  # T5's tied `shared` embedding is read: no "not called"
    save_output(small, tmp_path / "small", inputs, format="hf")
    back = compactor.load(tmp_path / "small")
    ids = torch.randint(3, 100, (1, 13), generator=torch.Generator().manual_seed(1))
    for x in (inputs, {"input_ids": ids, "decoder_input_ids": ids[:, :7]}):
        with torch.no_grad():
            expected = model(**x).last_hidden_state
            torch.testing.assert_close(small(**x).last_hidden_state, expected, **CLOSE)
            torch.testing.assert_close(back(**x).last_hidden_state, expected, **CLOSE)


def test_t5_heads_one_layer_of_a_stack_keeps_are_kept_in_all_with_the_reason() -> None:
    """A head zeroed in one encoder layer only is kept there, saying which layer keeps it; the rows of the
    kept head carry that reason rather than a row-level "coupled to a live channel" alone."""
    model, inputs = _t5({ENCODER: [0]})
    _, report = compactor.compact(model, inputs)
    (change,) = report.extra["heads"]
    assert change["layer"] == ENCODER.format(0) and change["heads_after"] == 4 and not change["removed"]
    assert [d["fate"] for d in change["decisions"]] == ["kept: heads tied across layers"]
    why = change["decisions"][0]["reason"]
    assert "every layer of the stack" in why and why.endswith(f"{ENCODER.format(1)} keeps head 1")
    rows = [f for f in report.filters if f.layer.endswith("SelfAttention.v")]
    assert len(rows) == 8 and all(why in f.reason and "attention head (1)" in f.reason for f in rows)
    assert not report.warnings, report.warnings


def _moe(family: str) -> tuple[Any, list[list[int]]]:
    """A small Qwen3-MoE or Mixtral (2 layers of 4 experts of 64 neurons) whose experts each lose a different
    number of neurons (8 + 2e + layer, some through a zero down column, some through zero gate and up rows),
    and the live count per layer and expert."""
    torch.manual_seed(0)
    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    size |= {"head_dim": 8, "vocab_size": 100, "num_experts_per_tok": 2, "pad_token_id": 0}
    if family == "qwen3_moe":
        config: Any = transformers.Qwen3MoeConfig(
            **size, moe_intermediate_size=64, intermediate_size=64, num_experts=4
        )
        model: Any = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.MixtralConfig(**size, intermediate_size=64, num_local_experts=4)
        model = transformers.MixtralForCausalLM(config)
    model = randomise(model).eval()
    live = []
    for li, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        counts = []
        for e in range(4):
            dead = torch.randperm(64, generator=torch.Generator().manual_seed(10 * li + e))[: 8 + 2 * e + li]
            with torch.no_grad():
                if e % 2:
                    experts.down_proj[e][:, dead] = 0
                else:
                    experts.gate_up_proj[e, dead] = 0
                    experts.gate_up_proj[e, 64 + dead] = 0
            counts.append(64 - len(dead))
        live.append(counts)
    return model, live


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_expert_neurons_sorted_per_expert_and_cut_to_the_widest(family: str, tmp_path: Path) -> None:
    """transformers 5's fused 3-D experts: each expert's dead neurons are sorted last and the layer is cut to
    the most live neurons any expert has (rounded up to 16 bytes for the grouped_mm kernel: 4 in float32), so
    every expert keeps its live neurons; the router is untouched; the report names what
    per-expert widths would save and no zero is called unstructured; a directory reloads the same."""
    model, live = _moe(family)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    small, report = compactor.compact(model, {"input_ids": ids})
    widths = [-(-max(counts) // 4) * 4 for counts in live]  # 56 and 56: the fewest dead are 8 and 9
    assert widths == [56, 56]
    for layer, width, counts in zip(small.model.layers, widths, live):
        experts = layer.mlp.experts
        assert tuple(experts.gate_up_proj.shape) == (4, 2 * width, 32)
        assert tuple(experts.down_proj.shape) == (4, 32, width)
        assert experts.intermediate_dim == width
        assert [int((~compactor.engine.experts.dead_neurons(experts)).sum(1)[e]) for e in range(4)] == counts
    changes = report.extra["experts"]
    assert [c["width_after"] for c in changes] == widths and [list(c["live"]) for c in changes] == live
    assert [c["per_expert_saving"] for c in changes] == [
        sum(w - n for n in counts) * 3 * 32 for w, counts in zip(widths, live)
    ]
    assert not any("unstructured" in w for w in report.warnings), report.warnings
    save_output(small, tmp_path / "small", {"input_ids": ids}, format="hf")
    back = compactor.load(tmp_path / "small")
    assert back.model.layers[1].mlp.experts.intermediate_dim == widths[1]
    longer = torch.randint(3, 100, (1, 13), generator=torch.Generator().manual_seed(1))
    for x in (ids, longer):
        with torch.no_grad():
            expected = model(input_ids=x).logits
            torch.testing.assert_close(small(input_ids=x).logits, expected, **CLOSE)
            torch.testing.assert_close(back(input_ids=x).logits, expected, **CLOSE)


def test_experts_a_failed_verification_or_another_layout_keep_whole() -> None:
    """A cut that the check rejects is given back with the reason; a transposed layout is not cut."""
    from compactor.engine.experts import compact_experts

    model, _ = _moe("mixtral")
    again, changes = compact_experts(copy.deepcopy(model), verify=lambda m: "run 0: off by 1")
    assert all(layer.mlp.experts.down_proj.shape[-1] == 64 for layer in again.model.layers)
    assert [c.reason for c in changes] == ["kept: run 0: off by 1"] * 2
    model.model.layers[0].mlp.experts.is_transposed = True
    _, changes = compact_experts(model)
    assert changes[0].width_after == changes[0].width_before and "is_transposed=True" in changes[0].reason
    assert changes[1].width_after == 56


def test_a_layer_type_registered_by_name_needs_no_import_of_its_package() -> None:
    """``register_by_name``: compactor's import does not import transformers, and Conv1D's shrinker serves the
    class once it is met."""
    import subprocess
    import sys

    code = (
        "import sys, compactor; assert 'transformers' not in sys.modules, 'imported';"
        "from transformers.pytorch_utils import Conv1D; from compactor.layers import shrinker_for;"
        "print(type(shrinker_for(Conv1D(4, 3))).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Conv1DShrinker"


class _SelfAttended(nn.Module):
    """``nn.MultiheadAttention`` (which reads ``out_proj.weight`` without calling ``out_proj``) and a layer no
    forward reads."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.unused = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_weights_read_without_calling_their_module_are_not_reported_uncalled() -> None:
    """A tied embedding (BART's ``shared``: its weight is the called ``embed_tokens``') and
    ``nn.MultiheadAttention``'s ``out_proj`` (its weight read by the functional attention) are used: no
    "not called by any forward" warning. A module no forward reads at all still gets one."""

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    _, report = compactor.compact(_SelfAttended().eval(), x)
    assert report.extra["paths"]["uncalled_layers"] == ["unused (Linear)"]
    model, inputs = _head_zeroed("bart")
    _, report = compactor.compact(model, inputs)
    assert report.extra["paths"]["uncalled_layers"] == [] and not report.warnings, report.warnings


def test_the_uneven_field_is_named_by_the_tensors_it_shapes_not_by_its_value() -> None:
    """``vocab_size`` and ``intermediate_size`` both 64: the uneven FFN widths are named intermediate_size
    (the config field that shapes the changed tensors), not the first field that holds the value."""
    from compactor.io.hf import uniform_config

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    model = randomise(transformers.LlamaForCausalLM(config)).eval()
    with torch.no_grad():
        for layer, n in zip(model.model.layers, (8, 16)):
            layer.mlp.down_proj.weight[:, :n] = 0
    small, _ = compactor.compact(model, {"input_ids": torch.randint(1, 64, (2, 6))})
    assert uniform_config(small) == (
        None,
        "intermediate_size differs across layers (48, 56); --uniform evens it out",
    )
