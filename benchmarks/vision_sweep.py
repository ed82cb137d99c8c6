"""Every vision architecture transformers ships, compacted (issue #11): ``python -m benchmarks.vision_sweep``.

The cases come from transformers' own auto mappings (``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``,
``MODEL_FOR_BACKBONE_MAPPING_NAMES``): one per image-classification class and one per backbone class. Each
model is built from a small config (few layers, narrow, 32-64 pixel images, random weights), given
trained-looking parameters (biases, norm scales, layer scales, BatchNorm statistics), masked the way users
prune (``prune.ln_structured`` 30% of the output channels, ``n=2``, on every Conv and Linear, masks left
attached), compacted, and checked here again, independently of compactor's own verification, on fresh
inputs.

Each case runs in its own process (``--one CASE``) under a time and resident-memory limit, so that a hang or
a memory blow-up is recorded instead of stopping the sweep::

    python -m benchmarks.vision_sweep                          # all cases -> benchmarks/VISION_SWEEP.md + .json
    python -m benchmarks.vision_sweep --cases swin,levit       # a few
    python -m benchmarks.vision_sweep --one swin               # one case in this process, JSON on stdout

``tests/test_vision_sweep.py`` (slow) runs the same cases through :func:`run_isolated`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

ROOT = Path(__file__).resolve().parent
AMOUNT = 0.3  # of each Conv/Linear's output channels, smallest L2 norm first
TOLERANCE = 1e-4  # max|delta| <= TOLERANCE * max(1, max|reference|), compactor's default
FRESH = 3  # fresh random inputs for the independent check
TIMEOUT = 180.0  # seconds per case (model building and imports included)
MEMORY = 4 << 30  # resident bytes per case
LOW = 0.5  # a case removing under half of its zeroed channels is listed as low
BATCH = 2


# --- the cases --------------------------------------------------------------------------------------------
VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 4}
VIT_FFN = {**VIT, "intermediate_size": 64}
VIT_MLP = {**VIT, "mlp_ratio": 2}
SWIN = {
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 16,
    "depths": [1, 1],
    "num_heads": [1, 2],
    "window_size": 4,
    "mlp_ratio": 2.0,
}
RESNET = {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1]}
CLIP_VISION = {**VIT_FFN}
CLIP_TEXT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 37,
}
# pp_lcnet: [kernel, in, out, stride, squeeze-excite] per block, per stage
LCNET_BLOCKS = [
    [[3, 8, 16, 1, False]],
    [[3, 16, 16, 2, False]],
    [[3, 16, 32, 2, False]],
    [[3, 32, 32, 2, False], [5, 32, 32, 1, False]],
    [[5, 32, 64, 2, True]],
]

# model type -> small config (keyword arguments of its config class); image size and input kind apart
CONFIGS: dict[str, dict[str, Any]] = {
    "beit": {**VIT_FFN, "use_mean_pooling": True, "out_indices": [1, 2]},
    "bit": {**RESNET, "num_groups": 2, "layer_type": "bottleneck"},
    "clip": {"text_config": CLIP_TEXT, "vision_config": CLIP_VISION, "projection_dim": 16},
    "convnext": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2, "layer_scale_init_value": 0.5},
    "convnextv2": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2},
    "cvt": {
        "embed_dim": [16, 32],
        "num_heads": [1, 2],
        "depth": [1, 2],  # CvtStage reads drop_path_rates[stage]: stage i needs more than i layers
        "patch_sizes": [7, 3],
        "patch_stride": [4, 2],
        "patch_padding": [2, 1],
        "mlp_ratio": [2.0, 2.0],
        "attention_drop_rate": [0.0, 0.0],
        "drop_rate": [0.0, 0.0],
        "drop_path_rate": [0.0, 0.0],
        "qkv_bias": [True, True],
        "cls_token": [False, True],
        "qkv_projection_method": ["dw_bn", "dw_bn"],
        "kernel_qkv": [3, 3],
        "padding_kv": [1, 1],
        "stride_kv": [2, 2],
        "padding_q": [1, 1],
        "stride_q": [1, 1],
    },
    "data2vec-vision": {**VIT_FFN, "use_mean_pooling": True},
    "deit": VIT_FFN,
    "dinat": {
        "patch_size": 4,
        "embed_dim": 16,
        "depths": [1, 1],
        "num_heads": [1, 2],
        "kernel_size": 3,
        "dilations": [[1], [1]],
    },
    "dinov2": {**VIT_MLP, "out_indices": [1, 2]},
    "dinov2_with_registers": {**VIT_MLP, "num_register_tokens": 2, "out_indices": [1, 2]},
    "dinov3_convnext": {"hidden_sizes": [16, 32], "depths": [1, 1], "layer_scale_init_value": 0.5},
    "dinov3_vit": {**VIT_FFN, "num_register_tokens": 2, "out_indices": [1, 2]},
    "donut-swin": SWIN,
    "efficientnet": {
        "image_size": 32,
        "width_coefficient": 0.25,
        "depth_coefficient": 0.5,
        "hidden_dim": 320,  # round_filters(1280) at this width
        "kernel_sizes": [3, 3, 5],
        "in_channels": [32, 16, 24],
        "out_channels": [16, 24, 40],
        "strides": [1, 2, 2],
        "num_block_repeats": [1, 2, 1],
        "expand_ratios": [1, 6, 6],
        "depthwise_padding": [],
    },
    "focalnet": {
        "image_size": 32,
        "patch_size": 4,
        "embed_dim": 16,
        "hidden_sizes": [32, 64],
        "depths": [1, 1],
        "focal_levels": [2, 2],
        "focal_windows": [3, 3],
        "use_layerscale": True,
        "layerscale_value": 0.5,
    },
    "hgnet_v2": {
        "embedding_size": 8,
        "depths": [1, 1],
        "hidden_sizes": [16, 32],
        "stem_channels": [3, 8, 8],
        "stage_in_channels": [8, 16],
        "stage_mid_channels": [8, 16],
        "stage_out_channels": [16, 32],
        "stage_num_blocks": [1, 1],
        "stage_downsample": [False, True],
        "stage_downsample_strides": [2, 2],
        "stage_light_block": [False, True],
        "stage_kernel_size": [3, 5],
        "stage_numb_of_layers": [2, 2],
    },
    "hiera": {
        "embed_dim": 8,
        "image_size": [64, 64],
        "patch_size": [7, 7],
        "patch_stride": [4, 4],
        "patch_padding": [3, 3],
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 1, 1],
        "num_query_pool": 2,
        "masked_unit_size": [8, 8],
        "mlp_ratio": 2.0,
    },
    "ijepa": VIT_FFN,
    "imagegpt": {"vocab_size": 33, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2},
    "levit": {
        "image_size": 64,
        "hidden_sizes": [16, 32, 48],
        "num_attention_heads": [1, 2, 3],
        "depths": [1, 1, 1],
        "key_dim": [8, 8, 8],
        "mlp_ratio": [2, 2, 2],
        "attention_ratio": [2, 2, 2],
    },
    "lw_detr_vit": {
        **VIT_MLP,
        "pretrain_image_size": 32,
        "num_windows": 4,
        "num_windows_side": 2,
        "window_block_indices": [0],
        "out_indices": [1, 2],
    },
    "maskformer-swin": SWIN,
    "metaclip_2": {"text_config": CLIP_TEXT, "vision_config": CLIP_VISION, "projection_dim": 16},
    "mobilenet_v1": {"image_size": 32, "depth_multiplier": 0.25},
    "mobilenet_v2": {"image_size": 32, "depth_multiplier": 0.25},
    "mobilevit": {
        "image_size": 64,
        "hidden_sizes": [16, 24, 32],
        "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64],
        "num_attention_heads": 2,
        "mlp_ratio": 2.0,
        "expand_ratio": 2.0,
    },
    "mobilevitv2": {
        "image_size": 64,
        "width_multiplier": 0.25,
        "n_attn_blocks": [1, 1, 1],
        "base_attn_unit_dims": [16, 24, 32],
    },
    "perceiver": {
        "num_latents": 8,
        "d_latents": 32,
        "d_model": 32,
        "num_blocks": 1,
        "num_self_attends_per_block": 1,
        "num_self_attention_heads": 2,
        "num_cross_attention_heads": 1,
        "image_size": 32,
    },
    "pixio": {**VIT_MLP, "out_indices": [1, 2]},
    "poolformer": {
        "hidden_sizes": [16, 32],
        "depths": [1, 1],
        "num_encoder_blocks": 2,
        "patch_sizes": [7, 3],
        "strides": [4, 2],
        "padding": [2, 1],
        "layer_scale_init_value": 0.5,
    },
    "pp_lcnet": {
        "block_configs": LCNET_BLOCKS,
        "stem_channels": 8,
        "class_expand": 64,
        "depths": [1, 1, 1, 2, 1],
    },
    "pp_lcnet_v3": {"block_configs": LCNET_BLOCKS, "stem_channels": 8, "depths": [1, 1, 1, 2, 1]},
    "pp_lcnet_v4": {
        "block_configs": [
            [[3, 16, 16, 1, True]],
            [[3, 16, 16, 1, False]],
            [[3, 16, 32, [2, 1], False], [3, 32, 32, 1, True]],
            [[3, 32, 64, [2, 1], False]],
        ],
        "stem_channels": [3, 8, 16],
        "depths": [1, 1, 2, 1],
        "stage_out_channels": [16, 16, 32, 64],
    },
    "pvt": {
        "image_size": 32,
        "num_encoder_blocks": 2,
        "depths": [1, 1],
        "sequence_reduction_ratios": [2, 1],
        "hidden_sizes": [16, 32],
        "patch_sizes": [4, 2],
        "strides": [4, 2],
        "num_attention_heads": [1, 2],
        "mlp_ratios": [2, 2],
    },
    "pvt_v2": {
        "image_size": 32,
        "num_encoder_blocks": 2,
        "depths": [1, 1],
        "sr_ratios": [2, 1],
        "hidden_sizes": [16, 32],
        "patch_sizes": [7, 3],
        "strides": [4, 2],
        "num_attention_heads": [1, 2],
        "mlp_ratios": [2, 2],
        "out_indices": [0, 1],
    },
    "regnet": {**RESNET, "hidden_sizes": [16, 32], "groups_width": 8},
    "resnet": {**RESNET, "out_indices": [1, 2]},
    "rf_detr_dinov2": {**VIT_MLP, "num_windows": 2, "window_block_indexes": [0], "out_indices": [1, 2]},
    "rt_detr_resnet": {**RESNET, "out_indices": [1, 2]},
    "sapiens2": {
        **VIT_FFN,
        "num_register_tokens": 2,
        "num_key_value_heads_per_layer": [2, 1],
        "num_key_value_attention_heads": 1,
        "num_first_full_attention_layers": 1,
        "num_last_full_attention_layers": 1,
        "out_indices": [1, 2],
    },
    "segformer": {
        "num_encoder_blocks": 2,
        "depths": [1, 1],
        "sr_ratios": [2, 1],
        "hidden_sizes": [16, 32],
        "patch_sizes": [7, 3],
        "strides": [4, 2],
        "num_attention_heads": [1, 2],
        "mlp_ratios": [2, 2],
        "decoder_hidden_size": 32,
    },
    "shieldgemma2": {  # a Gemma 3 language model answering yes/no about a SigLIP-encoded image
        "text_config": {
            "model_type": "gemma3_text",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 8,
            "max_position_embeddings": 64,
        },
        "vision_config": {"model_type": "siglip_vision_model", **CLIP_VISION, "num_hidden_layers": 1},
        "mm_tokens_per_image": 16,
        "boi_token_index": 61,
        "eoi_token_index": 62,
        "image_token_index": 60,
        "yes_token_index": 5,
        "no_token_index": 6,
    },
    "siglip": {"text_config": CLIP_TEXT, "vision_config": CLIP_VISION},
    "siglip2": {
        "text_config": CLIP_TEXT,
        "vision_config": {k: v for k, v in CLIP_VISION.items() if k != "image_size"} | {"num_patches": 64},
    },
    "swiftformer": {
        "image_size": 32,
        "depths": [1, 1, 1, 1],
        "embed_dims": [16, 16, 32, 32],
        "mlp_ratio": 2,
        "layer_scale_init_value": 0.5,
    },
    "swin": {**SWIN, "out_indices": [1, 2]},
    "swinv2": {**SWIN, "pretrained_window_sizes": [0, 0], "out_indices": [1, 2]},
    "textnet": {
        "stem_out_channels": 8,
        "conv_layer_kernel_sizes": [[[3, 3], [1, 3]], [[3, 3], [3, 1]], [[3, 3], [1, 3]], [[3, 1], [3, 3]]],
        "conv_layer_strides": [[1, 2], [2, 1], [2, 1], [2, 1]],
        "hidden_sizes": [8, 8, 16, 16, 32],
        "depths": [2, 2, 2, 2],
        "image_size": [32, 32],
    },
    "tipsv2_vision_model": {**VIT_MLP, "num_register_tokens": 1, "out_indices": [1, 2]},
    "uvdoc_backbone": {
        "resnet_head": [[3, 8], [8, 8]],
        "resnet_configs": [[[8, 8, 1, False]], [[8, 16, 1, True], [16, 16, 3, False]]],
        "stage_configs": [[[16, 1]], [[16, 2]], [[16, 5]], [[16, 8], [16, 3]]],
        "depths": [1, 1, 1, 2],
    },
    "vit": VIT_FFN,
    "vit_msn": VIT_FFN,
    "vitdet": {
        **VIT_MLP,
        "pretrain_image_size": 32,
        "window_size": 4,
        "window_block_indices": [0],
        "residual_block_indices": [1],
        "out_indices": [1, 2],
    },
    "vitpose_backbone": {  # its patch embedding pads by 2: a patch of 8 keeps 32 / 8 patches a side
        **VIT_MLP,
        "image_size": [32, 32],
        "patch_size": [8, 8],
        "out_indices": [1, 2],
    },
}
IMAGE_SIZE = {"hiera": 64, "levit": 64, "mobilevit": 64, "mobilevitv2": 64}
NEEDS = {"timm_backbone": "timm", "timm_wrapper": "timm", "dinat": "natten"}  # packages not importable here
ALIASES = {"tipsv2": "tipsv2_vision_model"}  # the same backbone class, built from its vision config


@dataclass(frozen=True)
class Case:
    """One transformers class to build and compact: ``name`` is ``model_type`` or ``model_type:Class``."""

    name: str
    model_type: str
    class_name: str
    task: str  # "classification" or "backbone"

    @property
    def config_type(self) -> str:
        return ALIASES.get(self.model_type, self.model_type)


def all_cases() -> list[Case]:
    """One case per image-classification class and per backbone class that transformers maps."""
    from transformers.models.auto import modeling_auto

    cases: list[Case] = []
    seen: set[tuple[str, str, str]] = set()
    for task, mapping in (
        ("classification", modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
        ("backbone", modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES),
    ):
        for model_type, names in sorted(mapping.items()):
            names = (names,) if isinstance(names, str) else tuple(names)
            for i, class_name in enumerate(names):
                key = (ALIASES.get(model_type, model_type), class_name, task)
                if key in seen:  # an alias of a type already listed: the same class and config
                    continue
                seen.add(key)
                suffix = "" if i == 0 else f":{class_name}"
                name = model_type + (":backbone" if task == "backbone" else suffix)
                cases.append(Case(name, model_type, class_name, task))
    return cases


def case_named(name: str) -> Case:
    for case in all_cases():
        if case.name == name:
            return case
    raise KeyError(f"no vision case {name!r}")


# --- building, inputs, masking ----------------------------------------------------------------------------
def build(case: Case) -> nn.Module:
    """The case's class from its small config, random weights, in eval mode."""
    import transformers

    if case.model_type in NEEDS:
        raise Unavailable(f"needs {NEEDS[case.model_type]}, which does not import here")
    kwargs = dict(CONFIGS[case.config_type])
    if case.task == "classification":
        kwargs["num_labels"] = 3
    elif "out_indices" not in kwargs and "out_features" not in kwargs:
        pass  # the backbone's default: its last stage
    config = transformers.CONFIG_MAPPING[case.config_type](**kwargs)
    model_class = getattr(transformers, case.class_name)
    torch.manual_seed(0)
    model: nn.Module = model_class(config)
    return model.eval()


