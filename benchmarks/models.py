"""The benchmark zoo: realistic-size models, pruned the way a user would prune them before compaction.

CNNs (ResNet-18/50/152, ResNeXt-50 32x4d, VGG-16-BN, MobileNetV2) are compact re-implementations of the torchvision architectures (same layers, same shapes, same
parameter counts: torchvision does not import here and nothing can be downloaded). BERT-base and ConvNeXt-T
come from ``transformers`` configs with random weights.

Pruning (:func:`prune_model`) applies ``torch.nn.utils.prune.ln_structured`` (L2, ``dim=0``) to the
*internal* layers only: convs inside a residual block, the expand conv of an inverted residual, the FFN
intermediate Linear of a transformer. ResNeXt's are pruned group-aware, the same fraction in each group of
the grouped conv (:class:`PerGroup`), as Torch-Pruning's group-aware pruners do. Never the classifier output, never a layer that writes a residual
stream. Then it leaves the normalisation layers as fine-tuning with the masks on would: BatchNorm running
statistics are re-estimated in train mode (a dead channel gets ``running_mean == 0`` exactly) while
``gamma``/``beta`` and biases are random and non-zero, so a dead channel emits a non-zero constant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from compactor.inputs import ExampleInputs

# ---------------------------------------------------------------------------------------------------------
# ResNet (torchvision.models.resnet, v1.5: stride on the 3x3 conv)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)

    def internal(self) -> list[nn.Conv2d]:
        return [self.conv1]  # conv2 writes the residual stream


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = planes * base_width // 64 * groups  # ResNeXt: groups x base_width per 64 planes
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)

    def internal(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2]


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.block_args = {"groups": groups, "base_width": base_width} if groups > 1 else {}
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, layers[0], 1)
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_cnn(self)

    def _layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, **self.block_args)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **self.block_args) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet_targets(model: nn.Module) -> list[tuple[nn.Module | PerGroup, ...]]:
    return [
        (conv,) for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck)) for conv in m.internal()
    ]


def _resnext_targets(model: nn.Module) -> list[tuple[nn.Module | PerGroup, ...]]:
    """conv1 and the grouped conv2, pruned group-aware (the same count in each of conv2's groups)."""
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    return [(PerGroup(conv, b.conv2.groups),) for b in blocks for conv in b.internal()]


@dataclass(frozen=True)
class PerGroup:
    """Prune ``layer``'s filters group by group: the same fraction, by L2 norm, in each of ``groups`` runs."""

    layer: nn.Module
    groups: int


# ---------------------------------------------------------------------------------------------------------
# VGG-16-BN (torchvision.models.vgg16_bn)

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )
        _init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _vgg_targets(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    assert isinstance(model, VGG)
    convs = [(m,) for m in model.features if isinstance(m, nn.Conv2d)]
    hidden = [(m,) for m in list(model.classifier)[:-1] if isinstance(m, nn.Linear)]  # not the output layer
    return convs + hidden


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision.models.mobilenet_v2, width 1.0)


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)

    def internal(self) -> tuple[nn.Module, ...]:
        """The hidden channels: the expand conv (if any) and the depthwise conv, pruned as one group."""
        return tuple(seq[0] for seq in list(self.conv)[:-1])


