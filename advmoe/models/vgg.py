"""VGG-16 with BatchNorm for small images (the reference code's classifier: 2x2 pool, 3 linear).

MoE twin (reference layout): every conv but the first is a MoE conv at w = int(r * C); the
first conv is dense at width int(r * 64). Max-pools round up, so 28x28 inputs work too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ConvNorm2d
from .base import ModelConfig, MoENet

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


@dataclass
class VGGConfig(ModelConfig):
    layers: tuple = VGG16
    hidden: int = 256  # classifier width (scaled by `width`)


class VGG(MoENet):
    def __init__(self, cfg: VGGConfig):
        super().__init__(cfg)
        features, channels = [], cfg.in_channels
        for i, spec in enumerate(cfg.layers):
            if spec == "M":
                features.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            width = cfg.channels(spec)
            features.append(ConvNorm2d(channels, width, 3, 1) if i == 0 else self.conv(channels, width, 3, 1))
            channels = width
        self.features = nn.ModuleList(features)
        hidden = cfg.dense_channels(cfg.hidden)
        self.classifier = nn.Sequential(
            nn.Linear(channels * 4, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, cfg.num_classes),
        )
        self.init_weights()

    def forward_backbone(self, x: Tensor, route) -> Tensor:
        for layer in self.features:
            x = layer(x) if isinstance(layer, nn.MaxPool2d) else F.relu(layer(x, route), inplace=True)
        x = F.adaptive_avg_pool2d(x, 2)
        return self.classifier(x.flatten(1))

    def backbone_macs(self, h: int, w: int) -> int:
        total = 0
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                h, w = -(-h // 2), -(-w // 2)
            else:
                macs, h, w = layer.macs(h, w)
                total += macs
        return total + sum(m.in_features * m.out_features for m in self.classifier if isinstance(m, nn.Linear))
