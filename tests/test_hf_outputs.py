"""Hugging Face models verify without noise: KV caches are compared (head by head where heads went), both
sides of a branch the runs took count as verified, transformers' attention-mask branches are said and not
warned of, and no report names a directory of the machine it ran on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import compactor
from compactor.inputs import (
    CachePath,
    ExampleInputs,
    flatten_outputs,
    flatten_values,
    is_hf_cache,
    padded,
    unchecked_outputs,
)
from compactor.outputs import Verdict, compare_outputs, sliced_note
from compactor.util import shown_path

transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :20] = 0
    return model


def _opt() -> nn.Module:
    """OPT with one head of each layer provably idle: layer 0's head 1 unread, layer 1's head 0 zero."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        vocab_size=100,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        model.model.decoder.layers[0].self_attn.out_proj.weight[:, 8:16] = 0
        v = model.model.decoder.layers[1].self_attn.v_proj
        v.weight[0:8] = 0
        v.bias[0:8] = 0
    return model


IDS = torch.arange(16).reshape(2, 8) % 100 + 3


def _cache_field(out: object) -> str:
    """Where the output holds its cache (``cache`` in transformers 5.2x, ``past_key_values`` before)."""
    assert isinstance(out, dict)
    return next(f"output.{k}" for k, v in out.items() if is_hf_cache(v))


def test_a_dynamic_cache_is_flattened_for_verification_and_left_out_of_traced_outputs() -> None:
    with torch.no_grad():
        out = _llama()(input_ids=IDS)
    names = [n for n, _ in flatten_values(out)]
    cache = [n for n in names if isinstance(n, CachePath)]
    field = _cache_field(out)
    assert cache == [f"{field}.layers[{i}].{kind}" for i in range(2) for kind in ("keys", "values")]
    assert all(t.shape == (2, 2, 8, 8) for n, t in flatten_values(out) if isinstance(n, CachePath))
    assert [n for n, _ in flatten_outputs(out)] == ["output.logits"]
    assert unchecked_outputs(out) == []


def test_a_llama_compacts_with_no_warning_and_its_cache_compared() -> None:
    model = _llama()
    small, report = compactor.compact(model, {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)})
    assert report.warnings == ()
    assert report.extra["paths"]["value_branches"] == []
    # the padded run took the other side of masking_utils' "all ones?" branch; the line left is said once
    assert [b.partition(":")[0] for b in report.extra["paths"]["mask_branches"]] == [
        "transformers/masking_utils.py"
    ]
    assert (
        len(report.extra["path_notes"]) == 1 and "compaction cannot change" in report.extra["path_notes"][0]
    )
    assert "cache" not in report.extra  # no head went: the cache has the dense shape and was compared as is
    with torch.no_grad():
        got, want = small(input_ids=IDS), model(input_ids=IDS)
    for (name, a), (_, b) in zip(flatten_values(want), flatten_values(got)):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6), name


def test_opt_heads_go_and_the_cache_is_compared_head_by_head() -> None:
    model = _opt()
    small, report = compactor.compact(model, IDS)
    assert [(h["layer"], h["heads_after"]) for h in report.extra["heads"]] == [
        ("model.decoder.layers.0.self_attn", 3),
        ("model.decoder.layers.1.self_attn", 3),
    ]
    assert report.warnings == ()
    with torch.no_grad():
        out = model(input_ids=IDS)
        dense = dict(flatten_values(out))
        kept = dict(flatten_values(small(input_ids=IDS)))
    field = _cache_field(out)
    assert report.extra["cache"] == (  # the last run that sliced them: the one at another size (16)
        f"KV cache: 4 cache tensor(s) hold only the kept attention heads ({field}.layers[0].keys "
        f"(2, 4, 16, 8) -> (2, 3, 16, 8), {field}.layers[0].values (2, 4, 16, 8) -> (2, 3, 16, 8) "
        f"and 2 more); each kept head was compared with the masked model's, in order"
    )
    keys0, values1 = f"{field}.layers[0].keys", f"{field}.layers[1].values"
    assert torch.equal(kept[keys0], dense[keys0][:, [0, 2, 3]])  # head 1 of layer 0 went
    assert torch.equal(kept[values1], dense[values1][:, [1, 2, 3]])  # head 0 of layer 1 went
    assert torch.allclose(kept["output.logits"], dense["output.logits"], atol=1e-5)


def _cache(name: str = "output.past_key_values.layers[0].keys") -> tuple[CachePath, torch.Tensor]:
    torch.manual_seed(1)
    return CachePath(name), torch.randn(1, 4, 3, 2)


@pytest.mark.parametrize(
    ("heads", "problem"),
    [
        ([0, 2, 3], None),
        ([3], None),
        (
            [2, 0, 3],
            "holds 3 of 4 slices of dimension 1 (heads) and its slice 1 is none of the masked model's",
        ),
        (
            [0, 0, 1],
            "holds 3 of 4 slices of dimension 1 (heads) and its slice 1 is none of the masked model's",
        ),
    ],
)
def test_kept_heads_must_be_the_masked_models_in_order(heads: list[int], problem: str | None) -> None:
    name, a = _cache()
    sliced: dict[str, str] = {}
    worst, problems = compare_outputs([(name, a)], [(name, a[:, heads].clone())], 1e-4, sliced=sliced)
    if problem is None:
        assert (worst, problems) == (0.0, [])
        assert sliced == {name: f"(1, 4, 3, 2) -> (1, {len(heads)}, 3, 2)"}
    else:
        assert worst == float("inf") and len(problems) == 1 and problem in problems[0] and sliced == {}