class MobileNetV2(nn.Module):
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        cin = 32
        layers: list[nn.Module] = [_conv_bn(3, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        _init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _mobilenet_targets(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    return [m.internal() for m in model.modules() if isinstance(m, InvertedResidual)]


def _init_cnn(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal convs (fan_out), N(0, 0.01) Linear, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------
# Transformers: BERT-base encoder and ConvNeXt-T, random weights


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` returning the logits tensor (keyword inputs)."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(num_labels=2, attn_implementation="sdpa", hidden_dropout_prob=0.0, **config)
        self.bert = BertForSequenceClassification(cfg).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def _bert_targets(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    return [(m.intermediate.dense,) for n, m in model.named_modules() if type(m).__name__ == "BertLayer"]


class ConvNextClassifier(nn.Module):
    """``ConvNextForImageClassification`` returning the logits tensor."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        from transformers import ConvNextConfig, ConvNextForImageClassification

        cfg = ConvNextConfig(num_labels=1000, **config)
        self.convnext = ConvNextForImageClassification(cfg).eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.convnext(pixel_values=pixel_values).logits


def _convnext_targets(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    return [(m.pwconv1,) for m in model.modules() if type(m).__name__ == "ConvNextLayer"]


# ---------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ZooModel:
    """One benchmark model: how to build it, its inputs (full and quick sizes), and what to prune.

    ``targets`` returns groups of layers; the first of each group is pruned with ``ln_structured`` and the
    others (a depthwise conv reading the same channels) get the same channel mask.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[bool], ExampleInputs]  # quick -> inputs
    targets: Callable[[nn.Module], list[tuple[nn.Module | PerGroup, ...]]]
    quick: bool = False  # part of the --quick default set

    def make(self, sparsity: float, *, quick: bool = False, seed: int = 0) -> tuple[nn.Module, ExampleInputs]:
        """Build, prune (masks left attached) and calibrate the model; return it in eval mode with its inputs."""
        torch.manual_seed(seed)
        model = self.build()
        inputs = self.inputs(quick)
        prune_model(model, self.targets(model), sparsity, inputs, seed=seed)
        return model.eval(), inputs


def _image(size: int) -> ExampleInputs:
    return ExampleInputs(args=(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),))


def _tokens(seq: int, vocab: int = 30522) -> ExampleInputs:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    mask = torch.ones(1, seq, dtype=torch.long)
    return ExampleInputs(kwargs={"input_ids": ids, "attention_mask": mask})


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "resnet18",
            lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
            lambda q: _image(64 if q else 224),
            _resnet_targets,
            quick=True,
        ),
        ZooModel(
            "resnet50",
            lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
            lambda q: _image(64 if q else 224),
            _resnet_targets,
        ),
        ZooModel(
            "resnet152",
            lambda: ResNet(Bottleneck, [3, 8, 36, 3]),
            lambda q: _image(64 if q else 224),
            _resnet_targets,
        ),
        ZooModel(
            "resnext50_32x4d",
            lambda: ResNet(Bottleneck, [3, 4, 6, 3], groups=32, base_width=4),
            lambda q: _image(64 if q else 224),
            _resnext_targets,
        ),
        ZooModel("vgg16_bn", lambda: VGG(VGG16), lambda q: _image(64 if q else 224), _vgg_targets),
        ZooModel(
            "mobilenet_v2", MobileNetV2, lambda q: _image(64 if q else 224), _mobilenet_targets, quick=True
        ),
        ZooModel("bert_base", BertClassifier, lambda q: _tokens(32 if q else 128), _bert_targets),
        ZooModel(
            "bert_mini",  # a 4-layer, 256-wide BERT for --quick and the tests
            lambda: BertClassifier(
                hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
            ),
            lambda q: _tokens(32 if q else 128),
            _bert_targets,
            quick=True,
        ),
        ZooModel("convnext_tiny", ConvNextClassifier, lambda q: _image(64 if q else 224), _convnext_targets),
    )
}
FULL_DEFAULT = (
    "resnet18", "resnet50", "resnet152", "resnext50_32x4d", "vgg16_bn", "mobilenet_v2", "bert_base", "convnext_tiny",
)  # fmt: skip
QUICK_DEFAULT = tuple(name for name, m in ZOO.items() if m.quick)


# ---------------------------------------------------------------------------------------------------------
# Pruning and "fine-tuning" the normalisation layers


def prune_model(
    model: nn.Module,
    targets: list[tuple[nn.Module | PerGroup, ...]],
    sparsity: float,
    inputs: ExampleInputs,
    *,
    seed: int = 0,
) -> None:
    """Prune ``sparsity`` of the output channels of each target group, then set norms as fine-tuning would."""
    generator = torch.Generator().manual_seed(seed)
    _perturb_affine(model, generator)  # before pruning: a pruned layer's own bias stays non-zero, as it would
    for group in targets:
        lead, *followers = group
        if isinstance(lead, PerGroup):
            lead = prune_per_group(lead.layer, sparsity, lead.groups)
        else:
            prune.ln_structured(lead, "weight", amount=sparsity, n=2, dim=0)
        channel_mask = lead.weight_mask.flatten(1).amax(1)
        for layer in followers:
            mask = channel_mask.view(-1, *([1] * (layer.weight.dim() - 1))).expand_as(layer.weight)
            prune.custom_from_mask(layer, "weight", mask.contiguous())
    _recalibrate_batchnorm(model, inputs, generator)


def prune_per_group(layer: nn.Module, sparsity: float, groups: int) -> nn.Module:
    """``custom_from_mask`` on the ``round(sparsity x per-group)`` smallest-L2 filters of each of ``groups`` runs."""
    norms = layer.weight.detach().flatten(1).norm(dim=1).view(groups, -1)
    per = norms.shape[1]
    mask = torch.ones_like(layer.weight)
    for g in range(groups):
        mask[g * per + norms[g].argsort()[: round(sparsity * per)]] = 0
    prune.custom_from_mask(layer, "weight", mask)
    return layer


def dead_channels(layer: nn.Module) -> int:
    """Output channels of ``layer`` whose weights are all zero (its effective, masked weight)."""
    weight = layer.weight.detach()
    return int((weight.flatten(1).abs().amax(1) == 0).sum())


def pruned_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if hasattr(module, "weight_mask"):
            yield name, module


def _perturb_affine(model: nn.Module, g: torch.Generator) -> None:
    """Non-zero affine parameters, as a trained model has them: BN/LN gamma and beta, every bias."""
    with torch.no_grad():
        for module in model.modules():
            if (
                isinstance(module, (nn.BatchNorm2d, nn.LayerNorm))
                or type(module).__name__ == "ConvNextLayerNorm"
            ):
                w, b = module.weight, module.bias
                w.copy_(1 + 0.2 * torch.randn(w.shape, generator=g))
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=g))
            layer_scale = getattr(module, "layer_scale_parameter", None)  # ConvNeXt: 1e-6 at init
            if isinstance(layer_scale, nn.Parameter):
                layer_scale.copy_(0.05 + 0.25 * torch.rand(layer_scale.shape, generator=g))


def _recalibrate_batchnorm(
    model: nn.Module, inputs: ExampleInputs, g: torch.Generator, batches: int = 2
) -> None:
    """Re-estimate BatchNorm running statistics in train mode (cumulative average over a few random batches).

    A dead channel's conv output is exactly zero, so its ``running_mean`` ends exactly 0 (and its variance
    0), as masked fine-tuning leaves it; its ``beta`` stays non-zero.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(*(torch.randn(4, *t.shape[1:], generator=g) for t in inputs.args))
    for bn in norms:
        bn.momentum = 0.1
    model.eval()
