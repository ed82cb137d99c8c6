"""Twenty-one transformers text (and text+vision) architectures, zeroed by hand, compacted through the CLI:
``python -m benchmarks.text_sweep``.

Each case builds a small model (hidden 64, 2 layers, 4 query heads of 16, 2 key/value heads where the
architecture groups its queries, FFN 128, vocabulary 128) with random, trained-looking weights (non-zero
biases, norm scales near 1), then zeroes, the way a structured pruner leaves a model:

* FFN neurons, unevenly per layer (20% in the first FFN of each stack, 40% in the second, ...): the neuron's
  rows in every input projection (gate/up, fc1, intermediate, ``c_fc``, ``wi``) with their bias entries, and
  its column in the down projection. Fused experts (Qwen3-MoE, Mixtral: ``mlp.experts.gate_up_proj`` of
  ``(experts, 2 * width, hidden)``, gate rows then up rows, and ``down_proj`` of ``(experts, hidden, width)``)
  lose a different number of neurons in each expert.
* One attention head per attention module (one whole key/value group with its query heads under
  grouped-query attention): its q/k/v rows and bias entries and its output-projection columns, found in the
  fused layouts as each model's source slices them (Phi-3 ``qkv_proj`` and GPT-2 ``c_attn``: all queries, then
  keys, then values; GPT-NeoX and Falcon-RW ``query_key_value``: ``[head, (q, k, v), head_dim]``; Falcon-40B's
  new decoder architecture: ``[kv group, (its queries..., k, v), head_dim]``).

Before compacting, the sweep proves its own zeroing: with the dead heads' output-projection columns and the
dead neurons' down-projection columns set to random values the model's outputs do not change. Then it saves
the model (``torch.save``) and its example inputs (batch 2, sequence 8, the second row padded) and runs the
real CLI, ``compact model.pt -o small.pt --example-inputs inputs.pt --report report.json``, and for the decoder
LLMs also ``-o small_dir/`` (a Hugging Face directory, reloaded with ``compactor.load``). It checks the
outputs itself (``torch.load(weights_only=False)``; the example and a fresh batch of sequence length 13;
``max|delta| <= 1e-4 * max(1, max|reference|)``; the key/value cache left out: its head count is what
changes), counts the neurons and heads that are gone from the compacted parameter shapes, and collects
every warning line the CLI printed.

Each case runs in its own process (``--one CASE``) under a time and resident-memory limit::

    python -m benchmarks.text_sweep                        # all -> benchmarks/TEXT_SWEEP.md + text_sweep.json
    python -m benchmarks.text_sweep --cases llama,gpt2     # a few
    python -m benchmarks.text_sweep --one llama            # one case in this process, JSON on stdout

transformers needs an importable torchvision for its image utilities: where the installed one does not
import, put a working one first on ``PYTHONPATH`` (``PYTHONPATH=/work/shared/torchvision_cpu`` here).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .vision_sweep import _last_stack, _rss_of, _stop, leaves, like_trained

ROOT = Path(__file__).resolve().parent
TOLERANCE = 1e-4  # max|delta| <= TOLERANCE * max(1, max|reference|), compactor's default
TIMEOUT = 400.0  # seconds per case, both CLI runs included
CLI_TIMEOUT = 240.0  # seconds per CLI run
MEMORY = 4 << 30  # resident bytes of the case's own process

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, POSITIONS = 64, 2, 4, 2, 16, 128, 128, 64
BATCH, SEQ, FRESH_SEQ, PADDED = 2, 8, 13, 2  # PADDED: trailing padding of the example's second row
IMAGE, PATCH = 32, 8
PAD, BOS, EOS = 0, 1, 2
FRACTIONS = (0.2, 0.4)  # of each FFN's neurons, by its index within its stack, cycled
EXPERT_STEP = 0.05  # expert e of a layer loses FRACTIONS[layer] + e * EXPERT_STEP of its neurons
CACHE = re.compile(r"\.(cache|past_key_values)\b")  # an output's key/value cache, by its leaf names
WARNING = re.compile(r"warn|not compared|not called|conversion|not proven|unverified", re.IGNORECASE)


# --- what to zero -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attention:
    """Attention modules (``pattern``, a regex over module paths) and their projections, by path below them.

    ``layout``: ``separate`` q/k/v projections; ``blocks``, one fused projection of all queries, then all
    keys, then all values; ``per_head``, one fused projection of ``[head, (q, k, v), head_dim]``;
    ``per_group``, ``[kv group, (its queries..., k, v), head_dim]``."""

    pattern: str
    q: str
    k: str
    v: str
    o: str
    layout: str = "separate"
    kv_heads: int = HEADS


@dataclass(frozen=True)
class Ffn:
    """FFN modules and their projections: ``ins`` read the hidden state (a neuron is a row of each), ``out``
    writes it back (a neuron is a column). ``layout``: ``separate``; ``gate_up``, one projection of the gate
    rows then the up rows (Phi-3); ``experts``, the fused 3-D parameters ``ins[0]`` of ``(experts, 2 * width,
    hidden)`` and ``out`` of ``(experts, hidden, width)``."""

    pattern: str
    ins: tuple[str, ...]
    out: str
    layout: str = "separate"


@dataclass(frozen=True)
class Arch:
    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    kwargs: dict[str, Any]
    attention: tuple[Attention, ...]
    ffn: tuple[Ffn, ...]
    inputs: str = "text"  # text, seq2seq (T5: decoder_input_ids too), image, text+image
    decoder: bool = False  # a decoder LLM: also compacted to a Hugging Face directory


DECODER = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": FFN,
    "vocab_size": VOCAB,
    "max_position_embeddings": POSITIONS,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
}
GQA = {**DECODER, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}
ENCODER = {k: v for k, v in DECODER.items() if k != "bos_token_id"}
TOWER = {
    k: DECODER[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
}
TEXT_TOWER = {**TOWER, "vocab_size": VOCAB, "max_position_embeddings": POSITIONS, "pad_token_id": PAD}
TEXT_TOWER |= {"bos_token_id": BOS, "eos_token_id": EOS}
VISION_TOWER = {**TOWER, "image_size": IMAGE, "patch_size": PATCH}

LAYER = r"model\.layers\.\d+"
LLAMA_ATTENTION = Attention(rf"{LAYER}\.self_attn", "q_proj", "k_proj", "v_proj", "o_proj", kv_heads=KV_HEADS)
GATED = Ffn(rf"{LAYER}\.mlp", ("gate_proj", "up_proj"), "down_proj")
EXPERTS = Ffn(rf"{LAYER}\.mlp\.experts", ("gate_up_proj",), "down_proj", "experts")
NEOX_STYLE = ("query_key_value", "query_key_value", "query_key_value", "dense")
FALCON_LAYER = r"transformer\.h\.\d+"
FALCON_FFN = Ffn(rf"{FALCON_LAYER}\.mlp", ("dense_h_to_4h",), "dense_4h_to_h")
FALCON = {k: DECODER[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}
FALCON |= {"ffn_hidden_size": FFN, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
TOWERS = r"(text|vision)_model\.encoder\.layers\.\d+"
CLIP_ATTENTION = Attention(rf"{TOWERS}\.self_attn", "q_proj", "k_proj", "v_proj", "out_proj")
CLIP_FFN = Ffn(rf"{TOWERS}\.mlp", ("fc1",), "fc2")


def _bert_like(prefix: str) -> tuple[tuple[Attention, ...], tuple[Ffn, ...]]:
    layer = rf"{prefix}\.encoder\.layer\.\d+"
    q, k, v = (f"self.{n}" for n in ("query", "key", "value"))
    return (Attention(rf"{layer}\.attention", q, k, v, "output.dense"),), (
        Ffn(layer, ("intermediate.dense",), "output.dense"),
    )


ARCHS: tuple[Arch, ...] = (
    Arch("llama", "LlamaConfig", "LlamaForCausalLM", GQA, (LLAMA_ATTENTION,), (GATED,), decoder=True),
    Arch(
        "mistral",
        "MistralConfig",
        "MistralForCausalLM",
        {**GQA, "sliding_window": 6},
        (LLAMA_ATTENTION,),
        (GATED,),
        decoder=True,
    ),
    Arch("qwen2", "Qwen2Config", "Qwen2ForCausalLM", GQA, (LLAMA_ATTENTION,), (GATED,), decoder=True),
    Arch("qwen3", "Qwen3Config", "Qwen3ForCausalLM", GQA, (LLAMA_ATTENTION,), (GATED,), decoder=True),
    Arch(
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": FFN // 2},
        (LLAMA_ATTENTION,),
        (EXPERTS,),
        decoder=True,
    ),
    Arch(
        "mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
        (LLAMA_ATTENTION,),
        (EXPERTS,),
        decoder=True,
    ),
    Arch(
        "gemma3",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **GQA,
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": HEAD_DIM,
        },
        (LLAMA_ATTENTION,),
        (GATED,),
        decoder=True,
    ),
    Arch(
        "phi3",
        "Phi3Config",
        "Phi3ForCausalLM",
        {**DECODER, "num_key_value_heads": KV_HEADS},
        (Attention(rf"{LAYER}\.self_attn", *["qkv_proj"] * 3, "o_proj", "blocks", KV_HEADS),),
        (Ffn(rf"{LAYER}\.mlp", ("gate_up_proj",), "down_proj", "gate_up"),),
        decoder=True,
    ),
    Arch(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_inner": FFN,
            "n_positions": POSITIONS,
            "vocab_size": VOCAB,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
        },
        (Attention(r"transformer\.h\.\d+\.attn", *["c_attn"] * 3, "c_proj", "blocks"),),
        (Ffn(r"transformer\.h\.\d+\.mlp", ("c_fc",), "c_proj"),),
        decoder=True,
    ),
    Arch(
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        {**{k: v for k, v in DECODER.items() if k != "intermediate_size"}, "ffn_dim": FFN}
        | {"word_embed_proj_dim": HIDDEN},
        (Attention(r"model\.decoder\.layers\.\d+\.self_attn", "q_proj", "k_proj", "v_proj", "out_proj"),),
        (Ffn(r"model\.decoder\.layers\.\d+", ("fc1",), "fc2"),),
        decoder=True,
    ),
    Arch(  # Falcon-RW: ALiBi, biases, sequential attention and MLP, q/k/v interleaved per head
        "falcon",
        "FalconConfig",
        "FalconForCausalLM",
        {**FALCON, "alibi": True, "bias": True, "multi_query": False, "parallel_attn": False},
        (Attention(rf"{FALCON_LAYER}\.self_attention", *NEOX_STYLE, "per_head"),),
        (FALCON_FFN,),
        decoder=True,
    ),
    Arch(  # Falcon-40B/180B: rotary, grouped queries, per group its queries then its key and value
        "falcon_new_decoder",
        "FalconConfig",
        "FalconForCausalLM",
        {**FALCON, "new_decoder_architecture": True, "num_kv_heads": KV_HEADS},
        (Attention(rf"{FALCON_LAYER}\.self_attention", *NEOX_STYLE, "per_group", KV_HEADS),),
        (FALCON_FFN,),
        decoder=True,
    ),
    Arch(
        "gpt_neox",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        DECODER,
        (Attention(r"gpt_neox\.layers\.\d+\.attention", *NEOX_STYLE, "per_head"),),
        (Ffn(r"gpt_neox\.layers\.\d+\.mlp", ("dense_h_to_4h",), "dense_4h_to_h"),),
        decoder=True,
    ),
    Arch("bert", "BertConfig", "BertForMaskedLM", ENCODER, *_bert_like("bert")),
    Arch("roberta", "RobertaConfig", "RobertaForMaskedLM", ENCODER, *_bert_like("roberta")),
    Arch(
        "distilbert",
        "DistilBertConfig",
        "DistilBertForMaskedLM",
        {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": FFN, "vocab_size": VOCAB}
        | {"max_position_embeddings": POSITIONS, "pad_token_id": PAD},
        (Attention(r"distilbert\.transformer\.layer\.\d+\.attention", "q_lin", "k_lin", "v_lin", "out_lin"),),
        (Ffn(r"distilbert\.transformer\.layer\.\d+\.ffn", ("lin1",), "lin2"),),
    ),
    Arch(
        "t5",
        "T5Config",
        "T5ForConditionalGeneration",
        {"d_model": HIDDEN, "d_kv": HEAD_DIM, "num_heads": HEADS, "d_ff": FFN, "num_layers": LAYERS}
        | {"vocab_size": VOCAB, "pad_token_id": PAD, "eos_token_id": EOS, "decoder_start_token_id": PAD},
        (
            Attention(
                r"(en|de)coder\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)", "q", "k", "v", "o"
            ),
        ),
        (Ffn(r"(en|de)coder\.block\.\d+\.layer\.\d+\.DenseReluDense", ("wi",), "wo"),),
        inputs="seq2seq",
    ),
    Arch(
        "bart",
        "BartConfig",
        "BartForConditionalGeneration",
        {"d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS}
        | {"encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS}
        | {"encoder_ffn_dim": FFN, "decoder_ffn_dim": FFN, "vocab_size": VOCAB}
        | {"max_position_embeddings": POSITIONS, "pad_token_id": PAD, "bos_token_id": BOS}
        | {"eos_token_id": EOS, "decoder_start_token_id": EOS, "forced_eos_token_id": EOS},
        (
            Attention(
                r"model\.(en|de)coder\.layers\.\d+\.(self_attn|encoder_attn)",
                "q_proj",
                "k_proj",
                "v_proj",
                "out_proj",
            ),
        ),
        (Ffn(r"model\.(en|de)coder\.layers\.\d+", ("fc1",), "fc2"),),
    ),
    Arch(  # transformers 5 names ViT's projections like Llama's
        "vit",
        "ViTConfig",
        "ViTForImageClassification",
        VISION_TOWER,
        (Attention(r"vit\.layers\.\d+\.attention", "q_proj", "k_proj", "v_proj", "o_proj"),),
        (Ffn(r"vit\.layers\.\d+\.mlp", ("fc1",), "fc2"),),
        inputs="image",
    ),
    Arch(
        "clip",
        "CLIPConfig",
        "CLIPModel",
        {"text_config": TEXT_TOWER, "vision_config": VISION_TOWER, "projection_dim": 32},
        (CLIP_ATTENTION,),
        (CLIP_FFN,),
        inputs="text+image",
    ),
    Arch(  # the vision tower's attention-pooling head has an MLP too
        "siglip",
        "SiglipConfig",
        "SiglipModel",
        {"text_config": TEXT_TOWER, "vision_config": VISION_TOWER},
        (CLIP_ATTENTION,),
        (Ffn(r"(text|vision)_model\.(encoder\.layers\.\d+|head)\.mlp", ("fc1",), "fc2"),),
        inputs="text+image",
    ),
)
BY_NAME = {a.name: a for a in ARCHS}


def build(arch: Arch, seed: int = 0) -> nn.Module:
    """The small model, random weights of the initialiser's scale, then trained-looking biases and norms."""
    import transformers

    config = getattr(transformers, arch.config)(**arch.kwargs)
    torch.manual_seed(seed)
    model: nn.Module = getattr(transformers, arch.model)(config)
    like_trained(model)
    return model.eval()


