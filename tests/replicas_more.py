"""Faithful replicas of the timm blocks of issue #11 not replicated elsewhere, at test size.

timm does not import here, so each class below follows the public source of ``huggingface/pytorch-image-models``
(read at aa4b585, 2026-08): the same layers and the same forward code, only the sizes made small, and the
``device``/``dtype`` plumbing, drop paths, checkpointing, feature extraction and unused options left out.
The file each comes from is named in its section.

- HaloNet: ``timm/layers/halo_attn.py`` (HaloAttn, PosEmbedRel, rel_logits_1d) inside ``byobnet.py``'s
  SelfAttnBlock and BottleneckBlock (``byoanet.py`` configs).
- MaxViT: ``maxxvit.py`` (the ``_tf_cfg`` variant of ``maxvit_tiny_tf``: MbConvBlock with SE,
  PartitionAttentionCl over window and grid partitions, AttentionCl with RelPosBiasTf, NormMlpClassifierHead),
  with ``timm/layers`` Conv2dSame, AvgPool2dSame, pos_embed_rel.py and squeeze_excite.py.
- EfficientViT (MIT): ``efficientvit_mit.py`` (LiteMLA, MBConv, DSConv, FusedMBConv, ConvBlock, the B and L
  models).
- EfficientViT (MSRA): ``efficientvit_msra.py`` (CascadedGroupAttention with its attention-bias cache,
  LocalWindowAttention, PatchMerging with SqueezeExcite).
- XCiT: ``xcit.py`` (XCA, LPI, ClassAttentionBlock, PositionalEncodingFourier, ConvPatchEmbed).
- GC-ViT: ``gcvit.py`` (WindowAttentionGlobal, FeatureBlock, MbConvBlock with SE, Downsample2d).
- EfficientFormer: ``efficientformer.py`` (Attention with attention_bias_cache, Pooling, Flat, MetaBlock1d/2d).
- TinyViT: ``tiny_vit.py`` (Attention with attention_bias_cache, MBConv, PatchMerging, TinyVitBlock).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable

import replicas_timm
import torch
import torch.nn.functional as F
from replicas_timm import AttentionBiasCache, ClassAttn, Mlp
from torch import nn

Act = Callable[[], nn.Module]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """``timm/layers/helpers.py``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


def masked(model: nn.Module, shape: tuple[int, ...], *, seed: int = 0) -> nn.Module:
    """``replicas_timm.masked`` (``ln_structured`` 30% on every Conv and Linear, norms as after training), with
    the trained values of the parameters these models initialise to constants first: LayerScale gammas,
    XCA temperatures, attention biases and relative position tables."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("gamma") or leaf == "temperature":
                p.uniform_(0.5, 1.5)
            elif leaf in ("attention_biases", "relative_position_bias_table", "height_rel", "width_rel"):
                p.normal_(0.0, 0.5)
    return replicas_timm.masked(model, shape, seed=seed)


# --- timm/layers: norm_act.py, squeeze_excite.py, conv2d_same.py, pool2d_same.py, norm.py ----------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """``norm_act.py`` BatchNormAct2d: batch norm, then the activation (``nn.Identity`` if not applied)."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: Act | None = nn.ReLU) -> None:
        super().__init__(num_features, eps=eps)
        self.drop = nn.Identity()
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class ConvNormAct(nn.Module):
    """``conv_bn_act.py`` ConvNormAct: conv (symmetric padding), then BatchNormAct2d."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: Act | None = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    """``squeeze_excite.py`` SEModule."""

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        bias: bool = True,
        act: Act = nn.ReLU,
    ) -> None:
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn = nn.Identity()
        self.act = act()
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


def _same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(
    x: torch.Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...] = (1, 1),
    value: float = 0,
) -> torch.Tensor:
    """``padding.py`` pad_same: TensorFlow's 'SAME' padding, computed from the input's size."""
    ih, iw = x.size()[-2:]
    pad_h = _same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = _same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class Conv2dSame(nn.Conv2d):
    """``conv2d_same.py`` Conv2dSame: 'SAME' padding of the input, then ``F.conv2d`` without padding."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__(cin, cout, k, stride, 0, 1, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def create_conv2d(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False
) -> nn.Conv2d:
    """``create_conv2d.py`` with ``padding='same'``: static padding where stride 1 allows it, else Conv2dSame."""
    if stride == 1:
        return nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=bias)
    return Conv2dSame(cin, cout, k, stride, groups=groups, bias=bias)


