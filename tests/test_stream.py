"""Hugging Face checkpoints compacted block by block (issue 23): every decoder architecture it names, from a
small config with uneven zeros per block, given to the real CLI as a sharded bf16 directory; the output
reloaded (in a fresh process for Llama) with logits equal to the pruned model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import compactor  # noqa: E402
from compactor.cli import main  # noqa: E402
from compactor.io.checkpoint import Checkpoint  # noqa: E402
from compactor.stream import compact_checkpoint  # noqa: E402

COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
)  # fmt: skip
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q/k norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 8}),  # sliding layers, soft-capping
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 8}),  # two rotary tables
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),  # fused gate_up_proj
}
# neurons zeroed in block i: i::3 for i = 0, 1, 2 of 96: 32 each; widths 64 in every block
KEPT = 64


def _pruned(arch: str, *, uneven: bool = True, seed: int = 0, kv_group: bool = False) -> Any:
    config_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**COMMON, **extra)
    model = getattr(transformers, model_name)(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            mlp = block.mlp
            step = 3 if not uneven else 3 + i  # block i: 96 - ceil((96 - i) / (3 + i)) neurons kept
            if hasattr(mlp, "gate_up_proj"):
                mlp.down_proj.weight[:, i::step] = 0  # nothing reads them: the fused rows go too
            else:
                mlp.gate_proj.weight[i::step] = 0  # silu(0) * up = 0
        attention = model.model.layers[0].self_attn
        if kv_group and hasattr(attention, "v_proj"):  # block 0: key/value head 1 outputs zero (or its bias)
            attention.v_proj.weight[16:32] = 0
            if attention.v_proj.bias is not None:
                attention.v_proj.bias[16:32] = 0.25  # every query of the group reads this constant
    return model


def _widths(uneven: bool) -> list[int]:
    return [96 - len(range(i, 96, 3 + i if uneven else 3)) for i in range(3)]


def _save(model: Any, folder: Path, shard: str = "60KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_streams_and_reloads_with_its_logits(arch: str, tmp_path: Path) -> None:
    """Uneven FFN widths in every block, and in block 0 a whole key/value group (its value rows zero: the
    group's 2 query heads output zero, or Qwen2's value bias, folded into o_proj's new bias) but Phi-3's,
    whose fused qkv_proj is split by the config's head counts."""
    model = _pruned(arch, kv_group=True)
    src = _save(model, tmp_path / "src")
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded, with an index
    out = tmp_path / "out"
    report = compact_checkpoint(src, out)
    widths = _widths(True)
    assert [b.widths["mlp.down_proj"][1] for b in report.blocks] == widths
    small = compactor.load(out)
    for i, block in enumerate(small.model.layers):
        assert block.mlp.down_proj.in_features == widths[i]
        assert next(small.parameters()).dtype == torch.bfloat16
    grouped = arch != "phi3"
    attention = [b.self_attn for b in small.model.layers]
    if grouped:
        assert [a.k_proj.out_features for a in attention] == [16, 32, 32]
        assert [a.q_proj.out_features for a in attention] == [32, 64, 64]
        assert [a.o_proj.in_features for a in attention] == [32, 64, 64]
        assert (attention[0].o_proj.bias is not None) == (arch == "qwen2")
    assert (out / "compactor_manifest.json").is_file()  # uneven: the manifest states them
    expected, got = _logits(model, IDS), _logits(small, IDS)
    scale = float(expected.float().abs().max())
    assert float((expected.float() - got.float()).abs().max()) <= 4 * 2**-7 * max(1.0, scale)
    dense = sum(p.numel() for p in model.parameters())
    gone = sum(96 - w for w in widths) * 3 * 64 + (32 * 64 + 16 * 64 * 2 + 64 * 32 if grouped else 0)
    assert sum(p.numel() for p in small.parameters()) == dense - gone
    assert report.params == {"before": dense, "after": dense - gone}


def test_the_cli_streams_a_directory_and_a_fresh_process_loads_it(tmp_path: Path, capsys: Any) -> None:
    model = _pruned("llama")
    src = _save(model, tmp_path / "src")
    out = tmp_path / "out"
    assert (
        main(
            [
                str(src),
                "-o",
                str(out) + "/",
                "--max-shard-size",
                "100KB",
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    assert "3/3 blocks" in printed.err and "model.layers.2" in printed.out
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert all(os.path.getsize(out / s) <= 100_000 + 64 * 1024 for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(Checkpoint.open(out).stored)
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) < sum(
        p.stat().st_size for p in src.glob("*.safetensors")
    )
    assert json.loads((tmp_path / "r.json").read_text())["params"]["after"] < sum(
        p.numel() for p in model.parameters()
    )
    torch.save(_logits(model, IDS), tmp_path / "expected.pt")
    torch.save(IDS, tmp_path / "ids.pt")
    script = (
        "import sys, torch, compactor\n"
        "m = compactor.load(sys.argv[1])\n"
        "ids, want = torch.load(sys.argv[2]), torch.load(sys.argv[3])\n"
        "got = m(input_ids=ids).logits\n"
        "widths = [b.mlp.gate_proj.out_features for b in m.model.layers]\n"
        "print(widths, float((got.float() - want.float()).abs().max()), float(want.float().abs().max()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    widths, error, scale = done.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert json.loads(widths) == _widths(True)
    assert float(error) <= 4 * 2**-7 * max(1.0, float(scale))


def test_uniform_pads_to_the_widest_block_and_stock_from_pretrained_loads_it(
    tmp_path: Path, capsys: Any
) -> None:
    model = _pruned("qwen2")
    src = _save(model, tmp_path / "src")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([str(src), "-o", str(out), "--uniform", "-q"]) == 0, capsys.readouterr().err
    assert not (out / "compactor_manifest.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == max(_widths(True))
    small = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert [b.mlp.up_proj.out_features for b in small.model.layers] == [max(_widths(True))] * 3
    expected, got = _logits(model, IDS), _logits(small.to(torch.bfloat16), IDS)
    scale = float(expected.float().abs().max())
    assert float((expected.float() - got.float()).abs().max()) <= 4 * 2**-7 * max(1.0, scale)


def test_even_widths_load_with_stock_from_pretrained_without_uniform(tmp_path: Path) -> None:
    model = _pruned("llama", uneven=False)
    out = tmp_path / "out"
    report = compact_checkpoint(_save(model, tmp_path / "src"), out)
    assert "intermediate_size=64" in report.layout and not (out / "compactor_manifest.json").exists()
    small = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert small.config.intermediate_size == KEPT


def test_prune_keys_and_pytorch_bin_shards_are_read(tmp_path: Path) -> None:
    """``weight_orig`` + ``weight_mask`` pairs baked as they are read; ``pytorch_model*.bin`` shards read
    ``weights_only``; tied embeddings."""
    model = _pruned("llama", uneven=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w = state.pop("model.layers.1.mlp.up_proj.weight")
    mask = torch.ones_like(w)
    mask[5:20] = 0  # block 1 loses neurons 5..19 besides its zeroed gate rows
    state["model.layers.1.mlp.up_proj.weight_orig"] = w + (1 - mask)  # nonzero where masked: the mask counts
    state["model.layers.1.mlp.up_proj.weight_mask"] = mask
    src = tmp_path / "src"
    src.mkdir()
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(src)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[:half],
        "pytorch_model-00002-of-00002.bin": keys[half:],
    }
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, src / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    report = compact_checkpoint(src, tmp_path / "out")
    gone = len({j for j in range(5, 20)} - set(range(1, 96, 3)))
    assert [b.widths["mlp.down_proj"][1] for b in report.blocks] == [KEPT, KEPT - gone, KEPT]
    small = compactor.load(tmp_path / "out")
    assert small.model.layers[1].mlp.up_proj.out_features == KEPT - gone


def _error(capsys: Any, argv: list[str]) -> str:
    capsys.readouterr()  # what saving the checkpoint printed
    assert main(argv) == 2
    err: str = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def _corrupt(src: Path, how: str) -> None:
    index = src / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    first = sorted(set(spec["weight_map"].values()))[0]
    if how == "missing shard":
        (src / first).unlink()
    elif how == "index names a file not there":
        spec["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
        index.write_text(json.dumps(spec))
    elif how == "truncated shard":
        data = (src / first).read_bytes()
        (src / first).write_bytes(data[: len(data) - 100])
    elif how == "shape disagrees with config":
        config = json.loads((src / "config.json").read_text())
        config["intermediate_size"] = 80
        (src / "config.json").write_text(json.dumps(config))
    elif how == "no config.json":
        (src / "config.json").unlink()
    elif how == "auto_map":
        config = json.loads((src / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
        (src / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("missing shard", "a missing shard"),
        ("index names a file not there", "which is not in"),
        ("truncated shard", "a truncated copy"),
        ("shape disagrees with config", "config.json builds"),
        ("no config.json", "config.json"),
        ("auto_map", "auto_map"),
    ],
)
def test_bad_checkpoints_get_one_line_and_nothing_is_written(
    how: str, said: str, tmp_path: Path, capsys: Any
) -> None:
    src = _save(_pruned("llama"), tmp_path / "src")
    _corrupt(src, how)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    err = _error(capsys, [str(src), "-o", str(tmp_path / "out")])
    assert said in err, err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name != "src"] == []
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_an_output_directory_that_is_not_empty_is_refused(tmp_path: Path, capsys: Any) -> None:
    src = _save(_pruned("llama"), tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _error(capsys, [str(src), "-o", str(out)])
    assert "not an empty directory" in err and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_mixture_of_experts_checkpoint_is_refused_in_one_line(tmp_path: Path, capsys: Any) -> None:
    config = transformers.Qwen3MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    )
    model = transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    src = _save(model, tmp_path / "src", "1MB")
    err = _error(capsys, [str(src), "-o", str(tmp_path / "out")])
    assert "Mixture-of-Experts" in err and not (tmp_path / "out").exists()


def test_a_model_that_changes_hidden_states_between_blocks_is_refused(tmp_path: Path) -> None:
    """The recorders hand each block's input on unchanged; a forward that scales the hidden states between
    blocks gives a block another tensor than the one before returned, and is refused in one line. A
    transformers decoder passes them straight on: captured, the first block's input and every block's call."""
    from compactor.errors import ModelStructureError
    from compactor.io.hf import build_skeleton
    from compactor.stream.capture import capture

    scales = _Scales()
    with pytest.raises(ModelStructureError, match="changes them between blocks"):
        capture(scales, scales.layers, {"x": torch.randn(2, 4)})
    model = build_skeleton(_save(_pruned("llama"), tmp_path / "src"))
    model.model.embed_tokens.weight = torch.nn.Parameter(torch.zeros(256, 64, dtype=torch.bfloat16))
    hidden, found = capture(model, model.model.layers, {"input_ids": IDS})
    assert hidden.shape == (2, 24, 64) and len(found) == 3


class _Scales(torch.nn.Module):
    """Doubles the hidden states between its blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) * 2
        return x


def test_a_whole_decoder_loses_kv_groups_and_its_cache_is_compared_head_by_head() -> None:
    """Not streamed: the whole model, with 2 of the 4 key/value groups of block 0 zeroed (each with its 4
    query heads). The 16-bit model is judged in float64 against its head-compacted self, and the masked
    model's KV cache (4 heads) is compared with the compacted one (2) head by head."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=4,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    hd, group = 8, 4
    with torch.no_grad():
        attention = model.model.layers[0].self_attn
        for k in (1, 3):
            attention.v_proj.weight[k * hd : (k + 1) * hd] = 0
            attention.o_proj.weight[:, k * group * hd : (k + 1) * group * hd] = 0
        model.model.layers[1].mlp.gate_proj.weight[::2] = 0
    small, report = compactor.compact(model, {"input_ids": IDS})
    a = small.model.layers[0].self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.o_proj.in_features) == (64, 16, 64)
    assert small.model.layers[1].mlp.down_proj.in_features == 48  # channel groups after the heads still go
    expected, got = _logits(model, IDS), _logits(small, IDS)
    assert float((expected.float() - got.float()).abs().max()) <= 4 * 2**-7 * max(
        1.0, float(expected.float().abs().max())
    )
    assert report.extra["heads"][0]["heads_after"] == 2


def test_a_block_with_dropout_is_compacted_and_carried_in_eval_mode(tmp_path: Path) -> None:
    """GPT-2's blocks (``transformer.h``, dropout 0.1 in its config, position embeddings added before the
    first block): nothing zeroed, so the stream must come back as it went in. A compacted block left in
    train mode would drop activations and the final logits check would refuse it."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    assert config.resid_pdrop > 0
    model = transformers.GPT2LMHeadModel(config).to(torch.bfloat16).eval()
    report = compact_checkpoint(_save(model, tmp_path / "src"), tmp_path / "out")
    assert report.logits_error == 0.0 and report.params["after"] == report.params["before"]
    small = compactor.load(tmp_path / "out")
    assert torch.equal(_logits(model, IDS), _logits(small, IDS))


def _ignored_query_heads(arch: str, cuts: tuple[tuple[int, ...], ...]) -> Any:
    """8 query heads over 2 key/value heads (head_dim 8); block i's o_proj ignores the query heads cuts[i]
    (() : none; "kv": block's key/value head 1 outputs zero instead)."""
    config_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        **{**COMMON, "num_attention_heads": 8, "head_dim": 8, "num_hidden_layers": len(cuts)}, **extra
    )
    model = getattr(transformers, model_name)(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for block, heads in zip(model.model.layers, cuts):
            attention = block.self_attn
            if heads == ("kv",):
                attention.v_proj.weight[8:16] = 0
                if attention.v_proj.bias is not None:
                    attention.v_proj.bias[8:16] = 0
                continue
            for h in heads:
                attention.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
    return model


def _close(model: Any, small: Any) -> None:
    expected, got = _logits(model, IDS), _logits(small.to(torch.bfloat16), IDS)
    scale = float(expected.float().abs().max())
    assert float((expected.float() - got.float()).abs().max()) <= 4 * 2**-7 * max(1.0, scale)


def test_query_heads_within_groups_stream_reload_and_uniform_places_them(tmp_path: Path) -> None:
    """Block 0 loses one query head from each group (group 0 had two ignored), block 1 two, block 2 a whole
    key/value group; compactor.load restores num_key_value_groups per block, and --uniform pads every block
    to 4 query heads per group with each group's heads in its own slot, loaded by stock from_pretrained."""
    model = _ignored_query_heads("qwen2", ((1, 2, 5), (0, 1, 6, 7), ("kv",)))
    src = _save(model, tmp_path / "src")
    report = compact_checkpoint(src, tmp_path / "out")
    small = compactor.load(tmp_path / "out")
    shapes = [
        (b.self_attn.q_proj.out_features, b.self_attn.k_proj.out_features, b.self_attn.num_key_value_groups)
        for b in small.model.layers
    ]
    assert shapes == [(48, 16, 3), (32, 16, 2), (32, 8, 4)]
    assert "query heads [1, 5] removed" in report.blocks[0].heads[0]
    assert "model.layers.0.self_attn.o_proj ignores them" in report.blocks[0].heads[0]
    assert report.logits_floor is not None and report.logits_floor > 0  # bf16: the dense model's own rounding
    _close(model, small)
    compact_checkpoint(src, tmp_path / "uniform", uniform=True)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "uniform")
    assert {b.self_attn.q_proj.out_features for b in stock.model.layers} == {64}
    _close(model, stock)


@pytest.mark.parametrize(("arch", "stated"), [("qwen3", True), ("llama", False)])
def test_even_query_heads_are_stated_where_the_config_class_accepts_them(
    arch: str, stated: bool, tmp_path: Path
) -> None:
    """Every block keeps 3 of 4 query heads per group: num_attention_heads=6. Qwen3Config accepts it;
    LlamaConfig refuses 6 heads for hidden size 64, so the manifest states them and the report says why."""
    model = _ignored_query_heads(arch, ((1, 5), (1, 5), (1, 5)))
    report = compact_checkpoint(_save(model, tmp_path / "src"), tmp_path / "out")
    if stated:
        assert "num_attention_heads=6" in report.layout
        small = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert (
            small.config.num_attention_heads == 6
            and small.model.layers[0].self_attn.num_key_value_groups == 3
        )
    else:
        assert (
            "LlamaConfig refuses num_attention_heads=6: The hidden size (64) is not a multiple"
            in report.layout
        )
        small = compactor.load(tmp_path / "out")
        assert [b.self_attn.num_key_value_groups for b in small.model.layers] == [3, 3, 3]
    _close(model, small)


def test_compactor_compact_takes_a_checkpoint_directory(tmp_path: Path) -> None:
    """``compactor.compact("DIR")`` streams it (a temporary output, loaded back and removed) or writes
    ``output=``; the report is the streamed one."""
    model = _pruned("llama")
    src = _save(model, tmp_path / "src")
    small, report = compactor.compact(str(src))
    assert isinstance(report, compactor.StreamReport)
    assert [b.mlp.down_proj.in_features for b in small.model.layers] == _widths(True)
    _close(model, small)
    again, _ = compactor.compact(src, output=tmp_path / "out", uniform=True)
    assert (tmp_path / "out" / "config.json").is_file()
    assert [b.mlp.down_proj.in_features for b in again.model.layers] == [max(_widths(True))] * 3
    _close(model, again)


class _ReadsChildWeight(torch.nn.Module):
    """A block whose forward reads a child's weight without calling the child."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.proj.weight) + x


def test_the_float32_reference_stream_casts_one_module_at_a_time() -> None:
    """The dense block in float32, each module's tensors cast for its own forward only, equals a float32
    twin of the block; a forward that reads a weight outside its module's call gets the twin itself. The
    block keeps its bf16 tensors either way."""
    from compactor.modules import wide_clone
    from compactor.stream.capture import Block, capture, hidden_of
    from compactor.stream.driver import _wide_step

    model = _pruned("llama")
    hidden, calls = capture(model, model.model.layers, {"input_ids": IDS})
    block = model.model.layers[1]
    with torch.no_grad():
        twin = hidden_of(Block(wide_clone(block, torch.float32), calls[1]).eval()(hidden.float()))
    assert torch.equal(_wide_step(block, calls[1], hidden.float()), twin)
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    odd = _ReadsChildWeight().to(torch.bfloat16)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = hidden_of(Block(wide_clone(odd, torch.float32), _call()).eval()(x))
    assert torch.equal(_wide_step(odd, _call(), x), expected)
    assert odd.proj.weight.dtype == torch.bfloat16


def _call() -> Any:
    from compactor.stream.capture import BlockCall

    return BlockCall((), {})


def test_uniform_padding_that_would_misplace_fused_halves_is_refused(tmp_path: Path, capsys: Any) -> None:
    """Phi-3's gate_up_proj is split in halves by its forward: zero rows padded at its end would move up rows
    into the gate half. Under bf16's tolerance a small model's block hid that (stock from_pretrained then gave
    logits 0.14 off); the padded block is also checked in float32 against the unpadded one, and refused."""
    src = _save(_pruned("phi3"), tmp_path / "src")
    capsys.readouterr()
    assert main([str(src), "-o", str(tmp_path / "out"), "--uniform", "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "padded with zero channels changes its output" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_directory_compactor_wrote_with_uneven_widths_is_refused_as_input(
    tmp_path: Path, capsys: Any
) -> None:
    """Its config.json builds the dense shapes, not the ones stored: one line naming the manifest, nothing
    written; the report of the first run names the uneven head count."""
    model = _ignored_query_heads("llama", ((1, 2, 5), (0, 1, 6, 7), ("kv",)))
    report = compact_checkpoint(_save(model, tmp_path / "src"), tmp_path / "out")
    assert "num_attention_heads differs across layers (4, 6)" in report.layout  # 6, 4, and 1 group of 4
    capsys.readouterr()
    assert main([str(tmp_path / "out"), "-o", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds compactor_manifest.json" in err[0]
    assert not (tmp_path / "again").exists()