# --- inputs -----------------------------------------------------------------------------------------------
def text_inputs(g: torch.Generator, seq: int, padded: int) -> dict[str, torch.Tensor]:
    """Random tokens ending in EOS; the second row's last ``padded`` positions are padding, masked out."""
    ids = torch.randint(EOS + 1, VOCAB, (BATCH, seq), generator=g)
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    ids[0, -1] = EOS
    if padded:
        mask[1, seq - padded :] = 0
        ids[1, seq - padded :] = PAD
    ids[1, seq - padded - 1] = EOS
    return {"input_ids": ids, "attention_mask": mask}


def inputs_for(arch: Arch, seed: int, seq: int, padded: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)}
    if arch.inputs == "image":
        return pixels
    text = text_inputs(g, seq, padded)
    if arch.inputs == "text+image":
        return text | pixels
    if arch.inputs == "seq2seq":
        decoder = torch.randint(EOS + 1, VOCAB, (BATCH, seq), generator=g)
        decoder[:, 0] = PAD  # T5's decoder_start_token_id
        text["decoder_input_ids"] = decoder
    return text


def example(arch: Arch) -> dict[str, torch.Tensor]:
    return inputs_for(arch, seed=0, seq=SEQ, padded=PADDED)


def fresh(arch: Arch) -> dict[str, torch.Tensor]:
    return inputs_for(arch, seed=7, seq=FRESH_SEQ, padded=0)