class AvgPool2dSame(nn.AvgPool2d):
    """``pool2d_same.py`` AvgPool2dSame."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__((kernel_size, kernel_size), (stride, stride), (0, 0), False, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride)  # type: ignore[arg-type]
        return F.avg_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad
        )


class LayerNorm2d(nn.LayerNorm):
    """``norm.py`` LayerNorm2d: LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ClassifierHead(nn.Module):
    """``classifier.py`` ClassifierHead: global average pool, flatten, dropout, fc."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # SelectAdaptivePool2d
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(in_features, num_classes)
        self.flatten = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.fc(self.drop(self.global_pool(x))))


class NormMlpClassifierHead(nn.Module):
    """``classifier.py`` NormMlpClassifierHead: pool, LayerNorm2d, flatten, (fc + tanh), fc."""

    def __init__(
        self, in_features: int, num_classes: int, hidden_size: int | None = None, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.norm = LayerNorm2d(in_features, eps=eps)
        self.flatten = nn.Flatten(1)
        self.pre_logits: nn.Module = nn.Identity()
        if hidden_size:
            self.pre_logits = nn.Sequential(
                OrderedDict([("fc", nn.Linear(in_features, hidden_size)), ("act", nn.Tanh())])
            )
            in_features = hidden_size
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.norm(x)
        x = self.flatten(x)
        x = self.pre_logits(x)
        x = self.drop(x)
        return self.fc(x)


# --- HaloNet (timm/layers/halo_attn.py, byobnet.py SelfAttnBlock / BottleneckBlock) ----------------------------


def rel_logits_1d(q: torch.Tensor, rel_k: torch.Tensor, permute_mask: list[int]) -> torch.Tensor:
    B, H, W, dim = q.shape  # noqa: RUF059  (timm's code, as it is)
    rel_size = rel_k.shape[0]
    win_size = (rel_size + 1) // 2

    x = q @ rel_k.transpose(-1, -2)
    x = x.reshape(-1, W, rel_size)

    # pad to shift from relative to absolute indexing
    x_pad = F.pad(x, [0, 1]).flatten(1)
    x_pad = F.pad(x_pad, [0, rel_size - W])

    # reshape and slice out the padded elements
    x_pad = x_pad.reshape(-1, W + 1, rel_size)
    x = x_pad[:, :W, win_size - 1 :]

    # reshape and tile
    x = x.reshape(B, H, 1, W, win_size).expand(-1, -1, win_size, -1, -1)
    return x.permute(permute_mask)


class PosEmbedRel(nn.Module):
    def __init__(self, block_size: int, win_size: int, dim_head: int, scale: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.dim_head = dim_head
        self.height_rel = nn.Parameter(torch.randn(win_size * 2 - 1, dim_head) * scale)
        self.width_rel = nn.Parameter(torch.randn(win_size * 2 - 1, dim_head) * scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        B, BB, HW, _ = q.shape

        # relative logits in width dimension.
        q = q.reshape(-1, self.block_size, self.block_size, self.dim_head)
        rel_logits_w = rel_logits_1d(q, self.width_rel, permute_mask=[0, 1, 3, 2, 4])

        # relative logits in height dimension.
        q = q.transpose(1, 2)
        rel_logits_h = rel_logits_1d(q, self.height_rel, permute_mask=[0, 3, 1, 4, 2])

        rel_logits = rel_logits_h + rel_logits_w
        return rel_logits.reshape(B, BB, HW, -1)


class HaloAttn(nn.Module):
    def __init__(
        self, dim: int, stride: int = 1, num_heads: int = 8, block_size: int = 8, halo_size: int = 3
    ) -> None:
        super().__init__()
        dim_out = dim
        assert dim_out % num_heads == 0
        self.num_heads = num_heads
        self.dim_head_qk = make_divisible(dim_out * 1.0, divisor=8) // num_heads
        self.dim_head_v = dim_out // self.num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk**-0.5
        self.scale_pos_embed = False
        self.block_size = self.block_size_ds = block_size
        self.halo_size = halo_size
        self.win_size = block_size + halo_size * 2  # neighbourhood window size
        self.block_stride = 1
        use_avg_pool = False
        if stride > 1:
            use_avg_pool = block_size % stride != 0
            self.block_stride = 1 if use_avg_pool else stride
            self.block_size_ds = self.block_size // self.block_stride
        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=False)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=False)
        self.pos_embed = PosEmbedRel(self.block_size_ds, self.win_size, self.dim_head_qk, self.scale)
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape  # noqa: RUF059
        num_h_blocks = H // self.block_size
        num_w_blocks = W // self.block_size
        num_blocks = num_h_blocks * num_w_blocks

        q = self.q(x)
        # unfold
        q = q.reshape(
            -1, self.dim_head_qk, num_h_blocks, self.block_size_ds, num_w_blocks, self.block_size_ds
        ).permute(0, 1, 3, 5, 2, 4)
        # B, num_heads * dim_head * block_size ** 2, num_blocks
        q = q.reshape(B * self.num_heads, self.dim_head_qk, -1, num_blocks).transpose(1, 3)
        # B * num_heads, num_blocks, block_size ** 2, dim_head

        kv = self.kv(x)
        kv = F.pad(kv, [self.halo_size, self.halo_size, self.halo_size, self.halo_size])
        kv = (
            kv.unfold(2, self.win_size, self.block_size)
            .unfold(3, self.win_size, self.block_size)
            .reshape(B * self.num_heads, self.dim_head_qk + self.dim_head_v, num_blocks, -1)
            .permute(0, 2, 3, 1)
        )
        k, v = torch.split(kv, [self.dim_head_qk, self.dim_head_v], dim=-1)
        # B * num_heads, num_blocks, win_size ** 2, dim_head_qk or dim_head_v

        attn = (q @ k.transpose(-1, -2)) * self.scale + self.pos_embed(q)
        # B * num_heads, num_blocks, block_size ** 2, win_size ** 2
        attn = attn.softmax(dim=-1)

        out = (attn @ v).transpose(1, 3)  # B * num_heads, dim_head_v, block_size ** 2, num_blocks
        # fold
        out = out.reshape(-1, self.block_size_ds, self.block_size_ds, num_h_blocks, num_w_blocks)
        out = (
            out.permute(0, 3, 1, 4, 2)
            .contiguous()
            .view(B, self.dim_out_v, H // self.block_stride, W // self.block_stride)
        )
        # B, dim_out, H // block_stride, W // block_stride
        return self.pool(out)


def _shortcut(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """``byobnet.py`` create_shortcut with the ByoModelCfg default ``downsample='conv1x1'``."""
    if in_chs != out_chs or stride != 1:
        return ConvNormAct(in_chs, out_chs, 1, stride=stride, act=None)
    return nn.Identity()


class BottleneckBlock(nn.Module):
    """``byobnet.py`` BottleneckBlock: 1x1 - kxk - 1x1, residual, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, bottle_ratio: float = 1.0) -> None:
        super().__init__()
        mid_chs = make_divisible(out_chs * bottle_ratio)
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1)
        self.conv2_kxk = ConvNormAct(mid_chs, mid_chs, 3, stride=stride)
        self.conv2b_kxk = nn.Identity()
        self.attn = nn.Identity()
        self.conv3_1x1 = ConvNormAct(mid_chs, out_chs, 1, act=None)
        self.attn_last = nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1_1x1(x)
        x = self.conv2_kxk(x)
        x = self.conv2b_kxk(x)
        x = self.attn(x)
        x = self.conv3_1x1(x)
        x = self.attn_last(x)
        x = self.drop_path(x)
        if self.shortcut is not None:
            x = x + self.shortcut(shortcut)
        return self.act(x)