class Unavailable(Exception):
    """A case this environment cannot build (a package that does not import): reported as skipped."""


def example_inputs(case: Case, model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs of the case's forward: ``pixel_values`` (or the model's own kind) for a batch of 2."""
    g = torch.Generator().manual_seed(seed)
    config = CONFIGS.get(case.config_type, {})
    if case.model_type == "imagegpt":
        return {
            "input_ids": torch.randint(
                0, config["vocab_size"] - 1, (BATCH, config["n_positions"]), generator=g
            )
        }
    if case.model_type == "shieldgemma2":  # <bos> <start of image> 16 image tokens <end of image> a prompt
        ids = torch.tensor([[2, 61] + [60] * config["mm_tokens_per_image"] + [62, 7, 8, 9]] * BATCH)
        pixels = torch.randn(BATCH, 3, 32, 32, generator=g)
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}
    if case.model_type == "siglip2":
        vision = config["vision_config"]
        side = math.isqrt(vision["num_patches"])
        n, p = side * side, vision["patch_size"]
        return {
            "pixel_values": torch.randn(BATCH, n, 3 * p * p, generator=g),
            "pixel_attention_mask": torch.ones(BATCH, n, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]] * BATCH, dtype=torch.long),
        }
    size = IMAGE_SIZE.get(case.config_type, 32)
    pixels = torch.randn(BATCH, 3, size, size, generator=g)
    return {"inputs": pixels} if case.model_type == "perceiver" else {"pixel_values": pixels}


def like_trained(model: nn.Module, seed: int = 1) -> None:
    """Give every parameter that the initialiser left constant (biases at 0, norm scales at 1, layer scales at
    1e-6, zero GRN and token embeddings) random values of its scale, as training would: a zero bias would
    make every masked channel emit exactly zero and hide the constant channels compactor has to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 0 or not bool((p == p.flatten()[0]).all()):
                continue
            value = float(p.flatten()[0])
            noise = torch.randn(p.shape, generator=g)
            if abs(value) < 1e-3:  # zeros and tiny layer scales
                p.copy_(noise * 0.1 if value == 0 else 0.5 + noise * 0.1)
            else:
                p.copy_(value * (1 + noise * 0.1))


