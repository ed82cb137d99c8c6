"""Faithful replicas of timm blocks that broke compaction (issue #11), at test size.

timm does not import here, so each class below follows the public source of ``huggingface/pytorch-image-models``
(read at aa4b585, 2026-08): the same layers, the same forward code, only the sizes made small and the
``device``/``dtype`` plumbing, drop paths and unused options left out. The file each comes from is named in
its docstring.

``masked(model, x)`` masks a replica the way users do: ``prune.ln_structured`` (30%, L2, ``dim=0``) on every
Conv and Linear, masks left attached, BatchNorm statistics as after training (``zoo.perturb_norms``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from zoo import perturb_norms

AMOUNT = 0.3


def pruned_count(width: int, amount: float = AMOUNT) -> int:
    """How many of ``width`` slices ``prune.ln_structured(amount=...)`` zeroes (torch rounds the fraction)."""
    return round(amount * width)


def masked(model: nn.Module, shape: tuple[int, ...], *, seed: int = 0) -> nn.Module:
    """``ln_structured`` 30% on every Conv and Linear of ``model`` (masks attached), norms as after training."""
    torch.manual_seed(seed)
    with torch.no_grad():  # trained models have non-zero biases and affine norms
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.ln_structured(m, "weight", amount=AMOUNT, n=2, dim=0)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        perturb_norms(model, shape, seed=seed)
    return model.eval()


# --- LeViT (timm/models/levit.py): an attention-bias cache filled in eval mode -------------------------------


class ConvNorm(nn.Module):
    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(0.0)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))


class AttentionBiasCache(nn.Module):
    """timm's attention-bias cache, as LeViT, EfficientViT (MSRA), EfficientFormer and TinyViT each write it:
    ``attention_biases[:, attention_bias_idxs]`` cached per device in eval mode, cleared in train mode (a
    dict of non-leaf tensors, which ``deepcopy`` refuses)."""

    attention_biases: nn.Parameter
    attention_bias_idxs: torch.Tensor
    attention_bias_cache: dict[str, torch.Tensor]

    @torch.no_grad()
    def train(self, mode: bool = True) -> AttentionBiasCache:
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}  # clear ab cache
        return self

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        device_key = str(device)
        if device_key not in self.attention_bias_cache:
            self.attention_bias_cache[device_key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[device_key]


class LevitAttention(AttentionBiasCache):
    """levit.py ``Attention`` (use_conv=False)."""

    attention_bias_cache: dict[str, torch.Tensor]

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = int(attn_ratio * key_dim) * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + self.key_attn_dim * 2)
        self.proj = nn.Sequential(
            OrderedDict([("act", nn.Hardswish()), ("ln", LinearNorm(self.val_attn_dim, dim))])
        )
        pos = torch.stack(
            torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
        ).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        rel_pos = (rel_pos[0] * resolution) + rel_pos[1]
        self.attention_biases = nn.Parameter(torch.randn(num_heads, resolution**2) * 0.1)
        self.register_buffer("attention_bias_idxs", rel_pos, persistent=False)
        self.attention_bias_cache = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape  # noqa: RUF059  (timm's code, as it is)
        q, k, v = (
            self.qkv(x)
            .view(B, N, self.num_heads, -1)
            .split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        )
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)
        attn = q @ k * self.scale + self.get_attention_biases(x.device)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class LevitMlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.ln1 = LinearNorm(in_features, hidden_features)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(0.0)
        self.ln2 = LinearNorm(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.drop(self.act(self.ln1(x))))


class LevitBlock(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int) -> None:
        super().__init__()
        self.attn = LevitAttention(dim, key_dim, num_heads, attn_ratio=2.0, resolution=resolution)
        self.drop_path1 = nn.Identity()
        self.mlp = LevitMlp(dim, dim * 2)
        self.drop_path2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x))
        return x + self.drop_path2(self.mlp(x))


class Levit(nn.Module):
    """levit.py ``Levit`` with a Stem16, one stage of two blocks, ``global_pool='avg'``: 64x64 inputs."""

    def __init__(self, dim: int = 32, key_dim: int = 8, num_heads: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", ConvNorm(3, dim // 8, 3, stride=2, padding=1)),
                    ("act1", nn.Hardswish()),
                    ("conv2", ConvNorm(dim // 8, dim // 4, 3, stride=2, padding=1)),
                    ("act2", nn.Hardswish()),
                    ("conv3", ConvNorm(dim // 4, dim // 2, 3, stride=2, padding=1)),
                    ("act3", nn.Hardswish()),
                    ("conv4", ConvNorm(dim // 2, dim, 3, stride=2, padding=1)),
                ]
            )
        )
        self.stages = nn.Sequential(*[LevitBlock(dim, key_dim, num_heads, resolution=4) for _ in range(2)])
        self.head = NormLinear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.stages(x)
        return self.head(x.mean(dim=1))


# --- vision_transformer.py Block, timm/layers Attention and Mlp (used by PiT) --------------------------------


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.norm = nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape  # noqa: RUF059  (timm's code, as it is)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(self.norm(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# --- PiT (timm/models/pit.py): a cls token passed between modules as a tuple ---------------------------------


class SequentialTuple(nn.Sequential):
    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        for module in self:
            x = module(x)
        return x


class PitPooling(nn.Module):
    def __init__(self, in_feature: int, out_feature: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_feature,
            out_feature,
            kernel_size=stride + 1,
            padding=stride // 2,
            stride=stride,
            groups=in_feature,
        )
        self.fc = nn.Linear(in_feature, out_feature)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), self.fc(cls_token)


class PitTransformer(nn.Module):
    def __init__(
        self, base_dim: int, depth: int, heads: int, mlp_ratio: float, pool: nn.Module | None
    ) -> None:
        super().__init__()
        embed_dim = base_dim * heads
        self.pool = pool
        self.norm = nn.Identity()
        self.blocks = nn.Sequential(*[Block(embed_dim, heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, cls_tokens = x
        token_length = cls_tokens.shape[1]
        if self.pool is not None:
            x, cls_tokens = self.pool(x, cls_tokens)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((cls_tokens, x), dim=1)
        x = self.norm(x)
        x = self.blocks(x)
        cls_tokens = x[:, :token_length]
        x = x[:, token_length:]
        x = x.transpose(1, 2).reshape(B, C, H, W)
        return x, cls_tokens


class PoolingVisionTransformer(nn.Module):
    """pit.py ``PoolingVisionTransformer``: 32x32 inputs, patch 8 stride 4, two stages."""

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 8,
        stride: int = 4,
        base_dims: tuple[int, ...] = (8, 8),
        depth: tuple[int, ...] = (1, 1),
        heads: tuple[int, ...] = (2, 4),
        mlp_ratio: float = 4,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        embed_dim = base_dims[0] * heads[0]
        side = math.floor((img_size - patch_size) / stride + 1)
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=stride)
        self.pos_embed = nn.Parameter(torch.randn(1, embed_dim, side, side) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        stages: list[nn.Module] = []
        prev_dim = embed_dim
        for i in range(len(depth)):
            embed_dim = base_dims[i] * heads[i]
            pool = PitPooling(prev_dim, embed_dim, stride=2) if i > 0 else None
            stages.append(PitTransformer(base_dims[i], depth[i], heads[i], mlp_ratio, pool))
            prev_dim = embed_dim
        self.transformers = SequentialTuple(*stages)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.pos_drop(x + self.pos_embed)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x, cls_tokens = self.transformers((x, cls_tokens))
        cls_tokens = self.norm(cls_tokens)
        return self.head(self.head_drop(cls_tokens[:, 0]))


# --- CaiT (timm/models/cait.py): class attention on an expanded cls token, LayerScale gammas ------------------


class ClassAttn(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = (
            self.q(x[:, 0])
            .unsqueeze(1)
            .reshape(B, 1, self.num_heads, C // self.num_heads)
            .permute(0, 2, 1, 3)
        )
        k = self.k(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        x_cls = F.scaled_dot_product_attention(q, k, v)
        x_cls = x_cls.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(x_cls))


class TalkingHeadAttn(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class LayerScaleBlockClassAttn(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttn(dim, num_heads)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(0.1 + torch.rand(dim))
        self.gamma_2 = nn.Parameter(0.1 + torch.rand(dim))

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        u = torch.cat((x_cls, x), dim=1)
        x_cls = x_cls + self.drop_path(self.gamma_1 * self.attn(self.norm1(u)))
        return x_cls + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x_cls)))


class LayerScaleBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TalkingHeadAttn(dim, num_heads)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(0.1 + torch.rand(dim))
        self.gamma_2 = nn.Parameter(0.1 + torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Cait(nn.Module):
    """cait.py ``Cait``: 32x32 inputs, patch 8, two LayerScale blocks, two class-attention blocks."""

    def __init__(
        self, embed_dim: int = 32, depth: int = 2, num_heads: int = 4, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(8, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[LayerScaleBlock(embed_dim, num_heads) for _ in range(depth)])
        self.blocks_token_only = nn.ModuleList(
            [LayerScaleBlockClassAttn(embed_dim, num_heads) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls_tokens = blk(x, cls_tokens)
        x = self.norm(torch.cat((cls_tokens, x), dim=1))
        return self.head(self.head_drop(x[:, 0]))


# --- GhostNet (timm/models/ghostnet.py): cat, then a slice with a size written in the code ------------------


class GhostSqueezeExcite(nn.Module):
    """_efficientnet_blocks.py ``SqueezeExcite`` with ghostnet's ``gate_layer='hard_sigmoid'``."""

    def __init__(self, in_chs: int, rd_channels: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class GhostModule(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, act: bool = True) -> None:
        super().__init__()
        self.out_chs = out_chs
        init_chs = math.ceil(out_chs / 2)
        new_chs = init_chs
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init_chs, 1, 1, 0, bias=False),
            nn.BatchNorm2d(init_chs),
            nn.ReLU(inplace=True) if act else nn.Identity(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, 3, 1, 1, groups=init_chs, bias=False),
            nn.BatchNorm2d(new_chs),
            nn.ReLU(inplace=True) if act else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, : self.out_chs, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int = 1, se_rd: int = 0) -> None:
        super().__init__()
        self.stride = stride
        self.ghost1 = GhostModule(in_chs, mid_chs, act=True)
        if stride > 1:
            self.conv_dw: nn.Module | None = nn.Conv2d(
                mid_chs, mid_chs, 3, stride, 1, groups=mid_chs, bias=False
            )
            self.bn_dw: nn.Module | None = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = self.bn_dw = None
        self.se = GhostSqueezeExcite(mid_chs, se_rd) if se_rd else None
        self.ghost2 = GhostModule(mid_chs, out_chs, act=False)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None and self.bn_dw is not None:
            x = self.conv_dw(x)
            x = self.bn_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


