"""The built-in example behind ``compact --demo``: a small CNN, pruned and fine-tuned the way users do it.

Residual blocks, BatchNorm, a flatten into Linear; ``ln_structured`` masks on every block's first conv and
on the stem, kept attached; BatchNorm statistics left as fine-tuning leaves them (dead channels keep a
non-zero shift, so most of them carry constants that compaction must fold or merge to stay exact).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


class DemoBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class DemoNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(DemoBlock(width), DemoBlock(width))
        self.head = nn.Conv2d(width, 2 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(2 * width * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        x = torch.relu(self.head(x))
        out: torch.Tensor = self.fc(self.pool(x).flatten(1))
        return out


def demo_model(amount: float = 0.5, seed: int = 0) -> nn.Module:
    """A masked DemoNet (masks attached), in eval mode, with fine-tuned-looking BatchNorm statistics."""
    torch.manual_seed(seed)
    model = DemoNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                for name, (low, high) in _BN_INIT.items():
                    tensor: torch.Tensor = getattr(module, name)
                    tensor.uniform_(low, high)
    for block in model.blocks:
        assert isinstance(block, DemoBlock)
        prune.ln_structured(block.conv1, "weight", amount=amount, n=2, dim=0)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        _dead_stats(block.conv1, block.bn1)
    prune.ln_structured(model.head, "weight", amount=amount, n=2, dim=0)  # type: ignore[no-untyped-call]  # as above
    with torch.no_grad():
        dead = _dead_filters(model.head)
        bias = model.head.bias
        assert bias is not None
        bias[dead] = -bias[dead].abs()  # dead filters emit ReLU(negative) = 0
    return model.eval()


_BN_INIT = {"weight": (0.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-0.2, 0.2), "running_var": (0.5, 1.5)}


def _dead_filters(conv: nn.Conv2d) -> torch.Tensor:
    mask = conv.get_buffer("weight_mask")
    return mask.flatten(1).sum(1) == 0


def _dead_stats(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """After fine-tuning with masks, a dead channel's running mean decays to exactly 0."""
    with torch.no_grad():
        bn.get_buffer("running_mean")[_dead_filters(conv)] = 0.0


DEMO_INPUT_SHAPE = (1, 3, 32, 32)