# --- zeroing ----------------------------------------------------------------------------------------------
def _is_conv1d(layer: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a Linear whose weight is stored transposed, ``(in, out)``."""
    return type(layer).__name__ == "Conv1D"


def in_features(layer: nn.Module) -> int:
    return int(layer.weight.shape[0 if _is_conv1d(layer) else 1])


def out_features(layer: nn.Module) -> int:
    return int(layer.weight.shape[1 if _is_conv1d(layer) else 0])


def zero_rows(layer: nn.Module, rows: list[int]) -> None:
    """Zero output features ``rows`` of a Linear (or Conv1D): their weights and bias entries."""
    with torch.no_grad():
        if _is_conv1d(layer):
            layer.weight[:, rows] = 0
        else:
            layer.weight[rows] = 0
        if getattr(layer, "bias", None) is not None:
            layer.bias[rows] = 0


def set_columns(layer: nn.Module, cols: list[int], value: torch.Tensor | float = 0.0) -> None:
    """Set input features ``cols`` of a Linear (or Conv1D) to ``value`` (zero, or a perturbation)."""
    with torch.no_grad():
        if _is_conv1d(layer):
            layer.weight[cols, :] = value
        else:
            layer.weight[:, cols] = value


def _span(start: int) -> list[int]:
    return list(range(start, start + HEAD_DIM))


def head_rows(att: Attention, kind: str, head: int, heads: int) -> list[int]:
    """The output rows of query head ``head`` (``kind`` q) or key/value head ``head`` (k, v) in their
    projection, as the model's forward slices them."""
    d, kv = HEAD_DIM, att.kv_heads
    group = heads // kv
    if att.layout == "separate":
        return _span(head * d)
    if att.layout == "blocks":  # Phi-3 qkv_proj, GPT-2 c_attn: split into queries, keys, values
        return _span({"q": 0, "k": heads * d, "v": (heads + kv) * d}[kind] + head * d)
    if att.layout == "per_head":  # GPT-NeoX, Falcon-RW: view(..., heads, 3 * head_dim), chunk(3)
        return _span(head * 3 * d + "qkv".index(kind) * d)
    if att.layout == "per_group":  # Falcon new decoder: view(..., kv, group + 2, head_dim)
        if kind == "q":
            g, j = divmod(head, group)
            return _span((g * (group + 2) + j) * d)
        return _span((head * (group + 2) + group + (kind == "v")) * d)
    raise ValueError(att.layout)


@dataclass
class HeadUnit:
    path: str
    att: Attention
    heads: int  # query heads
    query_heads: list[int] = field(default_factory=list)  # zeroed
    kv_heads: list[int] = field(default_factory=list)  # zeroed

    def layer(self, model: nn.Module, part: str) -> nn.Module:
        return model.get_submodule(f"{self.path}.{getattr(self.att, part)}")


@dataclass
class FfnUnit:
    path: str
    ffn: Ffn
    width: int
    neurons: list[list[int]] = field(default_factory=list)  # zeroed, per expert (one list unless experts)

    @property
    def zeroed(self) -> int:
        return sum(len(n) for n in self.neurons)


def matches(model: nn.Module, pattern: str) -> Iterator[str]:
    for name, _ in model.named_modules():
        if re.fullmatch(pattern, name):
            yield name


def zero_head_group(model: nn.Module, unit: HeadUnit, group: int) -> None:
    """Zero key/value head ``group`` and its query heads: q/k/v rows (and biases), output columns."""
    per_group = unit.heads // unit.att.kv_heads
    unit.query_heads = list(range(group * per_group, (group + 1) * per_group))
    unit.kv_heads = [group]
    q, o = unit.layer(model, "q"), unit.layer(model, "o")
    for head in unit.query_heads:
        zero_rows(q, head_rows(unit.att, "q", head, unit.heads))
        set_columns(o, _span(head * HEAD_DIM))
    for kind in "kv":
        zero_rows(unit.layer(model, kind), head_rows(unit.att, kind, group, unit.heads))


def zero_heads(model: nn.Module, arch: Arch) -> list[HeadUnit]:
    units: list[HeadUnit] = []
    for att in arch.attention:
        for path in matches(model, att.pattern):
            unit = HeadUnit(path, att, in_features(model.get_submodule(f"{path}.{att.o}")) // HEAD_DIM)
            zero_head_group(model, unit, (len(units) + 1) % att.kv_heads)
            units.append(unit)
    return units


def _pick(g: torch.Generator, width: int, fraction: float) -> list[int]:
    return sorted(torch.randperm(width, generator=g)[: round(width * fraction)].tolist())


def zero_ffn_unit(model: nn.Module, unit: FfnUnit, fraction: float, g: torch.Generator) -> None:
    module, ffn = model.get_submodule(unit.path), unit.ffn
    if ffn.layout == "experts":
        gate_up, down = getattr(module, ffn.ins[0]), getattr(module, ffn.out)
        with torch.no_grad():
            for e in range(down.shape[0]):
                idx = _pick(g, unit.width, fraction + EXPERT_STEP * e)
                gate_up[e, idx] = 0
                gate_up[e, [unit.width + i for i in idx]] = 0
                down[e, :, idx] = 0
                unit.neurons.append(idx)
        return
    idx = _pick(g, unit.width, fraction)
    unit.neurons.append(idx)
    for name in ffn.ins:
        rows = idx + [unit.width + i for i in idx] if ffn.layout == "gate_up" else idx
        zero_rows(module.get_submodule(name), rows)
    set_columns(module.get_submodule(ffn.out), idx)


def ffn_width(module: nn.Module, ffn: Ffn) -> int:
    out = getattr(module, ffn.out) if ffn.layout == "experts" else module.get_submodule(ffn.out)
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) else in_features(out)


def zero_ffns(model: nn.Module, arch: Arch, seed: int = 3) -> list[FfnUnit]:
    """Zero each FFN's share of neurons; the share cycles through FRACTIONS within each stack (a tower,
    the encoder, the decoder), by the FFN's position in it."""
    g = torch.Generator().manual_seed(seed)
    units: list[FfnUnit] = []
    for ffn in arch.ffn:
        per_stack: dict[str, int] = {}
        for path in matches(model, ffn.pattern):
            stack = re.sub(r"\.\d+\..*|\.\d+$", "", path)
            position = per_stack[stack] = per_stack.get(stack, -1) + 1
            unit = FfnUnit(path, ffn, ffn_width(model.get_submodule(path), ffn))
            zero_ffn_unit(model, unit, FRACTIONS[position % len(FRACTIONS)], g)
            units.append(unit)
    return units


# --- checks -----------------------------------------------------------------------------------------------
def compared(output: Any) -> list[tuple[str, Any]]:
    """The output's leaves, less the key/value cache (whose head count is what compaction changes)."""
    return [(n, v) for n, v in leaves(output) if not CACHE.search(n)]


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[tuple[str, Any]]:
    with torch.no_grad():
        return compared(model(**inputs))


def compare(expected: list[tuple[str, Any]], got: list[tuple[str, Any]], tolerance: float) -> dict[str, Any]:
    """``max|delta| <= tolerance * max(1, max|reference|)`` on every float leaf, equality on the rest."""
    if [n for n, _ in expected] != [n for n, _ in got]:
        return {"ok": False, "max_abs_error": None, "problem": f"outputs {[n for n, _ in got]}"}
    worst, problems = 0.0, []
    for (name, a), (_, b) in zip(expected, got):
        problem, error = differ(a, b, tolerance)
        worst = max(worst, error)
        if problem:
            problems.append(f"{name}: {problem}")
    return {"ok": not problems, "max_abs_error": worst, "problem": "; ".join(problems[:2]) or None}


def differ(a: Any, b: Any, tolerance: float) -> tuple[str | None, float]:
    """What is wrong with ``b`` as a copy of ``a`` (None: nothing), and the max abs error of floats."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return (None if a == b else f"{b!r} instead of {a!r}"), 0.0
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{tuple(b.shape)}:{b.dtype} instead of {tuple(a.shape)}:{a.dtype}", float("inf")
    if not a.is_floating_point() or a.numel() == 0:
        return (None if torch.equal(a, b) else "integers differ"), 0.0
    error = float((a.double() - b.double()).abs().max())
    allowed = tolerance * max(1.0, float(a.double().abs().max()))
    return (None if error <= allowed else f"max abs error {error:.3g} > {allowed:.3g}"), error


def dead_check(
    model: nn.Module, heads: list[HeadUnit], ffns: list[FfnUnit], inputs: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The zeroed heads and neurons are dead: random values in the output-projection columns of the zeroed
    heads and the down-projection columns of the zeroed neurons leave every output as it was."""
    perturbed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(11)
    for h in heads:
        o = h.layer(perturbed, "o")
        cols = [c for head in h.query_heads for c in _span(head * HEAD_DIM)]
        rows = in_features(o) if _is_conv1d(o) else out_features(o)
        shape = (len(cols), rows) if _is_conv1d(o) else (rows, len(cols))
        set_columns(o, cols, torch.randn(shape, generator=g))
    for f in ffns:
        module = perturbed.get_submodule(f.path)
        if f.ffn.layout == "experts":
            down = getattr(module, f.ffn.out)
            with torch.no_grad():
                for e, idx in enumerate(f.neurons):
                    down[e, :, idx] = torch.randn(down.shape[1], len(idx), generator=g)
            continue
        out = module.get_submodule(f.ffn.out)
        shape = (
            (len(f.neurons[0]), out_features(out))
            if _is_conv1d(out)
            else (out_features(out), len(f.neurons[0]))
        )
        set_columns(out, f.neurons[0], torch.randn(shape, generator=g))
    return compare(run(model, inputs), run(perturbed, inputs), 1e-6)


def layout_check(model: nn.Module, heads: list[HeadUnit], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Whether the rows zeroed are the heads' own, as the forward slices them: the query, key and value
    states that reach transformers' attention function (sdpa, wrapped for one call) are exactly zero in the
    zeroed heads and nowhere else. Modules that do not call it (T5; eager) are listed as not observed."""
    from transformers.modeling_utils import AttentionInterface

    paths = {id(m): n for n, m in model.named_modules()}
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    original = AttentionInterface._global_mapping["sdpa"]

    def probe(
        module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any
    ) -> Any:
        seen.setdefault(paths.get(id(module), "?"), (q.detach(), k.detach(), v.detach()))
        return original(module, q, k, v, *a, **kw)

    AttentionInterface.register("sdpa", probe)
    try:
        run(model, inputs)
    finally:
        AttentionInterface.register("sdpa", original)
    problems, unseen = [], []
    for h in heads:
        states = next((v for p, v in seen.items() if p == h.path or p.startswith(h.path + ".")), None)
        if states is None:
            unseen.append(h.path)
            continue
        for kind, state, zeroed in zip("qkv", states, (h.query_heads, h.kv_heads, h.kv_heads)):
            dead = [bool((state[:, i] == 0).all()) for i in range(state.shape[1])]
            if dead != [i in zeroed for i in range(state.shape[1])]:
                problems.append(
                    f"{h.path} {kind}: zero heads {[i for i, d in enumerate(dead) if d]}, not {zeroed}"
                )
    return {"ok": not problems, "problems": problems[:4], "not_observed": unseen}


def heads_left(small: nn.Module, unit: HeadUnit) -> tuple[int | None, int | None]:
    """Query heads and key/value heads of the compacted attention module, from its projections' shapes."""
    try:
        query = in_features(unit.layer(small, "o")) // HEAD_DIM
        k = out_features(unit.layer(small, "k")) // HEAD_DIM
    except (AttributeError, IndexError):
        return None, None
    if unit.att.layout == "separate":
        return query, k
    return query, (k - query) // 2  # fused: queries + 2 x key/value heads


def neurons_left(small: nn.Module, unit: FfnUnit) -> list[int] | None:
    """Neurons per expert (one entry unless experts) of the compacted FFN, from its down projection."""
    try:
        module = small.get_submodule(unit.path)
        if unit.ffn.layout == "experts":
            down = getattr(module, unit.ffn.out)
            return [int(down.shape[-1])] * int(down.shape[0]) if down.dim() == 3 else None
        return [in_features(module.get_submodule(unit.ffn.out))]
    except (AttributeError, IndexError):
        return None


def removal(small: nn.Module, heads: list[HeadUnit], ffns: list[FfnUnit]) -> dict[str, Any]:
    """Per module: zeroed and removed (the dense count less the compacted one); totals."""
    rows_h, rows_f = [], []
    for h in heads:
        query, kv = heads_left(small, h)
        rows_h.append(
            {
                "module": h.path,
                "zeroed": len(h.query_heads),
                "removed": None if query is None else h.heads - query,
                "kv_zeroed": len(h.kv_heads),
                "kv_removed": None if kv is None else h.att.kv_heads - kv,
            }
        )
    for f in ffns:
        left = neurons_left(small, f)
        rows_f.append(
            {
                "module": f.path,
                "width": f.width,
                "zeroed": [len(n) for n in f.neurons],
                "removed": None if left is None else [f.width - n for n in left],
            }
        )
    return {"heads": rows_h, "ffn": rows_f, "totals": _totals(rows_h, rows_f)}


def _sum(values: list[Any]) -> int | None:
    return None if any(v is None for v in values) else sum(values)


def _totals(heads: list[dict[str, Any]], ffns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "heads_zeroed": sum(h["zeroed"] for h in heads),
        "heads_removed": _sum([h["removed"] for h in heads]),
        "kv_zeroed": sum(h["kv_zeroed"] for h in heads),
        "kv_removed": _sum([h["kv_removed"] for h in heads]),
        "ffn_zeroed": sum(sum(f["zeroed"]) for f in ffns),
        "ffn_removed": _sum([None if f["removed"] is None else sum(f["removed"]) for f in ffns]),
    }


# --- the CLI ----------------------------------------------------------------------------------------------
def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("compact")
    return [str(script)] if script.exists() else [shutil.which("compact") or "compact"]


def run_cli(model: Path, output: Path, inputs: Path, report: Path) -> dict[str, Any]:
    """``compact MODEL -o OUTPUT --example-inputs INPUTS --report REPORT``: exit status, seconds, what it said."""
    command = [*cli_command(), str(model), "-o", str(output), "--example-inputs", str(inputs)]
    command += ["--report", str(report)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=model.parent, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as e:
        return {
            "rc": None,
            "seconds": time.perf_counter() - start,
            "error": f"timeout after {e.timeout:.0f} s",
        }
    text = (done.stderr + "\n" + done.stdout).replace(f"{model.parent}/", "")
    lines = [line for line in text.splitlines() if line.strip()]
    result: dict[str, Any] = {
        "command": " ".join(["compact", *command[1:]]).replace(str(model.parent) + "/", ""),
        "rc": done.returncode,
        "seconds": time.perf_counter() - start,
        "warnings": _unique(line.strip() for line in lines if WARNING.search(line)),
        "notes": _unique(line.strip() for line in lines if line.startswith(("note:", "hint:"))),
        "stdout": done.stdout[-6000:],
        "stderr": done.stderr[-6000:],
    }
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
        result["error"] = (errors or done.stderr.strip().splitlines()[-1:] or ["(nothing on stderr)"])[0][
            :400
        ]
    if report.exists():
        result["report"] = digest(json.loads(report.read_text()))
    return result


def _unique(lines: Iterator[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def digest(report: dict[str, Any]) -> dict[str, Any]:
    """What the report says was kept, and why: kept rows per layer, heads per attention module, warnings."""
    filters = report.get("pruned_filters", {})
    kept = [
        f"{k['layer']}: {k['kept']} of {k['pruned']} kept, {k['fate']}: "
        + "; ".join(f"{r['reason']} (rows {_rows_text(r.get('rows', []))})" for r in k.get("reasons", []))
        for k in filters.get("kept_by_layer", [])
    ]
    heads = [
        f"{h['layer']}: heads {h['heads_before']} -> {h['heads_after']}"
        + (
            f", query heads per group {h['query_heads'][0]} -> {h['query_heads'][1]}"
            if h.get("query_heads")
            else ""
        )
        + f" ({h['reason']})"
        for h in report.get("heads", [])
    ]
    experts = [
        f"{e['layer']}: neurons per expert {e['width_before']} -> {e['width_after']}, live {list(e['live'])} "
        f"({e['reason']})"
        for e in report.get("experts", [])
    ]
    return {
        "params": report.get("params"),
        "experts": experts,
        "max_abs_error": report.get("max_abs_error"),
        "pruned_filters": {k: filters.get(k) for k in ("total", "removed", "kept", "kept_by_reason")},
        "fates": {k: v for k, v in report.get("channels", {}).get("fates", {}).items() if v},
        "kept": kept,
        "heads": heads,
        "warnings": report.get("warnings", []),
        "paths": {k: v for k, v in report.get("paths", {}).items() if v},
        "output": report.get("output"),
    }


def _rows_text(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:8])) + (f", ... ({len(rows)})" if len(rows) > 8 else "")


# --- one case, in this process ----------------------------------------------------------------------------
def prepared(arch: Arch) -> tuple[nn.Module, list[HeadUnit], list[FfnUnit]]:
    model = build(arch)
    heads = zero_heads(model, arch)
    ffns = zero_ffns(model, arch)
    return model, heads, ffns


def run_one(arch: Arch) -> dict[str, Any]:
    """Build, zero, save, compact with the CLI, check; a failure is recorded in the result, never raised."""
    result: dict[str, Any] = {"case": arch.name, "class": arch.model, "decoder": arch.decoder}
    result["compactor_digest"] = compactor_digest()
    try:
        model, heads, ffns = prepared(arch)
        inputs = {"example": example(arch), "fresh": fresh(arch)}
        result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        result["expected"] = removal(model, heads, ffns) | {"note": "dense shapes: removed = 0"}
        result["dead_check"] = dead_check(model, heads, ffns, inputs["example"])
        result["layout_check"] = layout_check(model, heads, inputs["example"])
        references = {k: run(model, v) for k, v in inputs.items()}
    except Exception as e:  # the sweep's own model did not build or run: not compactor's failure
        return result | {"status": "build failed", **_failure(e)}
    with tempfile.TemporaryDirectory(prefix="compactor-text-sweep-") as tmp:
        work = Path(tmp)
        torch.save(model, work / "model.pt")
        torch.save(inputs["example"], work / "inputs.pt")
        result["pt"] = check_output(work, "small.pt", inputs, references, heads, ffns)
        if arch.decoder:
            result["dir"] = check_output(work, "small_dir", inputs, references, heads, ffns)
    result["status"], result["note"] = verdict(result)
    return result


def check_output(
    work: Path,
    name: str,
    inputs: dict[str, dict[str, torch.Tensor]],
    references: dict[str, list[tuple[str, Any]]],
    heads: list[HeadUnit],
    ffns: list[FfnUnit],
) -> dict[str, Any]:
    """Compact to ``name`` with the CLI, load the result back, compare it and count what is gone."""
    out = work / name
    cli = run_cli(work / "model.pt", out, work / "inputs.pt", work / f"report_{out.stem}.json")
    if cli["rc"] != 0:
        return {"cli": cli}
    try:
        small = load(out).eval()
        checks = {k: compare(references[k], run(small, v), TOLERANCE) for k, v in inputs.items()}
        return {"cli": cli, "checks": checks, "removal": removal(small, heads, ffns)}
    except Exception as e:
        return {"cli": cli, "load_error": _failure(e)}


def load(path: Path) -> nn.Module:
    if path.is_dir():
        import compactor

        loaded: nn.Module = compactor.load(str(path))
        return loaded
    module: nn.Module = torch.load(path, weights_only=False)
    return module


def verdict(result: dict[str, Any]) -> tuple[str, str]:
    """ok (exact, everything zeroed removed), partial (exact, some kept), inexact, cli failed; and why."""
    if not result["dead_check"]["ok"]:
        return "zeroing not dead", str(result["dead_check"]["problem"])
    if not result["layout_check"]["ok"]:
        return "zeroing misplaced", "; ".join(result["layout_check"]["problems"])
    parts = [result[k] for k in ("pt", "dir") if k in result]
    for part in parts:
        if part["cli"]["rc"] != 0:
            return "cli failed", part["cli"].get("error", "")
        if "load_error" in part:
            return "load failed", part["load_error"]["error"]
        bad = [f"{k}: {c['problem']}" for k, c in part["checks"].items() if not c["ok"]]
        if bad:
            return "inexact", "; ".join(bad)
    totals = result["pt"]["removal"]["totals"]
    kept = [
        f"{what} {totals[f'{what}_removed']} of {totals[f'{what}_zeroed']} removed"
        for what in ("ffn", "heads", "kv")
        if totals[f"{what}_removed"] != totals[f"{what}_zeroed"]
    ]
    return ("partial", "; ".join(kept)) if kept else ("ok", "")


def _failure(e: BaseException) -> dict[str, Any]:
    return {
        "error": f"{type(e).__name__}: {str(e).strip()[:600]}",
        "traceback": "".join(traceback.format_exception(e, limit=-10))[-5000:],
    }


# --- one case in its own process --------------------------------------------------------------------------
def run_isolated(name: str, timeout: float = TIMEOUT, memory: int = MEMORY) -> dict[str, Any]:
    """Run one case in a subprocess under ``timeout`` seconds and ``memory`` resident bytes (its own; the
    CLI runs it starts have their own time limit); a case out of either is killed, its stack recorded."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT.parent), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="compactor-text-sweep-") as tmp:
        out, err = Path(tmp) / "result.json", Path(tmp) / "stderr"
        with err.open("w") as stderr:
            command = [sys.executable, "-m", "benchmarks.text_sweep", "--one", name, "--json", str(out)]
            child = subprocess.Popen(
                command, cwd=ROOT.parent, env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
            killed = _watch(child, timeout, memory)
        wall, log = killed.pop("wall"), err.read_text(errors="replace")
        if killed:
            return {
                "case": name,
                "status": killed["status"],
                "note": killed["note"],
                "stack": _last_stack(log),
            }
        if not out.exists():
            return {
                "case": name,
                "status": "no result",
                "note": f"exit {child.returncode}",
                "log": log[-3000:],
            }
        result: dict[str, Any] = json.loads(out.read_text())
    return result | {"wall_seconds": wall}


def _watch(child: subprocess.Popen[bytes], timeout: float, memory: int) -> dict[str, Any]:
    start = time.monotonic()
    while child.poll() is None:
        elapsed = time.monotonic() - start
        if _rss_of(child.pid) > memory:
            _stop(child)
            return {
                "wall": elapsed,
                "status": "memory",
                "note": f"over {memory >> 20} MiB after {elapsed:.0f} s",
            }
        if elapsed > timeout:
            _stop(child)
            return {"wall": elapsed, "status": "timeout", "note": f"still running after {timeout:.0f} s"}
        time.sleep(0.2)
    return {"wall": time.monotonic() - start}


# --- the sweep and its report -----------------------------------------------------------------------------
COLUMNS = (
    "case", "status", "exact (max abs error)", "FFN neurons zeroed / removed", "heads zeroed / removed",
    "dir reload exact", "warnings", "CLI s", "exit / error",
)  # fmt: skip


def _exact(part: dict[str, Any] | None) -> str:
    if not part or "checks" not in part:
        return "" if not part else "-"
    checks = part["checks"].values()
    worst = max(c["max_abs_error"] or 0.0 for c in checks)
    return f"{'yes' if all(c['ok'] for c in checks) else 'no'} ({worst:.1e})"


def _counts(r: dict[str, Any]) -> tuple[str, str]:
    expected = r.get("expected", {}).get("totals")
    removal = r.get("pt", {}).get("removal", {}).get("totals")
    if not expected:
        return "", ""
    got = removal or {}
    ffn = f"{expected['ffn_zeroed']} / {got.get('ffn_removed', '-')}"
    heads = f"{expected['heads_zeroed']} / {got.get('heads_removed', '-')}"
    if expected["kv_zeroed"] != expected["heads_zeroed"]:
        heads += f" (kv {expected['kv_zeroed']} / {got.get('kv_removed', '-')})"
    return ffn, heads


def _warnings(r: dict[str, Any]) -> list[str]:
    return _unique(w for k in ("pt", "dir") for w in r.get(k, {}).get("cli", {}).get("warnings", []))


def _digest(warnings: list[str]) -> str:
    if not warnings:
        return "0"
    short = "; ".join(_short(re.sub(r"^warning:\s*", "", w), 70) for w in warnings[:2])
    return f"{len(warnings)}: {short}" + ("; ..." if len(warnings) > 2 else "")


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def row(r: dict[str, Any]) -> list[str]:
    ffn, heads = _counts(r)
    clis = [r[k]["cli"] for k in ("pt", "dir") if k in r]
    seconds = " + ".join(f"{c['seconds']:.1f}" for c in clis)
    codes = "/".join(str(c["rc"]) for c in clis)
    error = next((c.get("error") for c in clis if c.get("error")), None) or r.get("error") or ""
    note = r.get("note") or ""
    exit_text = f"{codes} {_short(error, 140)}".strip() if clis else _short(error or note, 140)
    cells = [f"`{r['case']}`", r["status"], _exact(r.get("pt")), ffn, heads, _exact(r.get("dir"))]
    cells += [_digest(_warnings(r)), seconds, exit_text]
    return [c.replace("|", "\\|") for c in cells]


def details(r: dict[str, Any]) -> list[str]:
    """Per case: per-module counts, what the report kept and why, every warning, failures."""
    lines = [f"### `{r['case']}` ({r.get('class', '')}): {r['status']}", ""]
    if r.get("note"):
        lines += [f"- {r['note']}"]
    if r.get("error"):
        lines += [f"- {r['error'].splitlines()[0][:400]}"]
    if r.get("stack"):
        lines += ["", "```", r["stack"].strip()[-2000:], "```"]
    said: set[str] = set()
    for key in ("pt", "dir"):
        part = r.get(key)
        if part:  # the directory run's lines less those the .pt run already said
            first, *rest = _part_lines(key, part)
            new = [line for line in rest if line not in said]
            lines += [first, *new] + (["  - otherwise as for small.pt"] if len(new) < len(rest) else [])
            said |= set(rest)
    return [*lines, ""]


def _part_lines(key: str, part: dict[str, Any]) -> list[str]:
    cli = part["cli"]
    lines = [f"- `{cli.get('command', key)}`: exit {cli['rc']}, {cli['seconds']:.1f} s"]
    if cli.get("error"):
        lines += [f"  - error: `{cli['error']}`"]
    if part.get("load_error"):
        lines += [f"  - loading it back: `{part['load_error']['error'][:300]}`"]
    for k, c in part.get("checks", {}).items():
        if not c["ok"]:
            lines += [f"  - {k} inputs: {c['problem']}"]
    for kind in ("heads", "ffn"):
        for m in part.get("removal", {}).get(kind, []):
            if m["removed"] != m["zeroed"] or m.get("kv_removed") != m.get("kv_zeroed"):
                lines += [f"  - not all removed: {_module_text(kind, m)}"]
    report = cli.get("report", {})
    lines += [f"  - report kept: {k}" for k in report.get("kept", [])]
    lines += [f"  - report heads: {h}" for h in report.get("heads", [])]
    lines += [f"  - report experts: {e}" for e in report.get("experts", [])]
    if report.get("paths"):
        lines += [f"  - report paths: `{json.dumps(report['paths'])[:400]}`"]
    lines += [f"  - printed: `{w}`" for w in cli.get("warnings", [])]
    lines += [f"  - printed: `{n[:300]}`" for n in cli.get("notes", []) if not n.startswith("hint:")]
    return lines


def _module_text(kind: str, m: dict[str, Any]) -> str:
    if kind == "heads":
        return f"{m['module']}: heads {m['zeroed']} zeroed, {m['removed']} removed (kv {m['kv_zeroed']} / {m['kv_removed']})"
    return f"{m['module']}: neurons of {m['width']} zeroed {m['zeroed']}, removed {m['removed']}"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Transformers text sweep",
        "",
        f"Each case: a small transformers {meta['transformers']} model (hidden {HIDDEN}, {LAYERS} layers, {HEADS} "
        f"query heads of {HEAD_DIM}, {KV_HEADS} key/value heads where grouped, FFN {FFN}, random trained-looking "
        f"weights), FFN neurons zeroed unevenly per layer ({', '.join(f'{f:.0%}' for f in FRACTIONS)}, ...; experts "
        f"+{EXPERT_STEP:.0%} each) and one attention head (or key/value group) per attention module, saved with "
        "`torch.save`, compacted by the CLI (`compact model.pt -o small.pt --example-inputs inputs.pt --report "
        "report.json`; decoders also `-o small_dir/`), loaded back and compared here with the zeroed model on "
        f"the example (batch {BATCH}, length {SEQ}, one row padded) and a fresh batch (length {FRESH_SEQ}): max|Δ| <= "
        f"{TOLERANCE:g} × max(1, max|reference|), the KV cache left out. Removed counts come from the compacted "
        "parameter shapes. `python -m benchmarks.text_sweep` writes this file.",
        "",
        f"Ran on commit `{meta['commit']}` ({meta['date']}, torch {meta['torch']}), compactor sources "
        f"`{meta['compactor_digest']}`{_changed(results, meta)}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    lines += ["", "## Per case", ""]
    for r in results:
        lines += details(r)
    return "\n".join(lines).rstrip() + "\n"


def compactor_digest() -> str:
    """A digest of compactor's sources as they are now (the tree may be edited while a sweep runs)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT.parent / "compactor").rglob("*.py")):
        h.update(str(path.relative_to(ROOT.parent)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _changed(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Which cases ran on compactor sources other than those the sweep started on."""
    other = [
        r["case"]
        for r in results
        if r.get("compactor_digest", meta["compactor_digest"]) != meta["compactor_digest"]
    ]
    return f" (edited during the sweep: {', '.join(other)} ran on other sources)" if other else ""


def metadata() -> dict[str, Any]:
    import transformers

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT.parent, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "compactor") else ""
    return {
        "commit": (git("rev-parse", "--short", "HEAD") or "unknown") + dirty,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compactor_digest": compactor_digest(),
    }


def sweep(names: list[str], timeout: float, memory: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    results = []
    for i, name in enumerate(names, 1):
        result = run_isolated(name, timeout, memory)
        say(f"[{i}/{len(names)}] {name}: {result['status']}  {_short(str(result.get('note') or ''), 160)}")
        results.append(result)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.text_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--cases", help="comma-separated case names (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--one", metavar="CASE", help="run one case in this process (what each subprocess does)")
    p.add_argument("--json", type=Path, help="with --one: write the result here instead of stdout")
    p.add_argument("--out", type=Path, default=ROOT / "TEXT_SWEEP.md", help="markdown report")
    p.add_argument("--json-out", type=Path, default=ROOT / "text_sweep.json", help="JSON results")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per case")
    p.add_argument("--memory-mib", type=int, default=MEMORY >> 20, help="resident MiB per case")
    return p.parse_args(argv)


def selected(spec: str | None) -> list[str]:
    if not spec:
        return list(BY_NAME)
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)} (see --list)")
    return wanted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(BY_NAME))
        return 0
    if args.one:
        import faulthandler

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks before killing
        torch.set_num_threads(1)
        text = json.dumps(run_one(BY_NAME[args.one]), indent=1, default=str)
        if args.json:
            args.json.write_text(text)
        else:
            print(text)
        return 0
    meta = metadata()
    results = sweep(selected(args.cases), args.timeout, args.memory_mib << 20, lambda s: print(s, flush=True))
    args.out.write_text(markdown(results, meta))
    args.json_out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    print(f"wrote {args.out} and {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