def maskable(model: nn.Module) -> Iterator[tuple[str, nn.Module, int]]:
    """Every Conv and Linear with more than one output channel, and the weight dimension of its outputs
    (transformers' GPT-2-style ``Conv1D`` is a Linear whose weight is stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.weight.shape[0] > 1:
            yield name, m, 0
        elif isinstance(m, Conv1D) and m.weight.shape[1] > 1:
            yield name, m, 1


def mask(model: nn.Module) -> int:
    """``prune.ln_structured`` (30%, n=2, over output channels) on every Conv and Linear, masks attached; the
    number of output channels (filters, neurons) the masks zeroed."""
    pruned = 0
    for _, m, dim in maskable(model):
        prune.ln_structured(m, "weight", AMOUNT, n=2, dim=dim)  # type: ignore[no-untyped-call]
        weight_mask = m.get_buffer("weight_mask")
        pruned += int((weight_mask.movedim(dim, 0).flatten(1).sum(1) == 0).sum())
    return pruned


def settle_norms(model: nn.Module, inputs: dict[str, torch.Tensor], seed: int = 2) -> None:
    """BatchNorm as after training with the masks (as ``tests/zoo.py`` ``perturb_norms``): random scale,
    shift and running statistics, except that a channel whose input is constant keeps that constant as its
    ``running_mean``. One forward in eval mode sets each BatchNorm just before it runs, so the constant it sees
    already reflects the settled norms upstream."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    done: set[nn.Module] = set()

    def settle(m: nn.Module, args: tuple[Any, ...]) -> None:
        if m in done or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            return
        done.add(m)
        assert isinstance(m, nn.modules.batchnorm._BatchNorm)
        x = args[0].detach().movedim(1, 0).flatten(1)
        n = m.num_features
        constant = (x == x[:, :1]).all(1)
        if m.affine:
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
            m.bias.copy_(sign * (torch.rand(n, generator=g) * 0.9 + 0.1))
        if m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(torch.where(constant, x[:, 0], torch.randn(n, generator=g) * 0.3))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)

    hooks = [m.register_forward_pre_hook(settle) for m in norms]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()


