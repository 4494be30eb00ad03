"""DenseNet for small images (Huang et al.); DenseNet-40, growth 12, no bottleneck by default.

MoE twin: the convs of the dense layers are MoE convs; the stem, the transitions and the
classifier are dense, all at r times the dense twin's width (growth int(r * k)). The reference
code's MoE DenseNet crashes at construction; this one is the same idea, working.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ConvNorm2d
from .base import ModelConfig, MoENet, chain_macs


@dataclass
class DenseNetConfig(ModelConfig):
    depth: int = 40
    growth_rate: int = 12
    bottleneck: bool = False  # DenseNet-BC: a 1x1 conv to 4k channels before each 3x3
    compression: float = 1.0  # transition width over its input width
    drop_rate: float = 0.0

    def validate(self) -> None:
        super().validate()
        per_block = 6 if self.bottleneck else 3
        if self.depth < 10 or (self.depth - 4) % per_block:
            raise ValueError(f"invalid model config: DenseNet depth={self.depth} must be {per_block}n + 4")
        if not 0 < self.compression <= 1:
            raise ValueError(f"invalid model config: compression={self.compression} must be in (0, 1]")


def _batchnorm(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm as scale and shift while exporting: with the shared router a group's
    size is known only at run time, and the BatchNorm kernel guards on it where arithmetic does not."""
    if norm.training or not torch.compiler.is_exporting():
        return norm(x)
    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
    shift = (norm.bias.detach() - norm.running_mean * scale)
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class DenseLayer(nn.Module):
    def __init__(self, conv, in_channels: int, growth: int, bottleneck: bool, drop_rate: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.reduce = conv(in_channels, 4 * growth, 1, 1, norm=True) if bottleneck else None
        self.conv = conv(4 * growth if bottleneck else in_channels, growth, 3, 1, norm=False)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor, route) -> Tensor:
        out = F.relu(_batchnorm(self.norm, x))
        if self.reduce is not None:
            out = F.relu(self.reduce(out, route), inplace=True)
        out = self.conv(out, route)
        if self.drop_rate:
            out = F.dropout(out, self.drop_rate, self.training)
        return torch.cat([x, out], 1)

    def macs(self, h: int, w: int) -> tuple[int, int, int]:
        return sum(c.macs(h, w)[0] for c in (self.reduce, self.conv) if c is not None), h, w


class Transition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = ConvNorm2d(in_channels, out_channels, 1, 1, norm=False)

    def forward(self, x: Tensor, route=None) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(_batchnorm(self.norm, x))), 2)

    def macs(self, h: int, w: int) -> tuple[int, int, int]:
        return self.conv.macs(h, w)[0], h // 2, w // 2


class DenseNet(MoENet):
    def __init__(self, cfg: DenseNetConfig):
        super().__init__(cfg)
        per_block = (cfg.depth - 4) // (6 if cfg.bottleneck else 3)
        growth = cfg.channels(cfg.growth_rate)
        channels = cfg.channels(2 * cfg.growth_rate if cfg.bottleneck else 16)
        self.stem = ConvNorm2d(cfg.in_channels, channels, 3, 1, norm=False)
        layers = []
        for block in range(3):
            for _ in range(per_block):
                layers.append(DenseLayer(self.conv, channels, growth, cfg.bottleneck, cfg.drop_rate))
                channels += growth
            if block < 2:
                out = max(1, int(cfg.compression * channels))
                layers.append(Transition(channels, out))
                channels = out
        self.layers = nn.ModuleList(layers)
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, cfg.num_classes)
        self.init_weights()

    def forward_backbone(self, x: Tensor, route) -> Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x, route)
        x = F.relu(_batchnorm(self.norm, x))
        return self.fc(x.mean((2, 3)))

    def backbone_macs(self, h: int, w: int) -> int:
        return chain_macs(self.stem, self.layers, self.fc, h, w)
