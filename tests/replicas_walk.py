"""Small, faithful replicas of the timm/torchvision blocks on which Torch-Pruning's tracer or its coupling walk
failed (issue #11): the forward code is the public source's, the widths are small.

Sources (huggingface/pytorch-image-models, read 2026-11-30): ``timm/models/dpn.py`` (DualPathBlock),
``res2net.py`` (Bottle2neck), ``rexnet.py`` (LinearBottleneck), ``inception_next.py`` (InceptionDWConv2d,
MetaNeXtBlock), ``mambaout.py`` (GatedConvBlock), ``swin_transformer.py``, ``hiera.py``, ``gcvit.py``,
``xcit.py``, ``efficientvit_mit.py``, ``timm/layers/halo_attn.py``, ``squeeze_excite.py``,
``norm_act.py``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm ``BatchNormAct2d``: batch norm, then the activation, in one module (``norm_act.py``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: bool = True) -> None:
        super().__init__(num_features, eps=eps)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ConvNormAct(nn.Module):
    """timm ``ConvNormAct``: conv (same padding) -> BatchNormAct2d."""

    def __init__(
        self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


# --- DPN (dpn.py) --------------------------------------------------------------------------------------


class CatBnAct(nn.Module):
    def __init__(self, in_chs: int) -> None:
        super().__init__()
        self.bn = BatchNormAct2d(in_chs, eps=0.001)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, tuple):
            x = torch.cat(x, dim=1)
        return self.bn(x)


class BnActConv2d(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.bn = BatchNormAct2d(in_chs, eps=0.001)
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class DualPathBlock(nn.Module):
    """``dpn.py`` DualPathBlock (b=False): a residual path (x_s1 + out1) and a dense path (cat x_s2, out2),
    passed on as a tuple; the next block reads ``torch.cat(x, dim=1)``."""

    def __init__(
        self,
        in_chs: int,
        num_1x1_a: int,
        num_3x3_b: int,
        num_1x1_c: int,
        inc: int,
        groups: int,
        block_type: str,
        b: bool = False,
    ) -> None:
        super().__init__()
        self.num_1x1_c = num_1x1_c
        self.key_stride = 2 if block_type == "down" else 1
        self.has_proj = block_type in ("proj", "down")
        self.c1x1_w_s1: nn.Module | None = None
        self.c1x1_w_s2: nn.Module | None = None
        if self.has_proj:
            proj = BnActConv2d(in_chs, num_1x1_c + 2 * inc, 1, self.key_stride)
            if self.key_stride == 2:
                self.c1x1_w_s2 = proj
            else:
                self.c1x1_w_s1 = proj
        self.c1x1_a = BnActConv2d(in_chs, num_1x1_a, 1, 1)
        self.c3x3_b = BnActConv2d(num_1x1_a, num_3x3_b, 3, self.key_stride, groups=groups)
        self.c1x1_c: nn.Module
        self.c1x1_c1: nn.Module | None = None
        self.c1x1_c2: nn.Module | None = None
        if b:
            self.c1x1_c = CatBnAct(num_3x3_b)
            self.c1x1_c1 = nn.Conv2d(num_3x3_b, num_1x1_c, 1, bias=False)
            self.c1x1_c2 = nn.Conv2d(num_3x3_b, inc, 1, bias=False)
        else:
            self.c1x1_c = BnActConv2d(num_3x3_b, num_1x1_c + inc, 1, 1)

    def forward(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = torch.cat(x, dim=1) if isinstance(x, tuple) else x
        if self.c1x1_w_s1 is None and self.c1x1_w_s2 is None:
            assert isinstance(x, tuple)
            x_s1, x_s2 = x[0], x[1]
        else:
            proj = self.c1x1_w_s1 if self.c1x1_w_s1 is not None else self.c1x1_w_s2
            assert proj is not None
            x_s = proj(x_in)
            x_s1 = x_s[:, : self.num_1x1_c, :, :]
            x_s2 = x_s[:, self.num_1x1_c :, :, :]
        x_in = self.c1x1_a(x_in)
        x_in = self.c3x3_b(x_in)
        x_in = self.c1x1_c(x_in)
        if self.c1x1_c1 is not None and self.c1x1_c2 is not None:
            out1 = self.c1x1_c1(x_in)
            out2 = self.c1x1_c2(x_in)
        else:
            out1 = x_in[:, : self.num_1x1_c, :, :]
            out2 = x_in[:, self.num_1x1_c :, :, :]
        resid = x_s1 + out1
        dense = torch.cat([x_s2, out2], dim=1)
        return resid, dense


class DPN(nn.Module):
    """``dpn.py`` DPN(small=True): per stage a projecting block ('proj' first, then 'down') and normal ones;
    CatBnAct, global pool and a 1x1-conv classifier. ``bw`` and ``k_r`` double per stage, as there."""

    def __init__(
        self,
        k_sec: tuple[int, ...] = (3, 4),
        inc_sec: tuple[int, ...] = (4, 8),
        init: int = 8,
        k_r: int = 16,
        bw: int = 16,
        groups: int = 4,
        b: bool = False,
    ) -> None:
        super().__init__()
        blocks: dict[str, nn.Module] = {"conv1_1": ConvNormAct(3, init, 3, stride=2)}
        blocks["conv1_pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_chs = init
        for s, (k, inc) in enumerate(zip(k_sec, inc_sec)):
            width, r = bw * 2**s, k_r * 2**s
            blocks[f"conv{s + 2}_1"] = DualPathBlock(
                in_chs, r, r, width, inc, groups, "proj" if s == 0 else "down", b
            )
            in_chs = width + 3 * inc
            for i in range(2, k + 1):
                blocks[f"conv{s + 2}_{i}"] = DualPathBlock(in_chs, r, r, width, inc, groups, "normal", b)
                in_chs += inc
        blocks["conv5_bn_ac"] = CatBnAct(in_chs)
        self.features = nn.Sequential(OrderedDict(blocks))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(in_chs, 10, 1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.classifier(self.global_pool(self.features(x))))


# --- ShuffleNetV2 (torchvision shufflenetv2.py) ---------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


def _dw(i: int, o: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, stride, 1, bias=False, groups=i)


class ShuffleUnit(nn.Module):
    """torchvision ``InvertedResidual`` of ShuffleNetV2: chunk (stride 1) or two branches (stride 2), cat,
    channel shuffle."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        bf = oup // 2
        self.branch1 = nn.Sequential()
        if stride > 1:
            self.branch1 = nn.Sequential(
                _dw(inp, inp, stride),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, bf, 1, bias=False),
                nn.BatchNorm2d(bf),
                nn.ReLU(inplace=True),
            )
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else bf, bf, 1, bias=False),
            nn.BatchNorm2d(bf),
            nn.ReLU(inplace=True),
            _dw(bf, bf, stride),
            nn.BatchNorm2d(bf),
            nn.Conv2d(bf, bf, 1, bias=False),
            nn.BatchNorm2d(bf),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self, repeats: tuple[int, ...] = (2, 2), channels: tuple[int, ...] = (8, 16, 32, 64)
    ) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, cin = [], channels[0]
        for n, cout in zip(repeats, channels[1:]):
            stages.append(
                nn.Sequential(ShuffleUnit(cin, cout, 2), *(ShuffleUnit(cout, cout, 1) for _ in range(n - 1)))
            )
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(
            nn.Conv2d(cin, channels[-1], 1, bias=False), nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(channels[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# --- Res2Net (res2net.py Bottle2neck in timm's ResNet) ---------------------------------------------------


class Bottle2neck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, scale: int = 4
    ) -> None:
        super().__init__()
        self.scale = scale
        self.is_first = stride > 1 or downsample is not None
        self.num_scales = max(1, scale - 1)
        width = planes // 2  # timm: floor(planes * base_width / 64) * cardinality
        self.width = width
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride, padding=1, bias=False) for _ in range(self.num_scales)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(self.num_scales))
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if self.is_first else None
        self.conv3 = nn.Conv2d(width * scale, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        spo = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 or self.is_first else sp + spx[i]
            sp = self.relu(bn(conv(sp)))
            spo.append(sp)
        if self.scale > 1:
            spo.append(self.pool(spx[-1]) if self.pool is not None else spx[-1])
        out = torch.cat(spo, 1)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += shortcut
        return self.relu(out)


class Res2Net(nn.Module):
    """timm ResNet with Bottle2neck blocks: stem, ``layers`` blocks per stage, global pool, fc."""

    def __init__(self, layers: tuple[int, ...] = (2, 2), planes: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, inplanes = [], 16
        for s, n in enumerate(layers):
            p, stride = planes * 2**s, 1 if s == 0 else 2
            down = nn.Sequential(nn.Conv2d(inplanes, p * 4, 1, stride, bias=False), nn.BatchNorm2d(p * 4))
            blocks = [Bottle2neck(inplanes, p, stride, down, scale)]
            inplanes = p * 4
            blocks += [Bottle2neck(inplanes, p, scale=scale) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(inplanes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.maxpool(self.act1(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


# --- ReXNet (rexnet.py LinearBottleneck) -----------------------------------------------------------------


class SEWithNorm(nn.Module):
    """timm ``SEModule`` with ``norm_layer=nn.BatchNorm2d`` (rexnet's SEWithNorm)."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.bn = nn.BatchNorm2d(rd_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        return x * self.gate(x_se)


class SiLUConvNormAct(ConvNormAct):
    """ConvNormAct with rexnet's ``act_layer='swish'``."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        super().__init__(cin, cout, k, stride)
        self.bn.act = nn.SiLU(inplace=True)


class LinearBottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, exp_ratio: float, se_ratio: float) -> None:
        super().__init__()
        self.use_shortcut = stride == 1 and in_chs <= out_chs
        self.in_channels = in_chs
        self.out_channels = out_chs
        if exp_ratio != 1.0:
            dw_chs = round(in_chs * exp_ratio)
            self.conv_exp: nn.Module | None = SiLUConvNormAct(in_chs, dw_chs)
        else:
            dw_chs = in_chs
            self.conv_exp = None
        self.conv_dw = ConvNormAct(dw_chs, dw_chs, 3, stride, groups=dw_chs, act=False)
        self.se = SEWithNorm(dw_chs, max(1, int(dw_chs * se_ratio))) if se_ratio > 0 else None
        self.act_dw = nn.ReLU6()
        self.conv_pwl = ConvNormAct(dw_chs, out_chs, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_exp is not None:
            x = self.conv_exp(x)
        x = self.conv_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.act_dw(x)
        x = self.conv_pwl(x)
        if self.use_shortcut:
            x = torch.cat([x[:, 0 : self.in_channels] + shortcut, x[:, self.in_channels :]], dim=1)
        return x


class ReXNet(nn.Module):
    """rexnet.py with ``_block_cfg``'s growing widths (every block widens by ``final_chs / n``)."""

    def __init__(
        self, layers: tuple[int, ...] = (1, 2, 2), strides: tuple[int, ...] = (1, 2, 2), initial: int = 8,
        final: int = 24, se_ratio: float = 1 / 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stem = SiLUConvNormAct(3, 16, 3, stride=2)
        n = sum(layers)
        stride_list = [s if j == 0 else 1 for s, k in zip(strides, layers) for j in range(k)]
        exp = [1.0] * layers[0] + [6.0] * (n - layers[0])
        se = [0.0] * (layers[0] + layers[1]) + [se_ratio] * (n - layers[0] - layers[1])
        blocks, prev, base = [], 16, float(initial)
        for i in range(n):
            chs = round(base)
            blocks.append(LinearBottleneck(prev, chs, stride_list[i], exp[i], se[i]))
            prev, base = chs, base + final / n
        blocks.append(SiLUConvNormAct(prev, 64))
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(self.stem(x)).mean((2, 3)))


# --- Inception-NeXt (inception_next.py) ------------------------------------------------------------------


class InceptionDWConv2d(nn.Module):
    def __init__(
        self,
        in_chs: int,
        square_kernel_size: int = 3,
        band_kernel_size: int = 11,
        branch_ratio: float = 0.125,
    ) -> None:
        super().__init__()
        gc = int(in_chs * branch_ratio)
        self.dwconv_hw = nn.Conv2d(gc, gc, square_kernel_size, padding=square_kernel_size // 2, groups=gc)
        self.dwconv_w = nn.Conv2d(
            gc, gc, (1, band_kernel_size), padding=(0, band_kernel_size // 2), groups=gc
        )
        self.dwconv_h = nn.Conv2d(
            gc, gc, (band_kernel_size, 1), padding=(band_kernel_size // 2, 0), groups=gc
        )
        self.split_indexes = (in_chs - 3 * gc, gc, gc, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_indexes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


class ConvMlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MetaNeXtBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4, ls_init_value: float = 1e-6) -> None:
        super().__init__()
        self.token_mixer = InceptionDWConv2d(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(mlp_ratio * dim))
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.mlp(self.norm(self.token_mixer(x)))
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


class InceptionNeXt(nn.Module):
    """MetaNeXt stages (a strided BN + conv downsample before each but the first), a pool + norm + fc head."""

    def __init__(self, depths: tuple[int, ...] = (2, 2), dims: tuple[int, ...] = (16, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), nn.BatchNorm2d(dims[0]))
        stages, prev = [], dims[0]
        for i, (d, dim) in enumerate(zip(depths, dims)):
            down = nn.Sequential(nn.BatchNorm2d(prev), nn.Conv2d(prev, dim, 2, 2)) if i > 0 else nn.Identity()
            stages.append(nn.Sequential(down, *(MetaNeXtBlock(dim) for _ in range(d))))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.Linear(prev, 3 * prev), nn.GELU(), nn.LayerNorm(3 * prev), nn.Linear(3 * prev, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


# --- MambaOut (mambaout.py GatedConvBlock, NHWC) ---------------------------------------------------------


class GatedConvBlock(nn.Module):
    def __init__(
        self, dim: int, expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        hidden = int(expansion_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.act = nn.GELU()
        conv_channels = int(conv_ratio * dim)
        self.split_indices = (hidden, hidden - conv_channels, conv_channels)
        self.conv = nn.Conv2d(
            conv_channels, conv_channels, kernel_size, padding=kernel_size // 2, groups=conv_channels
        )
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # [B, H, W, C]
        x = self.fc1(self.norm(x))
        g, i, c = torch.split(x, self.split_indices, dim=-1)
        c = c.permute(0, 3, 1, 2)
        c = self.conv(c)
        c = c.permute(0, 2, 3, 1)
        x = self.fc2(self.act(g) * torch.cat((i, c), dim=-1))
        return x + shortcut


class MambaOut(nn.Module):
    """Stem (two strided convs, NHWC LayerNorms between), stages with a conv Downsample, the MLP head."""

    def __init__(self, depths: tuple[int, ...] = (2, 2), dims: tuple[int, ...] = (12, 24)) -> None:
        super().__init__()
        self.stem_conv1 = nn.Conv2d(3, dims[0] // 2, 3, 2, 1)
        self.stem_norm1 = nn.LayerNorm(dims[0] // 2)
        self.stem_act = nn.GELU()
        self.stem_conv2 = nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1)
        self.stem_norm2 = nn.LayerNorm(dims[0])
        self.downs = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev = dims[0]
        for d, dim in zip(depths, dims):
            self.downs.append(
                nn.ModuleList([nn.Conv2d(prev, dim, 3, 2, 1), nn.LayerNorm(dim)])
                if dim != prev
                else nn.ModuleList()
            )
            self.stages.append(nn.Sequential(*(GatedConvBlock(dim) for _ in range(d))))
            prev = dim
        self.head_norm = nn.LayerNorm(prev)
        self.head_fc1 = nn.Linear(prev, 4 * prev)
        self.head_act = nn.GELU()
        self.head_norm2 = nn.LayerNorm(4 * prev)
        self.head_fc = nn.Linear(4 * prev, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_conv1(x).permute(0, 2, 3, 1)
        x = self.stem_norm1(x).permute(0, 3, 1, 2)
        x = self.stem_conv2(self.stem_act(x)).permute(0, 2, 3, 1)
        x = self.stem_norm2(x)
        for down, stage in zip(self.downs, self.stages):
            if len(down):
                x = down[0](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                x = down[1](x)
            x = stage(x)
        x = self.head_norm(x.mean((1, 2)))
        x = self.head_norm2(self.head_act(self.head_fc1(x)))
        return self.head_fc(x)


# --- Swin (torchvision swin_transformer.py: swin_t, swin_v2_t) -------------------------------------------
# The attention is functional: ``F.linear`` with ``qkv.weight`` and ``proj.weight``, so the tracer never sees
# those Linear modules run.


def _patch_merging_pad(x: torch.Tensor) -> torch.Tensor:
    H, W, _ = x.shape[-3:]
    return F.pad(x, (0, 0, 0, W % 2, 0, H % 2))


def _get_relative_position_bias(
    table: torch.Tensor, index: torch.Tensor, window_size: list[int]
) -> torch.Tensor:
    N = window_size[0] * window_size[1]
    bias = table[index].view(N, N, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


class PatchMerging(nn.Module):
    """torchvision ``PatchMerging`` (``v2``: ``PatchMergingV2``, the norm after the reduction): the 2x2
    neighbours as strided slices x0..x3, concatenated on channels."""

    def __init__(self, dim: int, v2: bool = False) -> None:
        super().__init__()
        self.v2 = v2
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if v2 else 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _patch_merging_pad(x)
        x0 = x[..., 0::2, 0::2, :]
        x1 = x[..., 1::2, 0::2, :]
        x2 = x[..., 0::2, 1::2, :]
        x3 = x[..., 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1)
        return self.norm(self.reduction(x)) if self.v2 else self.reduction(self.norm(x))


def shifted_window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    v2_logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if v2_logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if v2_logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(v2_logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(
            pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1]
        )
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, (-100.0)).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def _relative_position_index(window_size: list[int]) -> torch.Tensor:
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size[0]), torch.arange(window_size[1]), indexing="ij")
    )
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += window_size[0] - 1
    relative_coords[:, :, 1] += window_size[1] - 1
    relative_coords[:, :, 0] *= 2 * window_size[1] - 1
    return relative_coords.sum(-1).flatten()


class ShiftedWindowAttention(nn.Module):
    def __init__(
        self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int, v2: bool = False
    ) -> None:
        super().__init__()
        self.window_size, self.shift_size, self.num_heads, self.v2 = window_size, shift_size, num_heads, v2
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("relative_position_index", _relative_position_index(window_size))
        if v2:
            self.v2_logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
            self.cpb_mlp = nn.Sequential(
                nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
            )
            h = torch.arange(-(window_size[0] - 1), window_size[0], dtype=torch.float32)
            w = torch.arange(-(window_size[1] - 1), window_size[1], dtype=torch.float32)
            table = (
                torch.stack(torch.meshgrid([h, w], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
            )
            table[:, :, :, 0] /= window_size[0] - 1
            table[:, :, :, 1] /= window_size[1] - 1
            table *= 8
            self.register_buffer(
                "relative_coords_table", torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / 3.0
            )
            with torch.no_grad():
                self.qkv.bias[dim : 2 * dim].zero_()
        else:
            self.relative_position_bias_table = nn.Parameter(
                torch.randn((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads) * 0.02
            )

    def get_relative_position_bias(self) -> torch.Tensor:
        if not self.v2:
            return _get_relative_position_bias(
                self.relative_position_bias_table, self.relative_position_index, self.window_size
            )
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return 16 * torch.sigmoid(
            _get_relative_position_bias(table, self.relative_position_index, self.window_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_window_attention(
            x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(), self.window_size,
            self.num_heads, shift_size=self.shift_size, qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
            v2_logit_scale=self.v2_logit_scale if self.v2 else None,
        )  # fmt: skip


class SwinTransformerBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, window_size: list[int], shift_size: list[int], v2: bool = False
    ) -> None:
        super().__init__()
        self.v2 = v2
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, window_size, shift_size, num_heads, v2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v2:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class SwinTransformer(nn.Module):
    """torchvision ``SwinTransformer``: ``swin_t`` is (embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
    window 7) at 224 px; ``swin_v2_t`` the same with window 8 and ``v2``."""

    def __init__(
        self, embed_dim: int = 16, depths: tuple[int, ...] = (2, 2), num_heads: tuple[int, ...] = (2, 4),
        window_size: int = 4, v2: bool = False, patch: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(3, embed_dim, patch, patch), Permute([0, 2, 3, 1]), nn.LayerNorm(embed_dim)
            )
        ]
        ws = [window_size, window_size]
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**i
            layers.append(
                nn.Sequential(
                    *(
                        SwinTransformerBlock(dim, heads, ws, [0 if j % 2 == 0 else w // 2 for w in ws], v2)
                        for j in range(depth)
                    )
                )
            )
            if i < len(depths) - 1:
                layers.append(PatchMerging(dim, v2))
        self.features = nn.Sequential(*layers)
        num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(num_features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.features(x)).permute(0, 3, 1, 2)
        return self.head(torch.flatten(self.avgpool(x), 1))