def prepared(case: Case) -> tuple[nn.Module, dict[str, torch.Tensor], int]:
    """The case's model, like trained, masked, norms settled, in eval mode; its inputs; pruned filters."""
    model = build(case)
    inputs = example_inputs(case, model)
    like_trained(model)
    pruned = mask(model)
    settle_norms(model, example_inputs(case, model, seed=1))
    return model.eval(), inputs, pruned


# --- one case, in this process ----------------------------------------------------------------------------
FAILED = ("crash", "refused", "timeout", "memory", "inexact", "no result")  # a sweep test fails on these


def run_one(case: Case) -> dict[str, Any]:
    """Build, mask, compact and check ``case``; a failure is recorded in the result, never raised."""
    from .case import _peak_rss_bytes, _reset_peak_rss, _rss_bytes

    result: dict[str, Any] = {"case": case.name, "model_type": case.model_type, "class": case.class_name}
    result["task"] = case.task
    try:
        model, inputs, pruned = prepared(case)
    except Unavailable as e:
        return result | {"status": "skipped", "note": str(e)}
    except Exception as e:  # the sweep's own config did not build: not compactor's failure, but said
        return result | {"status": "build failed", **_failure(e)}
    result["pruned_filters"] = pruned
    result["inputs"] = {k: list(v.shape) for k, v in inputs.items()}
    gc.collect()
    result["rss_before_compact"] = _rss_bytes()
    reset = _reset_peak_rss()
    start = time.perf_counter()
    try:
        import compactor

        small, report = compactor.compact(model, inputs, tolerance=TOLERANCE)
    except Exception as e:
        from compactor.errors import CompactorError

        result["seconds"] = time.perf_counter() - start
        status = "refused" if isinstance(e, CompactorError) else "crash"
        return result | {"status": status, **_failure(e)}
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = _peak_rss_bytes() if reset else None
    result.update(summary(report))
    result["check"] = check(case, model, small.eval())
    result["status"], result["note"] = verdict(result)
    return result


