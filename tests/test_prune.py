"""``compactor.prune_channels``: coupling-aware masks that compaction removes whole (issue 24).

Each model is masked by ``prune_channels``, then "fine-tuned" (its ``weight_orig`` and BatchNorm statistics
moved, masks left attached), then compacted: every masked output row is gone, the outputs are the masked
model's, and the plan's parameter and MAC figures are what compaction removed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import zoo
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

import compactor
from compactor.measure.timing import count_macs
from compactor.training.prune import GroupView, PrunePlan


class GroupedBlock(nn.Module):
    """A 1x1 conv into a grouped 3x3 conv (4 groups) into a 1x1 conv: ResNeXt's bottleneck without the add."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.b, self.bn_b = nn.Conv2d(32, 32, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(32)
        self.c = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_b(self.b(F.relu(self.bn_a(self.a(x))))))
        return self.fc(self.c(x).mean((2, 3)))


class NormedResidual(nn.Module):
    """A residual stream read by LayerNorm (a transformer block's MLP, on images): the stream stays, the
    MLP's hidden neurons go."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 40), nn.Linear(40, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.mean(1))


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "residual": (zoo.ResidualBlock, _image),
    "resnet": (lambda: zoo.ResNet((8, 16), (2, 1)), _image),
    "mbconv": (zoo.EfficientNetSmall, _image),
    "mobilenet_v2": (zoo.TVMobileNetV2, _image),
    "grouped": (GroupedBlock, _image),
    "layer_scale": (zoo.LayerScale, _image),
    "normed_residual": (
        NormedResidual,
        lambda: torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(0)),
    ),
}


def _fine_tuned(model: nn.Module, x: torch.Tensor) -> None:
    """What fine-tuning with the masks attached leaves: ``*_orig`` and every other parameter moved, and
    BatchNorm statistics gathered on training batches (a masked channel's are those of zeros)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.1 * torch.randn_like(x))
    model.eval()


def _masked_rows(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per masked weight of at least two dimensions: (rows masked whole along its output dim, rows)."""
    found = {}
    for name, m in model.named_modules():
        mask = getattr(m, "weight_mask", None)
        if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
            found[name] = (int((mask.flatten(1) == 0).all(1).sum()), mask.shape[0])
    return found


def _run(name: str, **kwargs: Any) -> tuple[nn.Module, nn.Module, torch.Tensor, PrunePlan, Any]:
    build, data = MODELS[name]
    torch.manual_seed(0)
    model, x = build().eval(), data()
    zoo.perturb_norms(model, tuple(x.shape)) if any(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    ) else None
    plan = compactor.prune_channels(model, x, **kwargs)
    _fine_tuned(model, x)
    small, report = compactor.compact(model, x)
    return model, small, x, plan, report


@pytest.mark.parametrize("name", ["residual", "resnet", "mbconv", "mobilenet_v2", "grouped", "layer_scale"])
def test_every_masked_row_is_removed_and_the_plan_counts_what_compaction_removed(name: str) -> None:
    model, small, x, plan, report = _run(name, amount=0.3)
    rows = _masked_rows(model)
    masked = sum(n for n, _ in rows.values())
    assert masked and 0.2 <= masked / sum(total for _, total in rows.values()) <= 0.4
    widths = {n: m.weight.shape[0] for n, m in small.named_modules() if n in rows}
    assert {n: total - widths[n] for n, (_, total) in rows.items()} == {n: k for n, (k, _) in rows.items()}
    assert report.params["before"] - report.params["after"] == plan.params
    assert count_macs(model, x) - count_macs(small, x) == plan.macs
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_masks_are_torch_prune_masks_on_writers_and_the_norms_after_them() -> None:
    """The writers' rows and the BatchNorm scale and shift of each masked channel, nothing the readers hold:
    plain ``torch.nn.utils.prune`` re-parametrisations that fine-tuning keeps."""
    torch.manual_seed(0)
    model = zoo.ResidualBlock().eval()
    plan = compactor.prune_channels(model, _image(), amount=0.25)
    masked = {n for n, m in model.named_modules() if prune.is_pruned(m) and hasattr(m, "weight_mask")}
    assert masked == {
        "stem.0",
        "stem.1",
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "down.0",
        "down.1",
    }  # fmt: skip  (fc only reads: its columns go with the channels)
    assert not prune.is_pruned(model.fc)
    stream = next(g for g in plan.groups if "conv2" in g.layers)  # the residual stream: 3 writers, 3 norms
    assert {"conv2", "bn2", "down.0", "down.1"} <= set(stream.layers) and len(stream.masked) == 8
    for name in ("conv2", "down.0"):
        rows = (model.get_submodule(name).weight_mask.flatten(1) == 0).all(1)
        assert rows.nonzero().flatten().tolist() == list(stream.masked)
    for name in ("bn2", "down.1"):
        norm = model.get_submodule(name)
        assert (norm.weight_mask == 0).nonzero().flatten().tolist() == list(stream.masked)
        assert (norm.bias_mask == 0).nonzero().flatten().tolist() == list(stream.masked)


def test_a_grouped_conv_loses_as_many_channels_in_every_group() -> None:
    _, small, _, plan, _ = _run("grouped", amount=0.3)
    assert small.b.weight.shape[:2] == (32 - 4 * 2, 6)  # 30% of 8 per group: 2 from each of 4
    for g in plan.groups:
        if "b" in g.layers:
            assert [sum(1 for c in g.masked if c // 8 == part) for part in range(4)] == [2, 2, 2, 2]


def test_a_stream_layernorm_reads_is_left_whole_with_the_reason() -> None:
    model, small, x, plan, _ = _run("normed_residual", amount=0.25)
    assert [len(g.masked) for g in plan.groups] == [10]  # fc1's 40 neurons: 10 go
    assert small.fc1.out_features == 30 and small.embed.out_features == 16
    assert any("LayerNorm" in s.reason for s in plan.skipped), plan.skipped
    assert "LayerNorm" in plan.summary()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_round_to_global_and_a_score_of_ones_own() -> None:
    _, _, _, plan, _ = _run("mobilenet_v2", amount=0.3, round_to=8)
    assert all((g.size - len(g.masked)) % 8 == 0 for g in plan.groups)

    calls: list[GroupView] = []

    def reversed_index(view: GroupView) -> torch.Tensor:
        calls.append(view)
        return -torch.arange(view.size, dtype=torch.float64)  # the last channels score lowest

    model = zoo.ConvChain().eval()
    plan = compactor.prune_channels(model, _image(), amount=0.5, importance=reversed_index)
    assert calls and all(v.rows for v in calls)
    first = next(g for g in plan.groups if "b1.0" in g.layers)
    assert first.masked == tuple(range(8, 16))
    model = zoo.ConvChain().eval()
    plan = compactor.prune_channels(model, _image(), amount=0.3, global_=True, importance="l2")
    assert plan.importance == "l2" and plan.channels == int(0.3 * (16 + 24 + 12))


def test_bad_arguments_are_refused() -> None:
    model = zoo.ConvChain().eval()
    with pytest.raises(ValueError, match="amount"):
        compactor.prune_channels(model, _image(), amount=1.0)
    with pytest.raises(ValueError, match="importance"):
        compactor.prune_channels(model, _image(), importance="taylor")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="round_to"):
        compactor.prune_channels(model, _image(), round_to=0)
    assert not any(prune.is_pruned(m) for m in model.modules())


def test_keep_pruned_holds_the_masks_through_training_and_compaction_removes_them() -> None:
    """One call before training, compaction after: an optimizer with weight decay and momentum moves
    ``weight_orig`` but the masked rows stay zero, and compaction removes every one."""
    torch.manual_seed(0)
    model, x = zoo.ResidualBlock(), _image()
    plan = compactor.prune_channels(model.eval(), x, amount=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    model.train()
    with compactor.keep_pruned(model, optimizer):
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    model.eval()
    small, report = compactor.compact(model, x)
    assert report.params["before"] - report.params["after"] == plan.params
    assert sum(n for n, _ in _masked_rows(model).values()) == sum(
        model.get_submodule(n).weight.shape[0] - small.get_submodule(n).weight.shape[0]
        for n in _masked_rows(model)
    )