def test_a_kept_head_that_moved_fails_and_other_outputs_need_their_shape() -> None:
    name, a = _cache()
    b = a[:, [0, 1, 3]].clone()
    b[0, 2, 0, 0] += 1e-2
    assert compare_outputs([(name, a)], [(name, b)], 1e-4)[1] == [
        f"{name} holds 3 of 4 slices of dimension 1 (heads) and its slice 2 is none of the masked model's after "
        f"slice 1"
    ]
    plain = "output.hidden"  # not a cache: fewer heads is another shape
    assert compare_outputs([(plain, a)], [(plain, a[:, [0, 1]])], 1e-4)[1] == [
        "output.hidden is (1, 2, 3, 2):torch.float32, expected (1, 4, 3, 2):torch.float32"
    ]
    assert compare_outputs([(name, a)], [(name, a[:1, :, :2])], 1e-4)[1] == [  # positions: no slicing
        f"{name} is (1, 4, 2, 2):torch.float32, expected (1, 4, 3, 2):torch.float32"
    ]


def test_the_sliced_note_names_two_and_counts_the_rest() -> None:
    assert sliced_note(Verdict(True, 0.0, ())) is None
    verdict = Verdict(True, 0.0, (), (("a.keys", "(1, 4) -> (1, 3)"),))
    assert sliced_note(verdict) == (
        "KV cache: 1 cache tensor(s) hold only the kept attention heads (a.keys (1, 4) -> (1, 3)); each kept head "
        "was compared with the masked model's, in order"
    )


def test_an_encoder_decoder_cache_is_flattened_self_then_cross() -> None:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        vocab_size=50,
        max_position_embeddings=32,
    )
    model = transformers.BartForConditionalGeneration(config).eval()
    ids = torch.arange(10).reshape(2, 5) + 3
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids)
    cache = [n for n, _ in flatten_values(out) if isinstance(n, CachePath)]
    assert cache == [
        f"{_cache_field(out)}.{side}.layers[0].{kind}"
        for side in ("self_attention_cache", "cross_attention_cache")
        for kind in ("keys", "values")
    ]
    assert unchecked_outputs(out) == []


def test_a_cache_of_unknown_layout_is_still_said_to_be_unchecked() -> None:
    class OddCache(transformers.cache_utils.Cache):
        def __init__(self) -> None:  # no layers: nothing this code knows how to read
            pass

    out = {"logits": torch.zeros(1), "past": OddCache()}
    assert unchecked_outputs(out) == ["output.past (OddCache)"]
    assert [n for n, _ in flatten_values(out)] == ["output.logits"]


def test_padded_pads_the_first_runs_all_ones_attention_mask_only() -> None:
    ones = torch.ones(2, 4, dtype=torch.long)
    runs = [ExampleInputs(kwargs={"input_ids": ones, "attention_mask": ones}), ExampleInputs(args=(ones,))]
    first, second = padded(runs)
    assert first.kwargs["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(first.kwargs["input_ids"], ones) and second is runs[1]
    assert ones.tolist() == [[1] * 4] * 2  # the example's own mask is left alone
    for mask in (ones.float(), torch.tensor([[1, 0]]), torch.ones(4, dtype=torch.long)):
        untouched = [ExampleInputs(kwargs={"attention_mask": mask})]
        assert padded(untouched) == untouched


class _Branchy(nn.Module):
    """Takes one side of a branch on the example (all ones) and the other on random inputs."""

    def __init__(self, condition: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.condition = condition
        with torch.no_grad():
            self.out.weight[:, 1] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if (x == 1).all() if self.condition == "ones" else x.sum() > 1e6:
            y = -y
        return self.out(torch.relu(y))


def test_a_branch_whose_both_sides_were_verified_is_not_warned_of() -> None:
    _, both = compactor.compact(_Branchy("ones"), torch.ones(2, 4))
    assert both.extra["paths"]["value_branches"] == [] and both.warnings == ()
    _, one = compactor.compact(_Branchy("large"), torch.ones(2, 4))
    line = next(i for i, t in enumerate(Path(__file__).read_text().splitlines(), 1) if "x.sum() > 1e6" in t)
    assert one.extra["paths"]["value_branches"] == [f"{shown_path(__file__)}:{line} (bool)"]
    assert len(one.warnings) == 1 and "--strict refuses this" in one.warnings[0]


def test_shown_paths_name_no_directory_of_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.masking_utils as masking

    assert shown_path(masking.__file__) == os.path.join("transformers", "masking_utils.py")
    assert shown_path(torch.__file__) == os.path.join("torch", "__init__.py")
    monkeypatch.chdir(tmp_path)
    shown_path.cache_clear()
    (tmp_path / "models").mkdir()
    assert shown_path(str(tmp_path / "models" / "net.py")) == os.path.join("models", "net.py")
    elsewhere = str(Path(sys.prefix).parent / "not_installed" / "net.py")
    assert shown_path(elsewhere) == elsewhere
    shown_path.cache_clear()
