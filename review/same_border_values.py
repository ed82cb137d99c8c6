"""Every output value of a depthwise TF-'SAME' conv on a constant input is one of border_values, at any size,
for dilation, stride > kernel, non-square kernels."""

import itertools, torch, torch.nn.functional as F
from torch import nn
from compactor.layers.conv import ConvShrinker, same_padded, same_padding


class Same(nn.Conv2d):
    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


torch.manual_seed(0)
bad = 0
for k, s, d in [
    ((3, 3), (2, 2), (1, 1)),
    ((2, 4), (1, 3), (1, 1)),
    ((3, 2), (5, 4), (1, 1)),
    ((3, 3), (2, 1), (2, 3)),
    ((5, 1), (3, 2), (2, 1)),
]:
    m = Same(4, 4, k, s, 0, d, groups=4).double()
    assert same_padded(m), (k, s, d)
    kk = torch.randn(4, dtype=torch.float64)
    vals = ConvShrinker().border_values(m, torch.arange(4), kk)  # [4, P]
    for h, w in itertools.product(range(1, 26), range(1, 26)):
        x = kk.view(1, 4, 1, 1).expand(1, 4, h, w).contiguous()
        y = m(x)[0].flatten(1)  # [4, positions]
        ok = ((y[:, :, None] - vals[:, None, :]).abs() < 1e-12).any(-1).all()
        bad += not ok
print("sizes with a value not among border_values:", bad)
