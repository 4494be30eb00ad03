"""Wide ResNet (Zagoruyko & Komodakis), pre-activation blocks; WRN-28-10 by default.

MoE twin (reference layout): conv1, conv2 and the 1x1 shortcut of every block are MoE convs at
w = int(r * C); the stem is dense at width int(r * 16). Unlike the reference code, the first
block of a stage feeds bn1's output to conv1 too (the reference leaves bn1 unused there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ConvNorm2d
from .base import ModelConfig, MoENet, ResidualBlock, chain_macs


@dataclass
class WideResNetConfig(ModelConfig):
    depth: int = 28
    widen_factor: int = 10
    drop_rate: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"invalid model config: WRN depth={self.depth} must be 6n + 4 (10, 16, 22, 28, ...)")


class WideBlock(ResidualBlock):
    def __init__(self, conv, in_channels: int, out_channels: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, stride, norm=True)  # its norm is the block's bn2
        self.conv2 = conv(out_channels, out_channels, 3, 1, norm=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv(in_channels, out_channels, 1, stride, norm=False)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor, route) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.conv1(pre, route), inplace=True)
        if self.drop_rate:
            out = F.dropout(out, self.drop_rate, self.training)
        out = self.conv2(out, route)
        return out + (x if self.shortcut is None else self.shortcut(pre, route))


class WideResNet(MoENet):
    def __init__(self, cfg: WideResNetConfig):
        super().__init__(cfg)
        per_stage = (cfg.depth - 4) // 6
        channels = cfg.channels(16)
        self.stem = ConvNorm2d(cfg.in_channels, channels, 3, 1, norm=False)
        blocks = []
        for stage, width in enumerate((16 * cfg.widen_factor, 32 * cfg.widen_factor, 64 * cfg.widen_factor)):
            for i in range(per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(WideBlock(self.conv, channels, cfg.channels(width), stride, cfg.drop_rate))
                channels = cfg.channels(width)
        self.blocks = nn.ModuleList(blocks)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, cfg.num_classes)
        self.init_weights()

    def forward_backbone(self, x: Tensor, route) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, route)
        x = F.relu(self.bn(x))
        return self.fc(x.mean((2, 3)))

    def backbone_macs(self, h: int, w: int) -> int:
        return chain_macs(self.stem, self.blocks, self.fc, h, w)