def summary(report: Any) -> dict[str, Any]:
    """What the sweep reports of a :class:`~compactor.CompactionReport`."""
    kept = Counter(f"{z.fate}: {z.reason}" for z in report.zeroed if not _removed(z.fate))
    heads = report.extra.get("heads", [])
    return {
        "params": dict(report.params),
        "zeroed": len(report.zeroed),
        "removed": sum(_removed(z.fate) for z in report.zeroed),
        "removed_fraction": report.removed_fraction if report.zeroed else None,
        "fates": {k: v for k, v in report.fates.items() if v},
        "kept_reasons": dict(kept.most_common()),
        "heads_removed": sum(1 for h in heads if h.get("fate") == "removed"),
        "warnings": [w if len(w) < 400 else w[:400] + "..." for w in report.warnings],
        "graph_issues": list(report.extra.get("graph_issues", [])),
        "compactor_max_abs_error": report.max_abs_error,
        "rounding_floor": report.extra.get("rounding_floor"),
        "stage_seconds": {k: round(v, 2) for k, v in report.seconds.items()},
    }


def _removed(fate: str) -> bool:
    return fate in ("removed", "folded", "merged")


def check(case: Case, masked: nn.Module, small: nn.Module) -> dict[str, Any]:
    """Compare every output of the compacted model with the masked model's on the example and fresh inputs,
    here rather than through compactor's verification: ``max|delta| <= TOLERANCE * max(1, max|reference|)``
    for floats, equality for the rest."""
    problems: list[str] = []
    worst = 0.0
    for seed in range(FRESH + 1):
        inputs = example_inputs(case, masked, seed=seed if seed == 0 else 100 + seed)
        with torch.no_grad():
            expected, got = leaves(masked(**inputs)), leaves(small(**inputs))
        if [n for n, _ in expected] != [n for n, _ in got]:
            problems.append(
                f"inputs {seed}: outputs {[n for n, _ in got]} instead of {[n for n, _ in expected]}"
            )
            continue
        for (name, a), (_, b) in zip(expected, got, strict=True):
            problem, error = _differ(a, b)
            worst = max(worst, error)
            if problem:
                problems.append(f"inputs {seed}: {name}: {problem}")
    return {"ok": not problems, "max_abs_error": worst, "problems": problems[:5]}


