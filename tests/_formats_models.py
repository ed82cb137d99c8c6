"""Small models for the format, state_dict and sparse-storage tests.

They live in an importable module (not in a test file) so that pickles refer to
``_formats_models.SmallCNN`` and ``--arch _formats_models:small_cnn`` resolves from the tests directory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, global pooling, Linear head: the smallest model with every rebuilt layer kind."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


class LayerScaleCNN(nn.Module):
    """A bare channel-scale parameter (LayerScale) between the convs: rebuilt without a layer of its own."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(width, 1, 1))
        self.conv2 = nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)) * self.gamma).mean((2, 3))


class TiedCNN(SmallCNN):
    """SmallCNN with a second head that shares the first head's weight (as language models tie embeddings)."""

    def __init__(self) -> None:
        super().__init__(classes=16)
        self.head = nn.Linear(16, 16, bias=False)
        self.head.weight = self.fc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(x))


def tied_cnn() -> TiedCNN:
    return trained(TiedCNN())


def small_cnn() -> SmallCNN:
    return SmallCNN()


def layer_scale_cnn() -> LayerScaleCNN:
    return LayerScaleCNN()


def not_a_module() -> str:
    return "not a model"


NOT_CALLABLE = 3


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics away from their defaults, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
    return model.eval()


def channel_pruned(seed: int = 0) -> SmallCNN:
    """SmallCNN with half the conv1 and a quarter of the conv2 filters masked (prune hooks attached)."""
    model = trained(SmallCNN(), seed)
    prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
    prune.ln_structured(model.conv2, "weight", amount=0.25, n=2, dim=0)
    return model


def unstructured(amount: float = 0.9, seed: int = 0) -> SmallCNN:
    """SmallCNN with ``amount`` of every conv and Linear weight masked at random (no whole channel zero)."""
    model = trained(SmallCNN(), seed)
    torch.manual_seed(seed)
    for layer in (model.conv1, model.conv2, model.fc):
        prune.random_unstructured(layer, "weight", amount=amount)
    return model


def example_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class Hyper:
    """A hyper-parameter object as Lightning checkpoints keep: a class the safe loader does not know."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr


class RunsCode:
    """Unpickling this would run code (``exec``); the loaders must never do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class DataDependent(nn.Module):
    """A forward with a data-dependent branch: torch.export refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)
