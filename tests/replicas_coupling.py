"""Faithful small replicas of third-party blocks that move channels around (issue: coupling compactor decides
itself). Each follows the public source it names; only the widths are small.

- Ultralytics ``C2f`` (YOLOv8) and ``C3k2`` (YOLO11, ``ultralytics/nn/modules/block.py``): ``cv1(x).chunk(2, 1)``,
  bottlenecks on the last piece, ``cat`` of every piece into ``cv2``.
- timm ``GluMlp`` (``timm/layers/mlp.py``): ``fc1`` then ``chunk(2, dim=-1)``, ``x1 * act(x2)``, ``fc2``.
- torchvision ``ShuffleNetV2`` (its ``InvertedResidual`` is ``replicas_walk.ShuffleUnit``)
  (``torchvision/models/shufflenetv2.py``): ``x.chunk(2, dim=1)``, ``cat``, ``view -> transpose -> view``.
- torchvision ``ConvNeXt`` ``CNBlock`` (``torchvision/models/convnext.py``): depthwise 7x7, ``Permute`` to
  channels-last, LayerNorm, Linear -> GELU -> Linear, ``Permute`` back, layer scale, residual add.
"""

from __future__ import annotations

import torch
from replicas_walk import Permute, ShuffleUnit
from torch import nn


# --- Ultralytics ------------------------------------------------------------------------------------
class Conv(nn.Module):
    """ultralytics Conv: Conv2d (no bias, 'same' padding) -> BatchNorm2d -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(
        self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k: tuple[int, int] = (3, 3), e: float = 0.5
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(1, 3), e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k(C3):
    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5, k: int = 3
    ) -> None:
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(k, k), e=1.0) for _ in range(n)))


class C2f(nn.Module):
    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5
    ) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3k2(C2f):
    def __init__(
        self,
        c1: int,
        c2: int,
        n: int = 1,
        c3k: bool = False,
        e: float = 0.5,
        g: int = 1,
        shortcut: bool = True,
    ) -> None:
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut, g) if c3k else Bottleneck(self.c, self.c, shortcut, g)
            for _ in range(n)
        )


class YoloTiny(nn.Module):
    """A stem, a C2f (or C3k2), a detect-like 1x1 head, pooled to logits."""

    def __init__(self, block: str = "c2f") -> None:
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)
        self.block = C2f(16, 16, n=2, shortcut=True) if block == "c2f" else C3k2(16, 16, n=1, c3k=True)
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x))).mean((2, 3))


# --- timm GluMlp -------------------------------------------------------------------------------------
class GluMlp(nn.Module):
    def __init__(
        self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.Sigmoid
    ) -> None:
        super().__init__()
        assert hidden_features % 2 == 0
        self.chunk_dim = -1
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features // 2, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x1, x2 = x.chunk(2, dim=self.chunk_dim)
        x = x1 * self.act(x2)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)


class GluTokens(nn.Module):
    """Tokens [B, N, C] through a GluMlp, then a classifier on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.mlp = GluMlp(16, 24)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(x)).mean(1))


# --- torchvision ShuffleNetV2 ------------------------------------------------------------------------
class ShuffleNetV2Tiny(nn.Module):
    """torchvision ShuffleNetV2's layout: conv1, maxpool, a stage (one stride-2 block, one stride-1 block),
    conv5, global mean, fc; widths 8 / 16 / 32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.conv5 = nn.Sequential(
            nn.Conv2d(16, 32, 1, 1, 0, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage2(x))
        return self.fc(x.mean([2, 3]))


# --- torchvision ConvNeXt ----------------------------------------------------------------------------
class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_scale * self.block(x) + x


class ConvNeXtTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.blocks = nn.Sequential(CNBlock(8, layer_scale=0.5), CNBlock(8, layer_scale=0.5))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))