def leaves(value: Any, prefix: str = "output", depth: int = 0) -> list[tuple[str, Any]]:
    """The tensors and plain values of nested tuples, lists, dicts and ``ModelOutput``s, named by path; an
    other object (a key/value ``Cache``) by its attributes, to a depth of 6."""
    if isinstance(value, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return [leaf for k, v in value.items() for leaf in leaves(v, f"{prefix}.{k}", depth + 1)]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in leaves(v, f"{prefix}[{i}]", depth + 1)]
    plain = value is None or isinstance(value, (torch.Tensor, int, float, complex, str, bytes, torch.dtype))
    if plain or depth >= 6 or not hasattr(value, "__dict__") or isinstance(value, nn.Module):
        return [(prefix, value if plain else type(value).__name__)]
    return [leaf for k, v in sorted(vars(value).items()) for leaf in leaves(v, f"{prefix}.{k}", depth + 1)]


def _differ(a: Any, b: Any) -> tuple[str | None, float]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return (None if a == b else f"{b!r} instead of {a!r}"), 0.0
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{tuple(b.shape)}:{b.dtype} instead of {tuple(a.shape)}:{a.dtype}", math.inf
    if not a.is_floating_point() or a.numel() == 0:
        return (None if torch.equal(a, b) else "integers differ"), 0.0
    error = float((a.double() - b.double()).abs().max())
    allowed = TOLERANCE * max(1.0, float(a.double().abs().max()))
    return (None if error <= allowed else f"max abs error {error:.3g} > {allowed:.3g}"), error


def verdict(result: dict[str, Any]) -> tuple[str, str]:
    """ok, low (under half of the zeroed channels removed), kept whole (nothing removed) or inexact; and why."""
    if not result["check"]["ok"]:
        return "inexact", "; ".join(result["check"]["problems"][:2])
    untraced = [w for w in result["warnings"] if "no channel was removed" in w]
    removed = result["removed"] + result["heads_removed"]
    reasons = ", ".join(f"{n} x {r}" for r, n in list(result["kept_reasons"].items())[:3])
    if result["pruned_filters"] and not removed:
        return "kept whole", untraced[0] if untraced else reasons or "no zeroed channel found"
    fraction = result["removed_fraction"]
    if fraction is not None and fraction < LOW:
        return "low", reasons
    return "ok", reasons


