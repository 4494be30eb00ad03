"""ResNet-18, with the small-image stem (3x3, stride 1, no max-pool: CIFAR) or torchvision's
ImageNet stem (7x7 of stride 2, then a 3x3 max-pool of stride 2), which runs every block on 1/16 of
the pixels: at 224 x 224, 1.8 GMACs against 27 with the small stem.

MoE twin (reference layout): both convs of every basic block are MoE convs at w = int(r * C);
the stem (full width), the 1x1 shortcuts (at width w) and the classifier are dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ConvNorm2d
from .base import ModelConfig, MoENet, ResidualBlock, chain_macs


@dataclass
class ResNetConfig(ModelConfig):
    blocks: tuple[int, ...] = (2, 2, 2, 2)


class BasicBlock(ResidualBlock):
    def __init__(self, conv, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride)
        self.conv2 = conv(out_channels, out_channels, 3, 1)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvNorm2d(in_channels, out_channels, 1, stride)

    def forward(self, x: Tensor, route) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x, route), inplace=True), route)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu(out, inplace=True)


class ResNet(MoENet):
    has_imagenet_stem = True

    def __init__(self, cfg: ResNetConfig):
        super().__init__(cfg)
        channels = cfg.dense_channels(64)
        large = self.stem_kind == "imagenet"
        self.stem = ConvNorm2d(cfg.in_channels, channels, 7 if large else 3, 2 if large else 1)
        self.pool = nn.MaxPool2d(3, 2, 1) if large else None
        blocks = []
        for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), cfg.blocks)):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(self.conv, channels, cfg.channels(width), stride))
                channels = cfg.channels(width)
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(channels, cfg.num_classes)
        self.init_weights()

    def forward_backbone(self, x: Tensor, route) -> Tensor:
        x = F.relu(self.stem(x), inplace=True)
        if self.pool is not None:
            x = self.pool(x)
        for block in self.blocks:
            x = block(x, route)
        return self.fc(x.mean((2, 3)))

    def backbone_macs(self, h: int, w: int) -> int:
        return chain_macs(self.stem, self.blocks, self.fc, h, w, self.pool)
