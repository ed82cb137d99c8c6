"""A conv subclass that pads 'SAME' by the input's WIDTH on both axes (code written for square images) passes
same_padded's probe (its two probe inputs are square for a square conv), so compactor plans it with TF-SAME
border patterns. At a non-square input it puts windows where 'SAME' never does; a dead channel whose
depthwise output is zero after ReLU at every 'SAME' pattern (so it is removed) is not zero there: the
compacted model differs from the masked one. (Square example: verification passes.)"""

import torch
import torch.nn.functional as F
from torch import nn

import compactor
from compactor.layers.conv import same_padded, same_padding


class SquareSame(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])  # width only
        x = F.pad(x, (t // 2, t - t // 2, t // 2, t - t // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.dw = SquareSame(4, 4, 5, 2, groups=4)
        self.act = nn.ReLU()
        self.pw = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.act(self.dw(self.a(x))))


torch.manual_seed(0)
model = Net().eval()
with torch.no_grad():
    model.a.weight[0] = 0.0  # a dead filter: channel 0 is the constant 1.0 (its bias)
    model.a.bias[0] = 1.0
    w = torch.zeros(5, 5)
    w[3, 2], w[4, 2] = 1.0, -1.0  # rows 3 and 4 of the centre column: they cancel in every 'SAME' window
    model.dw.weight[0, 0] = w
    model.dw.bias[0] = -0.5  # so ReLU gives 0 at every 'SAME' pattern, 0.5 where row 3 is in and row 4 out
print("same_padded:", same_padded(model.dw))
x = torch.randn(1, 3, 16, 16)
small, report = compactor.compact(model, x)
print("dw channels:", model.dw.out_channels, "->", small.dw.out_channels)
with torch.no_grad():
    for size in [(16, 16), (15, 15), (16, 15), (15, 16)]:
        y = torch.randn(1, 3, *size)
        print(size, "max |compact - masked| =", float((small(y) - model(y)).abs().max()))