class SelfAttnBlock(nn.Module):
    """``byobnet.py`` SelfAttnBlock: 1x1 - self attention - norm/act - 1x1, residual, ReLU."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        bottle_ratio: float = 1.0,
        num_heads: int = 2,
        block_size: int = 4,
        halo_size: int = 1,
    ) -> None:
        super().__init__()
        mid_chs = make_divisible(out_chs * bottle_ratio)
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1)
        self.conv2_kxk = nn.Identity()
        self.self_attn = HaloAttn(mid_chs, stride, num_heads, block_size, halo_size)
        self.post_attn = BatchNormAct2d(mid_chs)
        self.conv3_1x1 = ConvNormAct(mid_chs, out_chs, 1, act=None)
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1_1x1(x)
        x = self.conv2_kxk(x)
        x = self.self_attn(x)
        x = self.post_attn(x)
        x = self.conv3_1x1(x)
        x = self.drop_path(x)
        if self.shortcut is not None:
            x = x + self.shortcut(shortcut)
        return self.act(x)


class HaloNet(nn.Module):
    """halonet26t in small: a bottleneck stage, then halo attention blocks (one strided), pool, fc."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 16, 3, stride=2)
        self.stages = nn.Sequential(
            BottleneckBlock(16, 32, bottle_ratio=0.5),
            SelfAttnBlock(32, 32, bottle_ratio=0.5),
            SelfAttnBlock(32, 64, stride=2, bottle_ratio=0.5),
        )
        self.head = ClassifierHead(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# --- MaxViT (maxxvit.py, maxvit_tiny_tf: _tf_cfg) -----------------------------------------------------------

MAXVIT_CONV_EPS = 1e-3  # _tf_cfg: conv norm_eps
MAXVIT_ATTN_EPS = 1e-5  # _tf_cfg: transformer norm_eps


def generate_lookup_tensor(length: int) -> torch.Tensor:
    """``pos_embed_rel.py``: one-hot ``ret[n, m, v] = 1{m - n + length - 1 = v}``."""
    max_relative_position = length - 1
    vocab_size = 2 * max_relative_position + 1
    ret = torch.zeros(length, length, vocab_size)
    for i in range(length):
        for x in range(length):
            ret[i, x, x - i + max_relative_position] = 1
    return ret


def reindex_2d_einsum_lookup(
    relative_position_tensor: torch.Tensor,
    height: int,
    width: int,
    height_lookup: torch.Tensor,
    width_lookup: torch.Tensor,
) -> torch.Tensor:
    reindexed_tensor = torch.einsum("nhw,ixh->nixw", relative_position_tensor, height_lookup)
    reindexed_tensor = torch.einsum("nixw,jyw->nijxy", reindexed_tensor, width_lookup)
    area = height * width
    return reindexed_tensor.reshape(relative_position_tensor.shape[0], area, area)


class RelPosBiasTf(nn.Module):
    def __init__(self, window_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        vocab_height = 2 * window_size[0] - 1
        vocab_width = 2 * window_size[1] - 1
        self.relative_position_bias_table = nn.Parameter(
            torch.randn(num_heads, vocab_height, vocab_width) * 0.02
        )
        self.register_buffer("height_lookup", generate_lookup_tensor(window_size[0]), persistent=False)
        self.register_buffer("width_lookup", generate_lookup_tensor(window_size[1]), persistent=False)

    def get_bias(self) -> torch.Tensor:
        return reindex_2d_einsum_lookup(
            self.relative_position_bias_table,
            self.window_size[0],
            self.window_size[1],
            self.height_lookup,
            self.width_lookup,
        )

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return attn + self.get_bias()


class AttentionCl(nn.Module):
    """Channels-last attention, ``head_first=False`` (TF weights), fused (``use_fused_attn()``)."""

    def __init__(self, dim: int, dim_head: int, window_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = dim // dim_head
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.rel_pos = RelPosBiasTf(window_size, self.num_heads)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        restore_shape = x.shape[:-1]
        q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
        attn_bias = self.rel_pos.get_bias()
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=0.0)
        x = x.transpose(1, 2).reshape((*restore_shape, -1))
        x = self.proj(x)
        return self.proj_drop(x)


def window_partition(x: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // window_size[0], window_size[0], W // window_size[1], window_size[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size[0], window_size[1], C)


def window_reverse(
    windows: torch.Tensor, window_size: tuple[int, int], img_size: tuple[int, int]
) -> torch.Tensor:
    H, W = img_size
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size[0], W // window_size[1], window_size[0], window_size[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def grid_partition(x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, grid_size[0], H // grid_size[0], grid_size[1], W // grid_size[1], C)
    return x.permute(0, 2, 4, 1, 3, 5).contiguous().view(-1, grid_size[0], grid_size[1], C)


def grid_reverse(
    windows: torch.Tensor, grid_size: tuple[int, int], img_size: tuple[int, int]
) -> torch.Tensor:
    H, W = img_size
    C = windows.shape[-1]
    x = windows.view(-1, H // grid_size[0], W // grid_size[1], grid_size[0], grid_size[1], C)
    return x.permute(0, 3, 1, 4, 2, 5).contiguous().view(-1, H, W, C)


class PartitionAttentionCl(nn.Module):
    def __init__(self, dim: int, partition_type: str, partition_size: int, dim_head: int) -> None:
        super().__init__()
        self.partition_block = partition_type == "block"
        self.partition_size = (partition_size, partition_size)
        self.norm1 = nn.LayerNorm(dim, eps=MAXVIT_ATTN_EPS)
        self.attn = AttentionCl(dim, dim_head, self.partition_size)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=MAXVIT_ATTN_EPS)
        self.mlp = Mlp(dim, dim * 4)
        self.mlp.act = gelu_tanh()
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def _partition_attn(self, x: torch.Tensor) -> torch.Tensor:
        img_size = (x.shape[1], x.shape[2])
        if self.partition_block:
            partitioned = window_partition(x, self.partition_size)
        else:
            partitioned = grid_partition(x, self.partition_size)
        partitioned = self.attn(partitioned)
        if self.partition_block:
            return window_reverse(partitioned, self.partition_size, img_size)
        return grid_reverse(partitioned, self.partition_size, img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._partition_attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Downsample2d(nn.Module):
    """``maxxvit.py`` Downsample2d, ``pool_type='avg2'``, ``padding='same'``."""

    def __init__(self, dim: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.pool = AvgPool2dSame(2, 2)
        self.expand = nn.Conv2d(dim, dim_out, 1, bias=bias) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


class MbConvBlock(nn.Module):
    """``maxxvit.py`` MbConvBlock: pre-norm, 1x1 expand, depthwise kxk (stride 'dw'), SE, 1x1 project."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        mid_chs = make_divisible(out_chs * 4.0)
        self.shortcut = Downsample2d(in_chs, out_chs) if stride == 2 else nn.Identity()
        self.pre_norm = BatchNormAct2d(in_chs, eps=MAXVIT_CONV_EPS, act=None)
        self.down = nn.Identity()
        self.conv1_1x1 = create_conv2d(in_chs, mid_chs, 1)
        self.norm1 = BatchNormAct2d(mid_chs, eps=MAXVIT_CONV_EPS, act=gelu_tanh)
        self.conv2_kxk = create_conv2d(mid_chs, mid_chs, 3, stride=stride, groups=mid_chs)
        self.se_early = None
        self.norm2 = BatchNormAct2d(mid_chs, eps=MAXVIT_CONV_EPS, act=gelu_tanh)
        self.se = SEModule(mid_chs, rd_channels=int(0.25 * out_chs), act=nn.SiLU)
        self.conv3_1x1 = create_conv2d(mid_chs, out_chs, 1, bias=True)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.pre_norm(x)
        x = self.down(x)
        x = self.conv1_1x1(x)
        x = self.norm1(x)
        x = self.conv2_kxk(x)
        x = self.norm2(x)
        x = self.se(x)
        x = self.conv3_1x1(x)
        return self.drop_path(x) + shortcut


class MaxxVitBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, stride: int, partition_size: int, dim_head: int) -> None:
        super().__init__()
        self.conv = MbConvBlock(dim, dim_out, stride=stride)
        self.attn_block = PartitionAttentionCl(dim_out, "block", partition_size, dim_head)
        self.attn_grid = PartitionAttentionCl(dim_out, "grid", partition_size, dim_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x.permute(0, 2, 3, 1)  # to NHWC (channels-last)
        x = self.attn_block(x)
        x = self.attn_grid(x)
        return x.permute(0, 3, 1, 2)  # back to NCHW


class MaxxVitStem(nn.Module):
    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = create_conv2d(in_chs, out_chs, 3, stride=2, bias=True)
        self.norm1 = BatchNormAct2d(out_chs, eps=MAXVIT_CONV_EPS, act=gelu_tanh)
        self.conv2 = create_conv2d(out_chs, out_chs, 3, stride=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class MaxVit(nn.Module):
    """maxvit_tiny_tf in small: embed_dim (16, 32), depths (1, 2), block type 'M', window = grid = 4,
    dim_head 8, head_hidden_size 32. Input 64 px. Each stage's first block strides 2 in its depthwise conv
    (a Conv2dSame), the others do not (a plain Conv2d with static 'SAME' padding)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = MaxxVitStem(3, 16)
        self.stages = nn.Sequential(
            nn.Sequential(MaxxVitBlock(16, 16, stride=2, partition_size=4, dim_head=8)),
            nn.Sequential(
                MaxxVitBlock(16, 32, stride=2, partition_size=4, dim_head=8),
                MaxxVitBlock(32, 32, stride=1, partition_size=4, dim_head=8),
            ),
        )
        self.norm = nn.Identity()
        self.head = NormMlpClassifierHead(32, num_classes, hidden_size=32, eps=MAXVIT_ATTN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stages(self.stem(x))))


# --- TF EfficientNet-Lite (efficientnet.py _gen_efficientnet_lite, efficientnet_blocks.py; tf_ variants) -------

BN_EPS_TF = 1e-3  # timm's BN_EPS_TF_DEFAULT: the tf_ ports keep TensorFlow's BatchNorm epsilon


class DepthwiseSeparableConv(nn.Module):
    """``efficientnet_blocks.py`` DepthwiseSeparableConv (no SE, as in -Lite): depthwise kxk, BN+act,
    pointwise, BN without act; the skip where stride 1 keeps the width."""

    def __init__(self, in_chs: int, out_chs: int, k: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = create_conv2d(in_chs, in_chs, k, stride=stride, groups=in_chs)
        self.bn1 = BatchNormAct2d(in_chs, eps=BN_EPS_TF, act=nn.ReLU6)
        self.conv_pw = create_conv2d(in_chs, out_chs, 1)
        self.bn2 = BatchNormAct2d(out_chs, eps=BN_EPS_TF, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return y + x if self.has_skip else y


class TfInvertedResidual(nn.Module):
    """``efficientnet_blocks.py`` InvertedResidual (no SE): pointwise expand, BN+act, depthwise kxk (a
    ``Conv2dSame`` where it strides), BN+act, pointwise linear, BN; the skip where stride 1 keeps the width."""

    def __init__(self, in_chs: int, out_chs: int, k: int, stride: int, exp_ratio: float = 6.0) -> None:
        super().__init__()
        mid = make_divisible(in_chs * exp_ratio)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = create_conv2d(in_chs, mid, 1)
        self.bn1 = BatchNormAct2d(mid, eps=BN_EPS_TF, act=nn.ReLU6)
        self.conv_dw = create_conv2d(mid, mid, k, stride=stride, groups=mid)
        self.bn2 = BatchNormAct2d(mid, eps=BN_EPS_TF, act=nn.ReLU6)
        self.conv_pwl = create_conv2d(mid, out_chs, 1)
        self.bn3 = BatchNormAct2d(out_chs, eps=BN_EPS_TF, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return y + x if self.has_skip else y


class TfEfficientNetLite(nn.Module):
    """tf_efficientnet_lite0 in small: stem 3x3 stride 2 (a ``Conv2dSame``), ds_r1_k3_s1_c8, ir_r2_k3_s2_e6_c12,
    ir_r1_k5_s2_e6_c16 (a 5x5 ``Conv2dSame`` depthwise: TF 'SAME' pads it 1+2 or 2+2 by the input's size),
    head 1x1 to 64, pool, classifier. ReLU6, BatchNorm eps 1e-3, no squeeze-excite."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_stem = create_conv2d(3, 16, 3, stride=2)
        self.bn1 = BatchNormAct2d(16, eps=BN_EPS_TF, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            nn.Sequential(DepthwiseSeparableConv(16, 8)),
            nn.Sequential(TfInvertedResidual(8, 12, 3, 2), TfInvertedResidual(12, 12, 3, 1)),
            nn.Sequential(TfInvertedResidual(12, 16, 5, 2)),
        )
        self.conv_head = create_conv2d(16, 64, 1)
        self.bn2 = BatchNormAct2d(64, eps=BN_EPS_TF, act=nn.ReLU6)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean((2, 3)))


# --- EfficientViT, MIT (efficientvit_mit.py) ------------------------------------------------------------------


class EvConvNormAct(nn.Module):
    """``efficientvit_mit.py`` ConvNormAct: dropout, conv, norm (or Identity), act (or Identity)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: Act | None = nn.ReLU,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.0, inplace=False)
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(self.dropout(x))))


class DSConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, fewer_norm: bool, act: Act) -> None:
        super().__init__()
        self.depth_conv = EvConvNormAct(
            cin, cin, 3, stride, groups=cin, bias=fewer_norm, norm=not fewer_norm, act=act
        )
        self.point_conv = EvConvNormAct(cin, cout, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class ConvBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, expand_ratio: float, fewer_norm: bool, act: Act
    ) -> None:
        super().__init__()
        mid = round(cin * expand_ratio)
        self.conv1 = EvConvNormAct(cin, mid, 3, stride, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.conv2 = EvConvNormAct(mid, cout, 3, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class EvMBConv(nn.Module):
    """``efficientvit_mit.py`` MBConv: 1x1 expand, depthwise 3x3, 1x1 project."""

    def __init__(
        self, cin: int, cout: int, stride: int, expand_ratio: float, fewer_norm: bool, act: Act
    ) -> None:
        super().__init__()
        mid = round(cin * expand_ratio)
        self.inverted_conv = EvConvNormAct(cin, mid, 1, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.depth_conv = EvConvNormAct(
            mid, mid, 3, stride, groups=mid, bias=fewer_norm, norm=not fewer_norm, act=act
        )
        self.point_conv = EvConvNormAct(mid, cout, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class FusedMBConv(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, expand_ratio: float, fewer_norm: bool, act: Act
    ) -> None:
        super().__init__()
        mid = round(cin * expand_ratio)
        self.spatial_conv = EvConvNormAct(cin, mid, 3, stride, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.point_conv = EvConvNormAct(mid, cout, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


def build_local_block(
    cin: int,
    cout: int,
    stride: int,
    expand_ratio: float,
    act: Act,
    fewer_norm: bool = False,
    block_type: str = "default",
) -> nn.Module:
    if expand_ratio == 1:
        if block_type == "default":
            return DSConv(cin, cout, stride, fewer_norm, act)
        return ConvBlock(cin, cout, stride, 1, fewer_norm, act)
    if block_type == "default":
        return EvMBConv(cin, cout, stride, expand_ratio, fewer_norm, act)
    return FusedMBConv(cin, cout, stride, expand_ratio, fewer_norm, act)


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention (ReLU kernel, 5x5 aggregation, chunk of q/k/v)."""

    def __init__(
        self, in_channels: int, out_channels: int, dim: int = 8, scales: tuple[int, ...] = (5,)
    ) -> None:
        super().__init__()
        self.eps = 1e-5
        heads = int(in_channels // dim * 1.0)
        total_dim = heads * dim
        self.dim = dim
        self.qkv = EvConvNormAct(in_channels, 3 * total_dim, 1, norm=False, act=None)
        self.aggreg = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(
                        3 * total_dim,
                        3 * total_dim,
                        scale,
                        padding=scale // 2,
                        groups=3 * total_dim,
                        bias=False,
                    ),
                    nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=False),
                )
                for scale in scales
            ]
        )
        self.kernel_func = nn.ReLU(inplace=False)
        self.proj = EvConvNormAct(total_dim * (1 + len(scales)), out_channels, 1, act=None)

    def _attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        kv = k.transpose(-1, -2) @ v
        out = q @ kv
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return out.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape

        # generate multi-scale q, k, v
        qkv = self.qkv(x)
        multi_scale_qkv = [qkv]
        for op in self.aggreg:
            multi_scale_qkv.append(op(qkv))
        ms = torch.cat(multi_scale_qkv, dim=1)
        ms = ms.reshape(B, -1, 3 * self.dim, H * W).transpose(-1, -2)
        q, k, v = ms.chunk(3, dim=-1)

        # lightweight global attention
        q = self.kernel_func(q)
        k = self.kernel_func(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)

        with torch.autocast(device_type=v.device.type, enabled=False):
            out = self._attn(q, k, v)

        # final projection
        out = out.transpose(-1, -2).reshape(B, -1, H, W)
        return self.proj(out)


class ResidualBlock(nn.Module):
    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.pre_norm = nn.Identity()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.main(self.pre_norm(x))
        if self.shortcut is not None:
            res = res + self.shortcut(x)
        return res


class EfficientVitBlock(nn.Module):
    def __init__(self, in_channels: int, head_dim: int, expand_ratio: float, act: Act) -> None:
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(in_channels, in_channels, dim=head_dim), nn.Identity())
        self.local_module = ResidualBlock(
            build_local_block(in_channels, in_channels, 1, expand_ratio, act, fewer_norm=True), nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class EvStem(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, depth: int, act: Act, block_type: str = "default") -> None:
        super().__init__()
        self.add_module("in_conv", EvConvNormAct(in_chs, out_chs, 3, 2, act=act))
        for i in range(depth):
            block = build_local_block(out_chs, out_chs, 1, 1, act, block_type=block_type)
            self.add_module(f"res{i}", ResidualBlock(block, nn.Identity()))


class EfficientVitStage(nn.Module):
    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        act: Act,
        expand_ratio: float,
        head_dim: int,
        vit_stage: bool,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            ResidualBlock(
                build_local_block(in_chs, out_chs, 2, expand_ratio, act, fewer_norm=vit_stage), None
            )
        ]
        if vit_stage:
            blocks += [EfficientVitBlock(out_chs, head_dim, expand_ratio, act) for _ in range(depth)]
        else:
            blocks += [
                ResidualBlock(build_local_block(out_chs, out_chs, 1, expand_ratio, act), nn.Identity())
                for _ in range(1, depth)
            ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class EfficientVitLargeStage(nn.Module):
    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        act: Act,
        head_dim: int,
        vit_stage: bool,
        fewer_norm: bool,
    ) -> None:
        super().__init__()
        block_type = "default" if fewer_norm else "fused"
        first = build_local_block(
            in_chs, out_chs, 2, 24 if vit_stage else 16, act, vit_stage or fewer_norm, block_type
        )
        blocks: list[nn.Module] = [ResidualBlock(first, None)]
        if vit_stage:
            blocks += [EfficientVitBlock(out_chs, head_dim, 6, act) for _ in range(depth)]
        else:
            blocks += [
                ResidualBlock(
                    build_local_block(out_chs, out_chs, 1, 4, act, fewer_norm, block_type), nn.Identity()
                )
                for _ in range(depth)
            ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class EvClassifierHead(nn.Module):
    def __init__(
        self, in_channels: int, widths: tuple[int, int], num_classes: int, act: Act, eps: float
    ) -> None:
        super().__init__()
        self.in_conv = EvConvNormAct(in_channels, widths[0], 1, act=act)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Sequential(
            nn.Linear(widths[0], widths[1], bias=False),
            nn.LayerNorm(widths[1], eps=eps),
            act(),
            nn.Dropout(0.0, inplace=False),
            nn.Linear(widths[1], num_classes, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.global_pool(self.in_conv(x)))


class EfficientVit(nn.Module):
    """efficientvit_b0 in small: widths (8, 16, 24, 32, 48), depths (1, 1, 1, 1, 1), head_dim 8,
    head_widths (64, 80), Hardswish. Input 64 px."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths, depths, act = (8, 16, 24, 32, 48), (1, 1, 1, 1, 1), nn.Hardswish
        self.stem = EvStem(3, widths[0], depths[0], act)
        self.stages = nn.Sequential(
            *[
                EfficientVitStage(widths[i], widths[i + 1], depths[i + 1], act, 4, 8, vit_stage=i >= 2)
                for i in range(4)
            ]
        )
        self.head = EvClassifierHead(widths[-1], (64, 80), num_classes, act, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class EfficientVitLarge(nn.Module):
    """efficientvit_l1 in small: widths (8, 8, 16, 16, 24), depths (1, 1, 1, 1, 1), head_dim 8, GELU (tanh),
    norm eps 1e-7; the fused (FusedMBConv) stages. Input 64 px."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths, depths, act = (8, 8, 16, 16, 24), (1, 1, 1, 1, 1), gelu_tanh
        self.stem = EvStem(3, widths[0], depths[0], act, block_type="large")
        self.stages = nn.Sequential(
            *[
                EfficientVitLargeStage(
                    widths[i], widths[i + 1], depths[i + 1], act, 8, vit_stage=i >= 3, fewer_norm=i >= 2
                )
                for i in range(4)
            ]
        )
        for m in self.modules():  # norm_layer = partial(BatchNorm2d, eps=1e-7)
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-7
        self.head = EvClassifierHead(widths[-1], (48, 64), num_classes, act, 1e-7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# --- EfficientViT, MSRA (efficientvit_msra.py) ----------------------------------------------------------------


class MsraConvNorm(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, pad, 1, groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class MsraNormLinear(nn.Sequential):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(0.0)
        self.linear = nn.Linear(in_features, out_features, bias=True)


class MsraPatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hid_dim = int(dim * 4)
        self.conv1 = MsraConvNorm(dim, hid_dim, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = MsraConvNorm(hid_dim, hid_dim, 3, 2, 1, groups=hid_dim)
        self.se = SEModule(hid_dim, 0.25)
        self.conv3 = MsraConvNorm(hid_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class ResidualDrop(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m
        self.drop = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class MsraConvMlp(nn.Module):
    def __init__(self, ed: int, h: int) -> None:
        super().__init__()
        self.pw1 = MsraConvNorm(ed, h)
        self.act = nn.ReLU()
        self.pw2 = MsraConvNorm(h, ed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


def _offset_idxs(resolution: int) -> torch.Tensor:
    points = list(itertools.product(range(resolution), range(resolution)))
    attention_offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            if offset not in attention_offsets:
                attention_offsets[offset] = len(attention_offsets)
            idxs.append(attention_offsets[offset])
    return torch.tensor(idxs, dtype=torch.long).view(len(points), len(points))


class CascadedGroupAttention(AttentionBiasCache):
    attention_bias_cache: dict[str, torch.Tensor]

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        kernels: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.attn_ratio = attn_ratio
        self.qkvs = nn.ModuleList(
            [MsraConvNorm(dim // num_heads, self.key_dim * 2 + self.val_dim) for _ in range(num_heads)]
        )
        self.dws = nn.ModuleList(
            [
                MsraConvNorm(self.key_dim, self.key_dim, kernels[i], 1, kernels[i] // 2, groups=self.key_dim)
                for i in range(num_heads)
            ]
        )
        self.proj = nn.Sequential(nn.ReLU(), MsraConvNorm(self.val_dim * num_heads, dim))
        self.resolution = resolution
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", _offset_idxs(resolution), persistent=False)
        self.attention_bias_cache = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape  # noqa: RUF059
        feats_in = x.chunk(len(self.qkvs), dim=1)
        feats_out = []
        feat = feats_in[0]
        attn_bias = self.get_attention_biases(x.device)
        for head_idx, (qkv, dws) in enumerate(zip(self.qkvs, self.dws)):
            if head_idx > 0:
                feat = feat + feats_in[head_idx]
            feat = qkv(feat)
            q, k, v = feat.view(B, -1, H, W).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dws(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            q = q * self.scale
            attn = q.transpose(-2, -1) @ k
            attn = attn + attn_bias[head_idx]
            attn = attn.softmax(dim=-1)
            feat = v @ attn.transpose(-2, -1)
            feat = feat.view(B, self.val_dim, H, W)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, 1))


class LocalWindowAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        window_resolution: int,
        kernels: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.window_resolution = window_resolution
        window_resolution = min(window_resolution, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio, window_resolution, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = W = self.resolution
        B, C, H_, W_ = x.shape  # noqa: RUF059
        if H <= self.window_resolution and W <= self.window_resolution:  # noqa: SIM300  (timm's code)
            return self.attn(x)
        x = x.permute(0, 2, 3, 1)
        pad_b = (self.window_resolution - H % self.window_resolution) % self.window_resolution
        pad_r = (self.window_resolution - W % self.window_resolution) % self.window_resolution
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH = pH // self.window_resolution
        nW = pW // self.window_resolution
        # window partition, BHWC -> B(nHh)(nWw)C -> BnHnWhwC -> (BnHnW)hwC -> (BnHnW)Chw
        x = x.view(B, nH, self.window_resolution, nW, self.window_resolution, C).transpose(2, 3)
        x = x.reshape(B * nH * nW, self.window_resolution, self.window_resolution, C).permute(0, 3, 1, 2)
        x = self.attn(x)
        # window reverse, (BnHnW)Chw -> (BnHnW)hwC -> BnHnWhwC -> B(nHh)(nWw)C -> BHWC
        x = x.permute(0, 2, 3, 1).view(B, nH, nW, self.window_resolution, self.window_resolution, C)
        x = x.transpose(2, 3).reshape(B, pH, pW, C)
        x = x[:, :H, :W].contiguous()
        return x.permute(0, 3, 1, 2)


class MsraBlock(nn.Module):
    """``efficientvit_msra.py`` EfficientVitBlock."""

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        window_resolution: int,
        kernels: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.dw0 = ResidualDrop(MsraConvNorm(dim, dim, 3, 1, 1, groups=dim))
        self.ffn0 = ResidualDrop(MsraConvMlp(dim, int(dim * 2)))
        self.mixer = ResidualDrop(
            LocalWindowAttention(dim, key_dim, num_heads, attn_ratio, resolution, window_resolution, kernels)
        )
        self.dw1 = ResidualDrop(MsraConvNorm(dim, dim, 3, 1, 1, groups=dim))
        self.ffn1 = ResidualDrop(MsraConvMlp(dim, int(dim * 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class MsraStage(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        subsample: bool,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        window_resolution: int,
        kernels: tuple[int, ...],
        depth: int,
    ) -> None:
        super().__init__()
        self.downsample: nn.Module
        if subsample:
            self.resolution = (resolution - 1) // 2 + 1
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        (
                            "res1",
                            nn.Sequential(
                                ResidualDrop(MsraConvNorm(in_dim, in_dim, 3, 1, 1, groups=in_dim)),
                                ResidualDrop(MsraConvMlp(in_dim, int(in_dim * 2))),
                            ),
                        ),
                        ("patchmerge", MsraPatchMerging(in_dim, out_dim)),
                        (
                            "res2",
                            nn.Sequential(
                                ResidualDrop(MsraConvNorm(out_dim, out_dim, 3, 1, 1, groups=out_dim)),
                                ResidualDrop(MsraConvMlp(out_dim, int(out_dim * 2))),
                            ),
                        ),
                    ]
                )
            )
        else:
            self.downsample = nn.Identity()
            self.resolution = resolution
        self.blocks = nn.Sequential(
            *[
                MsraBlock(
                    out_dim, key_dim, num_heads, attn_ratio, self.resolution, window_resolution, kernels
                )
                for _ in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class MsraPatchEmbedding(nn.Sequential):
    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.add_module("conv1", MsraConvNorm(in_chans, dim // 8, 3, 2, 1))
        self.add_module("relu1", nn.ReLU())
        self.add_module("conv2", MsraConvNorm(dim // 8, dim // 4, 3, 2, 1))
        self.add_module("relu2", nn.ReLU())
        self.add_module("conv3", MsraConvNorm(dim // 4, dim // 2, 3, 2, 1))
        self.add_module("relu3", nn.ReLU())
        self.add_module("conv4", MsraConvNorm(dim // 2, dim, 3, 2, 1))


class EfficientVitMsra(nn.Module):
    """efficientvit_m0 in small: img 128 (8x8 tokens), embed_dim (16, 32), key_dim (4, 4), depth (1, 1),
    num_heads (2, 2), window_size (4, 4), kernels (5, 5): stage 0 attends in 2x2 windows of 4x4 tokens,
    stage 1 (2x2 tokens after subsampling) over the whole map."""

    def __init__(self, num_classes: int = 10, img_size: int = 128) -> None:
        super().__init__()
        embed_dim, key_dim, num_heads, window, kernels = (16, 32), (4, 4), (2, 2), (4, 4), (5, 5)
        self.patch_embed = MsraPatchEmbedding(3, embed_dim[0])
        resolution = img_size // 16
        attn_ratio = [embed_dim[i] / (key_dim[i] * num_heads[i]) for i in range(2)]
        stages = []
        pre_ed = embed_dim[0]
        for i in range(2):
            stage = MsraStage(
                pre_ed,
                embed_dim[i],
                key_dim[i],
                i > 0,
                num_heads[i],
                attn_ratio[i],
                resolution,
                window[i],
                kernels,
                depth=1,
            )
            pre_ed = embed_dim[i]
            resolution = stage.resolution
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = MsraNormLinear(embed_dim[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.global_pool(self.stages(self.patch_embed(x))))


# --- XCiT (xcit.py) -------------------------------------------------------------------------------------------


class PositionalEncodingFourier(nn.Module):
    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale = 2 * math.pi
        self.temperature = temperature
        self.hidden_dim = hidden_dim
        self.dim = dim
        self.eps = 1e-6

    def forward(self, B: int, H: int, W: int) -> torch.Tensor:
        device = self.token_projection.weight.device
        dtype = self.token_projection.weight.dtype
        y_embed = torch.arange(1, H + 1, device=device).to(torch.float32).unsqueeze(1).repeat(1, 1, W)
        x_embed = torch.arange(1, W + 1, device=device).to(torch.float32).repeat(1, H, 1)
        y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.hidden_dim, device=device).to(torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack([pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()], dim=4).flatten(3)
        pos_y = torch.stack([pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()], dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        pos = self.token_projection(pos.to(dtype))
        return pos.repeat(B, 1, 1, 1)  # (B, C, H, W)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ConvPatchEmbed(nn.Module):
    """``patch_size == 8``: three strided conv3x3 + BN, GELU between."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            conv3x3(in_chans, embed_dim // 4, 2),
            nn.GELU(),
            conv3x3(embed_dim // 4, embed_dim // 2, 2),
            nn.GELU(),
            conv3x3(embed_dim // 2, embed_dim, 2),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        Hp, Wp = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return x, (Hp, Wp)


class LPI(nn.Module):
    def __init__(self, in_features: int, kernel_size: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size, padding=padding, groups=in_features)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(in_features)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size, padding=padding, groups=in_features)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = x.permute(0, 2, 1).reshape(B, C, H, W)
        x = self.conv1(x)
        x = self.act(x)
        x = self.bn(x)
        x = self.conv2(x)
        return x.reshape(B, C, N).permute(0, 2, 1)


class ClassAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttn(dim, num_heads)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = nn.Identity()
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.gamma2 = nn.Parameter(torch.ones(dim))
        self.tokens_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm1 = self.norm1(x)
        x_attn = torch.cat([self.attn(x_norm1), x_norm1[:, 1:]], dim=1)
        x = x + self.drop_path1(self.gamma1 * x_attn)
        if self.tokens_norm:  # noqa: SIM108  (timm's code)
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, 0:1]), x[:, 1:]], dim=1)
        x_res = x
        cls_token = x[:, 0:1]
        cls_token = self.gamma2 * self.mlp(cls_token)
        x = torch.cat([cls_token, x[:, 1:]], dim=1)
        return x_res + self.drop_path2(x)


class XCA(nn.Module):
    """Cross-covariance attention; ``use_fused_attn(experimental=True)`` is False by default: the explicit
    path."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # Result of next line is (qkv, B, num (H)eads,  (C')hannels per head, N)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        # Paper section 3.2 l2-Normalization and temperature scaling
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.permute(0, 3, 1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class XCABlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = XCA(dim, num_heads)
        self.drop_path1 = nn.Identity()
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.local_mp = LPI(dim)
        self.drop_path3 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = nn.Identity()
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.gamma3 = nn.Parameter(torch.ones(dim))
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path1(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path3(self.gamma3 * self.local_mp(self.norm3(x), H, W))
        return x + self.drop_path2(self.gamma2 * self.mlp(self.norm2(x)))


class Xcit(nn.Module):
    """xcit_nano_12_p8 in small: embed_dim 32, depth 2, num_heads 4, cls_attn_layers 2, patch 8. Input 32 px
    (4x4 tokens)."""

    def __init__(
        self, num_classes: int = 10, embed_dim: int = 32, depth: int = 2, num_heads: int = 4
    ) -> None:
        super().__init__()
        self.patch_embed = ConvPatchEmbed(3, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([XCABlock(embed_dim, num_heads) for _ in range(depth)])
        self.cls_attn_blocks = nn.ModuleList([ClassAttentionBlock(embed_dim, num_heads) for _ in range(2)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x, (Hp, Wp) = self.patch_embed(x)
        pos_encoding = self.pos_embed(B, Hp, Wp).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
        x = x + pos_encoding
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, Hp, Wp)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        for cblk in self.cls_attn_blocks:
            x = cblk(x)
        x = self.norm(x)
        x = x[:, 0]
        return self.head(self.head_drop(x))


# --- GC-ViT (gcvit.py) ----------------------------------------------------------------------------------------


class GcMbConvBlock(nn.Module):
    """``gcvit.py`` MbConvBlock: depthwise 3x3, GELU, SE (no bias, GELU), 1x1, residual; no norm."""

    def __init__(self, in_chs: int, expand_ratio: float = 1.0) -> None:
        super().__init__()
        mid_chs = int(expand_ratio * in_chs)
        self.conv_dw = nn.Conv2d(in_chs, mid_chs, 3, 1, 1, groups=in_chs, bias=False)
        self.act = nn.GELU()
        self.se = SEModule(mid_chs, rd_ratio=0.25, bias=False, act=nn.GELU)
        self.conv_pw = nn.Conv2d(mid_chs, in_chs, 1, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = self.act(x)
        x = self.se(x)
        x = self.conv_pw(x)
        return x + shortcut


class GcDownsample2d(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.conv_block = GcMbConvBlock(dim)
        self.reduction = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False)
        self.norm2 = LayerNorm2d(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.reduction(self.conv_block(self.norm1(x))))


class FeatureBlock(nn.Module):
    def __init__(self, dim: int, levels: int = 0) -> None:
        super().__init__()
        reductions = levels
        levels = max(1, levels)
        self.blocks = nn.Sequential()
        for i in range(levels):
            self.blocks.add_module(f"conv{i + 1}", GcMbConvBlock(dim))
            if reductions:
                self.blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
                reductions -= 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class GcStem(nn.Module):
    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1)
        self.down = GcDownsample2d(out_chs, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.conv1(x))


def _relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """``pos_embed_rel.py`` gen_relative_position_index (no class token)."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size[0]), torch.arange(window_size[1]), indexing="ij")
    ).flatten(1)
    relative_coords = coords[:, :, None] - coords[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0)
    relative_coords[:, :, 0] += window_size[0] - 1
    relative_coords[:, :, 1] += window_size[1] - 1
    relative_coords[:, :, 0] *= 2 * window_size[1] - 1
    return relative_coords.sum(-1)


class RelPosBias(nn.Module):
    def __init__(self, window_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        self.bias_shape = (self.window_area, self.window_area, num_heads)
        num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.randn(num_relative_distance, num_heads) * 0.02)
        self.register_buffer(
            "relative_position_index", _relative_position_index(window_size).view(-1), persistent=False
        )

    def get_bias(self) -> torch.Tensor:
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index]
        relative_position_bias = relative_position_bias.view(self.bias_shape).permute(2, 0, 1)
        return relative_position_bias.unsqueeze(0).contiguous()

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return attn + self.get_bias()


class WindowAttentionGlobal(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, window_size: tuple[int, int], use_global: bool = True
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.use_global = use_global
        self.rel_pos = RelPosBias(window_size, num_heads)
        self.qkv = nn.Linear(dim, dim * (2 if use_global else 3), bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        if self.use_global and q_global is not None:
            kv = self.qkv(x)
            kv = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
            q = q_global.repeat(B // q_global.shape[0], 1, 1, 1)
            q = q.reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1).contiguous()
        attn = self.rel_pos(attn)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class GlobalContextVitBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, window_size: tuple[int, int], mlp_ratio: float, use_global: bool
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttentionGlobal(dim, num_heads, window_size, use_global)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def _window_attn(self, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
        B, H, W, C = x.shape  # noqa: RUF059
        x_win = window_partition(x, self.window_size)
        x_win = x_win.view(-1, self.window_size[0] * self.window_size[1], C)
        attn_win = self.attn(x_win, q_global)
        return window_reverse(attn_win, self.window_size, (H, W))

    def forward(self, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._window_attn(self.norm1(x), q_global)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class GlobalContextVitStage(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        feat_size: tuple[int, int],
        window_size: tuple[int, int],
        downsample: bool,
        stage_norm: bool,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.downsample: nn.Module
        if downsample:
            self.downsample = GcDownsample2d(dim, dim * 2)
            dim = dim * 2
            feat_size = (feat_size[0] // 2, feat_size[1] // 2)
        else:
            self.downsample = nn.Identity()
        self.feat_size = feat_size
        feat_levels = int(math.log2(min(feat_size) / min(window_size)))
        self.global_block = FeatureBlock(dim, feat_levels)
        self.global_norm = nn.Identity()
        self.blocks = nn.ModuleList(
            [
                GlobalContextVitBlock(dim, num_heads, window_size, mlp_ratio, use_global=(i % 2 != 0))
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim) if stage_norm else nn.Identity()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # input NCHW, downsample & global block are 2d conv + pooling
        x = self.downsample(x)
        global_query = self.global_block(x)
        # reshape NCHW --> NHWC for transformer blocks
        x = x.permute(0, 2, 3, 1)
        global_query = self.global_norm(global_query.permute(0, 2, 3, 1))
        for blk in self.blocks:
            x = blk(x, global_query)
        x = self.norm(x)
        return x.permute(0, 3, 1, 2).contiguous()  # back to NCHW


class GlobalContextVit(nn.Module):
    """gcvit_xxtiny in small: embed_dim 16, depths (2, 2), num_heads (2, 4), window 4, mlp_ratio 3. Input
    64 px (16x16 after the stem)."""

    def __init__(self, num_classes: int = 10, img_size: int = 64) -> None:
        super().__init__()
        embed_dim, depths, num_heads, window = 16, (2, 2), (2, 4), (4, 4)
        feat_size = (img_size // 4, img_size // 4)
        self.stem = GcStem(3, embed_dim)
        stages = []
        for i in range(2):
            stage_scale = 2 ** max(i - 1, 0)
            stages.append(
                GlobalContextVitStage(
                    embed_dim * stage_scale,
                    depths[i],
                    num_heads[i],
                    (feat_size[0] // stage_scale, feat_size[1] // stage_scale),
                    window,
                    downsample=i != 0,
                    stage_norm=i == 1,
                    mlp_ratio=3.0,
                )
            )
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(embed_dim * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# --- EfficientFormer (efficientformer.py) ---------------------------------------------------------------------


class EfAttention(AttentionBiasCache):
    attention_bias_cache: dict[str, torch.Tensor]

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.attn_ratio = attn_ratio
        self.qkv = nn.Linear(dim, self.key_attn_dim * 2 + self.val_attn_dim)
        self.proj = nn.Linear(self.val_attn_dim, dim)
        pos = torch.stack(
            torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
        ).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        rel_pos = (rel_pos[0] * resolution) + rel_pos[1]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", rel_pos)
        self.attention_bias_cache = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape  # noqa: RUF059
        qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn + self.get_attention_biases(x.device)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Pooling(nn.Module):
    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ConvMlpWithNorm(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.norm1 = nn.BatchNorm2d(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)
        self.norm2 = nn.BatchNorm2d(in_features)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.norm1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.norm2(x)
        return self.drop(x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.view(1, -1, 1, 1)
        return x * gamma


class MetaBlock1d(nn.Module):
    def __init__(
        self, dim: int, key_dim: int, num_heads: int, resolution: int, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = EfAttention(dim, key_dim, num_heads, 4, resolution)
        self.ls1 = LayerScale(dim)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)
        self.drop_path2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MetaBlock2d(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.token_mixer = Pooling(3)
        self.ls1 = LayerScale2d(dim)
        self.drop_path1 = nn.Identity()
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale2d(dim)
        self.drop_path2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class EfficientFormerStage(nn.Module):
    def __init__(
        self, dim: int, dim_out: int, depth: int, downsample: bool, num_vit: int, resolution: int
    ) -> None:
        super().__init__()
        self.downsample: nn.Module
        if downsample:
            self.downsample = nn.Sequential(
                OrderedDict([("conv", nn.Conv2d(dim, dim_out, 3, 2, 1)), ("norm", nn.BatchNorm2d(dim_out))])
            )
            dim = dim_out
        else:
            self.downsample = nn.Identity()
        blocks: list[nn.Module] = []
        if num_vit and num_vit >= depth:
            blocks.append(Flat())
        for block_idx in range(depth):
            remain_idx = depth - block_idx - 1
            if num_vit and num_vit > remain_idx:
                blocks.append(MetaBlock1d(dim, key_dim=8, num_heads=2, resolution=resolution))
            else:
                blocks.append(MetaBlock2d(dim))
                if num_vit and num_vit == remain_idx:
                    blocks.append(Flat())
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class EfficientFormer(nn.Module):
    """efficientformer_l1 in small: embed_dims (16, 32, 48), depths (1, 1, 2), num_vit 1, Attention with
    key_dim 8, 2 heads at resolution 4. Input 64 px."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        dims, depths = (16, 32, 48), (1, 1, 2)
        self.stem = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, dims[0] // 2, 3, 2, 1)),
                    ("norm1", nn.BatchNorm2d(dims[0] // 2)),
                    ("act1", nn.ReLU()),
                    ("conv2", nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1)),
                    ("norm2", nn.BatchNorm2d(dims[0])),
                    ("act2", nn.ReLU()),
                ]
            )
        )
        prev = dims[0]
        stages = []
        for i in range(3):
            stages.append(
                EfficientFormerStage(
                    prev, dims[i], depths[i], i > 0, num_vit=1 if i == 2 else 0, resolution=4
                )
            )
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(dims[-1], num_classes)
        self.head_dist = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.stages(self.stem(x)))
        x = x.mean(dim=1)
        x = self.head_drop(x)
        x, x_dist = self.head(x), self.head_dist(x)
        return (x + x_dist) / 2


# --- TinyViT (tiny_vit.py) ------------------------------------------------------------------------------------


class TvConvNorm(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, pad, 1, groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class TvPatchEmbed(nn.Module):
    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = TvConvNorm(in_chs, out_chs // 2, 3, 2, 1)
        self.act = nn.GELU()
        self.conv2 = TvConvNorm(out_chs // 2, out_chs, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class TvMBConv(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, expand_ratio: float) -> None:
        super().__init__()
        mid_chs = int(in_chs * expand_ratio)
        self.conv1 = TvConvNorm(in_chs, mid_chs, ks=1)
        self.act1 = nn.GELU()
        self.conv2 = TvConvNorm(mid_chs, mid_chs, ks=3, stride=1, pad=1, groups=mid_chs)
        self.act2 = nn.GELU()
        self.conv3 = TvConvNorm(mid_chs, out_chs, ks=1)
        self.act3 = nn.GELU()
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.act2(x)
        x = self.conv3(x)
        x = self.drop_path(x)
        x += shortcut
        return self.act3(x)


class TvPatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = TvConvNorm(dim, out_dim, 1, 1, 0)
        self.act1 = nn.GELU()
        self.conv2 = TvConvNorm(out_dim, out_dim, 3, 2, 1, groups=out_dim)
        self.act2 = nn.GELU()
        self.conv3 = TvConvNorm(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class ConvLayer(nn.Module):
    def __init__(self, dim: int, depth: int, conv_expand_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[TvMBConv(dim, dim, conv_expand_ratio) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class NormMlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.norm(x))))))


class TvAttention(AttentionBiasCache):
    """``tiny_vit.py`` Attention, fused (``use_fused_attn()``): the cached bias is the SDPA mask."""

    attention_bias_cache: dict[str, torch.Tensor]

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, resolution: tuple[int, int]
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.out_dim = self.val_dim * num_heads
        self.attn_ratio = attn_ratio
        self.resolution = resolution
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (self.val_dim + 2 * key_dim))
        self.proj = nn.Linear(self.out_dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1]))
        self.register_buffer("attention_bias_idxs", _offset_idxs(resolution[0]), persistent=False)
        self.attention_bias_cache = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn_bias = self.get_attention_biases(x.device)
        B, N, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 1, 3)
        v = v.permute(0, 2, 1, 3)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        x = x.transpose(1, 2).reshape(B, N, self.out_dim)
        return self.proj(x)


class TinyVitBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        head_dim = dim // num_heads
        self.attn = TvAttention(dim, head_dim, num_heads, 1, (window_size, window_size))
        self.drop_path1 = nn.Identity()
        self.mlp = NormMlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = nn.Identity()
        self.local_conv = TvConvNorm(dim, dim, ks=3, stride=1, pad=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        L = H * W
        shortcut = x
        if H == self.window_size and W == self.window_size:  # noqa: SIM300  (timm's code)
            x = x.reshape(B, L, C)
            x = self.attn(x)
            x = x.view(B, H, W, C)
        else:
            pad_b = (self.window_size - H % self.window_size) % self.window_size
            pad_r = (self.window_size - W % self.window_size) % self.window_size
            padding = pad_b > 0 or pad_r > 0
            if padding:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            pH, pW = H + pad_b, W + pad_r
            nH = pH // self.window_size
            nW = pW // self.window_size
            x = (
                x.view(B, nH, self.window_size, nW, self.window_size, C)
                .transpose(2, 3)
                .reshape(B * nH * nW, self.window_size * self.window_size, C)
            )
            x = self.attn(x)
            x = x.view(B, nH, nW, self.window_size, self.window_size, C).transpose(2, 3).reshape(B, pH, pW, C)
            if padding:
                x = x[:, :H, :W].contiguous()
        x = shortcut + self.drop_path1(x)
        x = x.permute(0, 3, 1, 2)
        x = self.local_conv(x)
        x = x.reshape(B, C, L).transpose(1, 2)
        x = x + self.drop_path2(self.mlp(x))
        return x.view(B, H, W, C)


class TinyVitStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.downsample = TvPatchMerging(dim, out_dim)
        self.blocks = nn.Sequential(*[TinyVitBlock(out_dim, num_heads, window_size) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        x = x.permute(0, 2, 3, 1)  # BCHW -> BHWC
        x = self.blocks(x)
        return x.permute(0, 3, 1, 2)  # BHWC -> BCHW


class TinyVit(nn.Module):
    """tiny_vit_5m in small: embed_dims (16, 32, 48), depths (1, 1, 1), num_heads (1, 2, 3), window sizes
    (4, 4, 4). Input 64 px: stage 1 attends in 2x2 windows of 4x4 tokens, stage 2 over the whole 4x4 map."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        dims, heads = (16, 32, 48), (1, 2, 3)
        self.patch_embed = TvPatchEmbed(3, dims[0])
        self.stages = nn.Sequential(
            ConvLayer(dims[0], 1),
            TinyVitStage(dims[0], dims[1], 1, heads[1], 4),
            TinyVitStage(dims[1], dims[2], 1, heads[2], 4),
        )
        self.head = NormMlpClassifierHead(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.patch_embed(x)))


# --- Mix-FFN: transformers' SegformerMixMLP / PvtV2ConvFeedForwardNetwork ---------------------------------
class MixDepthWiseConv(nn.Module):
    """``SegformerDepthWiseConv`` / ``PvtV2DepthWiseConv``: tokens ``[B, N, C]`` laid out as ``[B, C, H, W]``,
    a zero-padded 3x3 depthwise conv, and back to tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch_size, _, num_channels = hidden_states.shape
        hidden_states = hidden_states.transpose(1, 2).view(batch_size, num_channels, height, width)
        hidden_states = self.dwconv(hidden_states)
        return hidden_states.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """``SegformerMixMLP`` (``relu=False``) and PVTv2's ``linear_attention`` variant (a ReLU after fc1):
    fc1 → depthwise conv → GELU → fc2, the depthwise conv between two token layouts."""

    def __init__(self, dim: int, hidden: int, relu: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.dwconv = MixDepthWiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.relu(self.fc1(x)), height, width)))


class MixFFNNet(nn.Module):
    """A SegFormer stage in small: overlapping patch embedding (7x7, stride 4), then pre-norm blocks whose MLP
    is a Mix-FFN, a final norm, mean over tokens and a classifier."""

    def __init__(self, dim: int = 16, hidden: int = 64, depth: int = 2, relu: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 7, 4, 3)
        self.norm0 = nn.LayerNorm(dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(MixFFN(dim, hidden, relu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        height, width = x.shape[2:]
        x = self.norm0(x.flatten(2).transpose(1, 2))
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x), height, width)
        return self.head(self.norm(x).mean(1))
