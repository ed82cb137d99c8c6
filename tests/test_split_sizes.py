"""Split sizes held in code: where they are a module's attribute (timm's MambaOut ``self.split_indices``,
Res2Net's ``self.width``), the rebuild rewrites them with the kept channels of each piece; where they are
a literal in ``forward``, the channels stay, and the reason names the line."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

import compactor


class GatedConv(nn.Module):
    """MambaOut's gated CNN block, as timm builds it: ``fc1`` writes [gate | identity | conv] cut at
    ``self.split_indices``; a depthwise conv on the last piece; ``fc2`` reads gate x cat(identity, conv)."""

    def __init__(self, dim: int = 8, hidden: int = 16, conv: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.split_indices = (hidden, hidden - conv, conv)
        self.conv = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, H, W, C]
        g, i, c = torch.split(self.fc1(x), self.split_indices, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc2(torch.nn.functional.gelu(g) * torch.cat((i, c), dim=-1))


class Res2(nn.Module):
    """Res2Net's bottleneck core, as timm builds it: ``conv1`` writes ``width * scale`` channels cut into
    equal pieces by ``torch.split(out, self.width, 1)``; each piece after the first adds the previous 3x3
    conv's output before its own; the last piece passes; ``conv3`` reads them all."""

    def __init__(self, width: int = 4, scale: int = 4) -> None:
        super().__init__()
        self.width, self.scale = width, scale
        self.conv1 = nn.Conv2d(8, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(scale - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(torch.relu(self.bn1(self.conv1(x))), self.width, 1)
        out, sp = [], pieces[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = pieces[i] if i == 0 else sp + pieces[i]
            sp = torch.relu(bn(conv(sp)))
            out.append(sp)
        out.append(pieces[-1])
        return x + self.conv3(torch.cat(out, 1))


class Literal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 12), nn.Linear(6, 8), nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.fc1(x), [6, 6], dim=-1)
        return self.fc2(torch.relu(a)) + self.fc3(torch.relu(b))


def _zero_rows(layer: nn.Module, rows: list[int]) -> None:
    mask = torch.ones_like(layer.weight)
    mask[rows] = 0
    prune.custom_from_mask(layer, "weight", mask)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias[rows] = 0


def _check(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, compactor.CompactionReport]:
    small, report = compactor.compact(model, x)
    with torch.no_grad():
        for seed in (1, 2):
            y = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(small(y), model(y), rtol=1e-5, atol=1e-5)
    return small, report


def test_a_split_at_a_module_attribute_is_rewritten_with_each_piece() -> None:
    """Product channels 1 and 3 (gate and identity rows zero) and 14 (gate and conv rows zero: the conv's
    bias times gelu(0)): each piece of ``fc1``'s output keeps its own channels, and the sizes follow."""
    torch.manual_seed(0)
    model = GatedConv().eval()
    _zero_rows(model.fc1, [1, 17, 3, 19, 14, 30])
    small, report = _check(model, torch.randn(2, 5, 5, 8))
    assert small.split_indices == (13, 8, 5) and model.split_indices == (16, 10, 6)
    assert (small.fc1.out_features, small.conv.in_channels, small.fc2.in_features) == (26, 5, 13)
    assert report.extra["split_sizes"] == {"split_indices": [[16, 10, 6], [13, 8, 5]]}
    assert "split sizes rewritten with the kept channels: split_indices [16, 10, 6] -> [13, 8, 5]" in (
        report.table()
    )


def test_an_int_split_size_becomes_the_pieces_sizes_where_they_differ() -> None:
    """Res2Net: conv1 rows 1 (piece 0), 6 (piece 1, channel 2, with the first 3x3 conv's output channel 2
    that it is added to) and 13 (the passed-through last piece) zeroed: the pieces then hold 3, 3, 4 and 3
    channels, so ``self.width`` becomes that list."""
    torch.manual_seed(0)
    model = Res2().eval()
    for bn in (model.bn1, *model.bns):
        with torch.no_grad():
            bn.bias.zero_()  # relu(bn(0)) = 0: zero channels, not constants
    _zero_rows(model.conv1, [1, 6, 13])
    _zero_rows(model.convs[0], [2])
    small, report = _check(model, torch.randn(2, 8, 6, 6))
    assert report.extra["split_sizes"] == {"width": [4, [3, 3, 4, 3]]}
    assert small.width == [3, 3, 4, 3] and model.width == 4
    assert small.conv1.out_channels == 13 and small.convs[0].in_channels == 3
    assert small.convs[1].in_channels == 3 and small.convs[1].out_channels == 4


def test_equal_pieces_keep_an_int_split_size() -> None:
    torch.manual_seed(0)
    model = Res2().eval()
    for bn in (model.bn1, *model.bns):
        with torch.no_grad():
            bn.bias.zero_()
    _zero_rows(model.conv1, [0, 5, 9, 12])  # one channel of each piece; those of pieces 1 and 2 with the
    _zero_rows(model.convs[0], [1])  # 3x3 conv outputs they are added to
    _zero_rows(model.convs[1], [1])
    small, _ = _check(model, torch.randn(2, 8, 6, 6))
    assert small.width == 3 and small.conv1.out_channels == 12


def test_a_literal_split_keeps_its_channels_and_names_the_line() -> None:
    torch.manual_seed(0)
    model = Literal().eval()
    _zero_rows(model.fc1, [2, 8])
    small, report = _check(model, torch.randn(3, 8))
    assert small.fc1.out_features == 12
    reasons = {z.reason for z in report.zeroed}
    (why,) = reasons
    assert "split whose sizes are fixed in the forward code (split (test_split_sizes.py:" in why


class CrossStage(nn.Module):
    """timm's CSPNet ``CrossStage``, narrow: ``conv_exp`` writes ``self.expand_chs`` channels, cut in halves by
    ``x.split(self.expand_chs // 2, dim=1)``; one half passes a block, both meet in ``conv_transition``."""

    def __init__(self) -> None:
        super().__init__()
        self.expand_chs = 12
        self.conv_exp = nn.Conv2d(4, self.expand_chs, 1)
        self.block = nn.Conv2d(6, 6, 3, padding=1)
        self.conv_transition = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        return self.conv_transition(torch.cat([xs, torch.relu(self.block(xb))], dim=1))


def test_halves_of_an_attribute_lose_as_many_each_and_the_attribute_follows() -> None:
    """Three channels zeroed in the first half, one in the second (with the block reading none of it): one
    goes from each half, the attribute becomes the kept total, and the two kept in the first half say why."""
    torch.manual_seed(0)
    model = CrossStage().eval()
    _zero_rows(model.conv_exp, [0, 1, 2, 7])
    small, report = _check(model, torch.randn(2, 4, 6, 6))
    assert small.expand_chs == 10 and small.conv_exp.out_channels == 10 and small.block.in_channels == 5
    assert report.extra["split_sizes"] == {"expand_chs": [12, 10]}
    kept = [z for z in report.zeroed if not z.fate.startswith("removed")]
    assert [z.channel for z in kept] == [1, 2]
    assert all("a split at expand_chs // 2 into 2 pieces (sizes [6, 6])" in z.reason for z in kept)