def _failure(e: BaseException) -> dict[str, Any]:
    """The exception, where in compactor it surfaced, and where it was raised."""
    frames = traceback.extract_tb(e.__traceback__)
    package = str(Path(__file__).resolve().parent.parent / "compactor")
    ours = [f for f in frames if f.filename.startswith(package)]
    return {
        "error": f"{type(e).__name__}: {str(e).strip()[:600]}",
        "where": _frame(ours[-1]) if ours else None,
        "raised": _frame(frames[-1]) if frames else None,
        "traceback": "".join(traceback.format_exception(e, limit=-12))[-6000:],
    }


def _frame(f: traceback.FrameSummary) -> str:
    parts = Path(f.filename).parts
    tail = parts[parts.index("site-packages") + 1 :] if "site-packages" in parts else parts[-3:]
    return f"{'/'.join(tail)}:{f.lineno} in {f.name}"


# --- one case, in its own process -------------------------------------------------------------------------
def run_isolated(
    name: str, timeout: float = TIMEOUT, memory: int = MEMORY, module: str = "benchmarks.vision_sweep"
) -> dict[str, Any]:
    """Run one case in a subprocess (``python -m module --one name``) under ``timeout`` seconds and ``memory``
    resident bytes. A case that runs out of either is killed, and recorded with the Python stack it was in
    (faulthandler)."""
    root = ROOT.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="compactor-sweep-") as tmp:
        out, err = Path(tmp) / "result.json", Path(tmp) / "stderr"
        with err.open("w") as stderr:
            command = [sys.executable, "-m", module, "--one", name, "--json", str(out)]
            child = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
            start, peak, killed = time.monotonic(), 0, None
            while child.poll() is None:
                rss = _rss_of(child.pid)
                peak = max(peak, rss)
                if rss > memory:
                    killed = (
                        f"memory: over {memory >> 20} MiB resident after {time.monotonic() - start:.0f} s"
                    )
                elif time.monotonic() - start > timeout:
                    killed = f"timeout: still running after {timeout:.0f} s"
                if killed:
                    _stop(child)
                    break
                time.sleep(0.2)
        wall = time.monotonic() - start
        log = err.read_text(errors="replace")
        if killed:
            return {
                "case": name,
                "status": killed.split(":")[0],
                "note": killed,
                "wall_seconds": wall,
                "process_peak_rss": peak,
                "stack": _last_stack(log),
            }
        if not out.exists():
            return {
                "case": name,
                "status": "no result",
                "note": f"exit status {child.returncode}",
                "log": log[-4000:],
            }
        result: dict[str, Any] = json.loads(out.read_text())
    return result | {"wall_seconds": wall, "process_peak_rss": peak}


def _rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _stop(child: subprocess.Popen[bytes]) -> None:
    """Ask for a stack dump (SIGUSR1, faulthandler), then kill."""
    try:
        child.send_signal(signal.SIGUSR1)
        child.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    if child.poll() is None:
        child.kill()
        child.wait()


def _last_stack(log: str) -> str:
    start = log.rfind("Thread 0x")
    start = log.rfind("Current thread", 0) if start < 0 else start
    return log[start:][-5000:] if start >= 0 else log[-3000:]


# --- the sweep and its report -----------------------------------------------------------------------------
COLUMNS = (
    "case", "status", "params dense", "params compacted", "pruned filters", "zeroed", "removed",
    "removed fraction", "heads removed", "compact s", "peak MiB", "note",
)  # fmt: skip