class GhostNet(nn.Module):
    """ghostnet.py ``GhostNet`` (v1): stem, three bottlenecks (one with SE, one strided), head. 32x32 inputs.

    ``ghost1`` of the last block has ``mid_chs=27``: an odd width, so its concatenation holds 28 channels and the
    slice ``[:, :27]`` drops the last one, as ``make_divisible`` widths never do in timm's configs but user
    widths can."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(
            GhostBottleneck(16, 16, 16, 1),
            GhostBottleneck(16, 48, 24, 2, se_rd=12),
            GhostBottleneck(24, 27, 24, 1),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(24, 64, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x)))
        return self.classifier(self.flatten(x))


# --- SK-ResNet (timm/layers/selective_kernel.py, timm/models/sknet.py): split, stack, softmax over paths -----


class ConvNormAct(nn.Module):
    """conv_bn_act.py ``ConvNormAct`` with ``BatchNormAct2d`` written out as BatchNorm2d + activation."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        dilation: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, bias=False)
        self.bn = nn.Sequential(nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True) if act else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SelectiveKernelAttn(nn.Module):
    def __init__(self, channels: int, num_paths: int = 2, attn_channels: int = 32) -> None:
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.sum(1).mean((2, 3), keepdim=True)
        x = self.fc_reduce(x)
        x = self.bn(x)
        x = self.act(x)
        x = self.fc_select(x)
        B, C, H, W = x.shape
        x = x.view(B, self.num_paths, C // self.num_paths, H, W)
        return torch.softmax(x, dim=1)


class SelectiveKernel(nn.Module):
    """``SelectiveKernel`` with its defaults: kernels [3, 5] as 3x3 dilated 1 and 2, ``split_input=True``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, attn_channels: int = 8) -> None:
        super().__init__()
        self.num_paths = 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.split_input = True
        self.paths = nn.ModuleList(
            [ConvNormAct(in_channels // 2, out_channels, 3, stride, dilation=d) for d in (1, 2)]
        )
        self.attn = SelectiveKernelAttn(out_channels, self.num_paths, attn_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_split = torch.split(x, self.in_channels // self.num_paths, 1)
        x_paths = [op(x_split[i]) for i, op in enumerate(self.paths)]
        x = torch.stack(x_paths, dim=1)
        x_attn = self.attn(x)
        x = x * x_attn
        return torch.sum(x, dim=1)


class SelectiveKernelBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(inplanes, planes, 1)
        self.conv2 = SelectiveKernel(planes, planes)
        self.conv3 = ConvNormAct(planes, planes * 4, 1, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv3(self.conv2(self.conv1(x)))
        x += shortcut
        return self.act(x)


class SKResNet(nn.Module):
    """resnet.py ``ResNet`` with ``SelectiveKernelBottleneck`` blocks (skresnet50 layout, one stage, two blocks)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(SelectiveKernelBottleneck(64, 16), SelectiveKernelBottleneck(64, 16))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.act1(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


# --- NF-ResNet (timm/layers/std_conv.py, timm/models/nfnet.py): weights standardised in the forward -------


class ScaledStdConv2d(nn.Conv2d):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        bias: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
    ) -> None:
        if padding is None:
            padding = ((stride - 1) + (kernel_size - 1)) // 2
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias
        )
        self.scale = gamma * self.weight[0].numel() ** -0.5  # gamma * 1 / sqrt(fan-in)
        self.eps = eps
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SEModule(nn.Module):
    """squeeze_excite.py ``SEModule`` (rd_channels given)."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


class NormFreeBlock(nn.Module):
    """nfnet.py ``NormFreeBlock`` with ``reg=False`` (NF-ResNet), attention after conv3 (nf_seresnet)."""

    def __init__(
        self, in_chs: int, out_chs: int, alpha: float = 0.2, beta: float = 1.0, se_rd: int = 4
    ) -> None:
        super().__init__()
        mid_chs = out_chs // 4
        self.alpha = alpha
        self.beta = beta
        self.attn_gain = 2.0
        self.downsample = ScaledStdConv2d(in_chs, out_chs, 1) if in_chs != out_chs else None
        self.act1 = nn.ReLU()
        self.conv1 = ScaledStdConv2d(in_chs, mid_chs, 1)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = ScaledStdConv2d(mid_chs, mid_chs, 3)
        self.act3 = nn.ReLU()
        self.conv3 = ScaledStdConv2d(mid_chs, out_chs, 1, gain_init=1.0)
        self.attn_last = SEModule(out_chs, se_rd)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        out = self.conv3(self.act3(out))
        out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        return out * self.alpha + shortcut


class NFResNet(nn.Module):
    """nfnet.py ``NormFreeNet`` in its NF-SE-ResNet layout: a ScaledStdConv2d stem, two blocks, a Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(3, 16, 3, stride=2)
        self.stages = nn.Sequential(NormFreeBlock(16, 32), NormFreeBlock(32, 32))
        self.final_act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_act(self.stages(self.stem(x)))
        return self.fc(x.mean((2, 3)))