def sweep(names: list[str], timeout: float, memory: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    results = []
    for i, name in enumerate(names, 1):
        result = run_isolated(name, timeout, memory)
        say(
            f"[{i}/{len(names)}] {name}: {result['status']}  {_short(result.get('note') or result.get('error'))}"
        )
        results.append(result)
    return results


def _short(value: Any, n: int = 160) -> str:
    text = " ".join(str(value or "").split())
    return text if len(text) <= n else text[: n - 3] + "..."


def row(r: dict[str, Any]) -> list[str]:
    params = r.get("params", {})
    fraction = r.get("removed_fraction")
    peak = r.get("peak_rss") or r.get("process_peak_rss")
    seconds = r.get("seconds", r.get("wall_seconds"))
    note = r.get("note") or r.get("error") or ""
    if r.get("where"):
        note = f"{note} (at {r['where']})"
    return [
        f"`{r['case']}`",
        r["status"],
        str(params.get("before", "")),
        str(params.get("after", "")),
        str(r.get("pruned_filters", "")),
        str(r.get("zeroed", "")),
        str(r.get("removed", "")),
        "" if fraction is None else f"{fraction:.2f}",
        str(r.get("heads_removed", "") or ""),
        "" if seconds is None else f"{seconds:.1f}",
        "" if not peak else f"{peak / 2**20:.0f}",
        _short(note, 220).replace("|", "\\|"),
    ]


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    counts = Counter(r["status"] for r in results)
    lines = [
        "# Transformers vision sweep",
        "",
        f"Every image-classification and backbone class that transformers {meta['transformers']} maps, built from a "
        f"small config with random weights, given trained-looking biases, norm scales and BatchNorm statistics, "
        f"masked with `prune.ln_structured` ({AMOUNT:.0%} of the output channels, n=2) on every Conv and Linear, "
        f"compacted, and compared with the masked model on {FRESH + 1} inputs (max|Δ| <= {TOLERANCE:g} × "
        f"max(1, max|reference|)). Each case ran in its own process (limits: {meta['timeout']:.0f} s, "
        f"{meta['memory'] >> 20} MiB resident). `python -m benchmarks.vision_sweep` writes this file.",
        "",
        f"Ran on commit `{meta['commit']}` ({meta['date']}, torch {meta['torch']}, one thread).",
        "",
        "Statuses: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) + ". "
        "*removed fraction*: of the zeroed channels compactor found, those that no longer exist (removed, "
        "folded or merged); *low*: under half; *kept whole*: nothing removed; peak MiB: resident peak during "
        "the compaction (the process's for the killed ones).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    details = [r for r in results if r["status"] not in ("ok", "skipped")]
    if details:
        lines += ["", "## Not ok", ""]
        for r in details:
            lines += [f"### `{r['case']}`: {r['status']}", ""]
            if r.get("error"):
                lines += [f"- {r['error'].splitlines()[0][:400]}"]
                lines += [f"- surfaced at `{r.get('where')}`, raised at `{r.get('raised')}`"]
            if r.get("kept_reasons"):
                lines += [
                    f"- kept: {n} x {reason[:300]}" for reason, n in list(r["kept_reasons"].items())[:4]
                ]
            if r.get("check") and not r["check"]["ok"]:
                lines += [f"- check: {p}" for p in r["check"]["problems"][:3]]
            if r.get("stack"):
                lines += ["", "```", r["stack"].strip()[-2500:], "```"]
            elif r.get("note") and r["status"] in ("kept whole", "no result"):
                lines += [f"- {r['note'][:500]}"]
            lines += [""]
    return "\n".join(lines).rstrip() + "\n"


def metadata(timeout: float, memory: int) -> dict[str, Any]:
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
        "timeout": timeout,
        "memory": memory,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vision_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--cases", help="comma-separated case names or model types (default: all)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--one", metavar="CASE", help="run one case in this process (what each subprocess does)")
    p.add_argument("--json", type=Path, help="with --one: write the result here instead of stdout")
    p.add_argument(
        "--out", type=Path, default=ROOT / "VISION_SWEEP.md", help="markdown; the JSON goes beside it"
    )
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per case")
    p.add_argument("--memory-mib", type=int, default=MEMORY >> 20, help="resident MiB per case")
    return p.parse_args(argv)


def selected(spec: str | None) -> list[str]:
    cases = all_cases()
    if not spec:
        return [c.name for c in cases]
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    names = [c.name for c in cases if c.name in wanted or c.model_type in wanted]
    unknown = [w for w in wanted if not any(w in (c.name, c.model_type) for c in cases)]
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)} (see --list)")
    return names


def answer_one(run: Callable[[], dict[str, Any]], out: Path | None) -> int:
    """What a case's subprocess does (``--one CASE``): one thread, a stack dump on SIGUSR1 (the parent asks
    before killing), the result as JSON to ``out`` or stdout."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    torch.set_num_threads(1)
    text = json.dumps(run(), indent=1, default=str)
    if out:
        out.write_text(text)
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(c.name for c in all_cases()))
        return 0
    if args.one:
        return answer_one(lambda: run_one(case_named(args.one)), args.json)
    names = selected(args.cases)
    memory = args.memory_mib << 20
    meta = metadata(args.timeout, memory)
    results = sweep(names, args.timeout, memory, lambda line: print(line, flush=True))
    args.out.write_text(markdown(results, meta))
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str)
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
