"""The shared router: one small CNN on the input image whose decision every MoE layer uses
(the reference code's design). The paper's per-layer gate is `layers.LayerGate`."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvNorm2d, pooled

ROUTERS = {"shared": "one small CNN on the input image decides for every MoE layer (the reference code)",
           "per_layer": "a gate at each MoE layer (pooled features + linear), as in the paper"}


class RouterBlock(nn.Module):
    """CIFAR ResNet basic block with the parameter-free shortcut (subsample, zero-pad channels)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = ConvNorm2d(in_channels, out_channels, 3, stride)
        self.conv2 = ConvNorm2d(out_channels, out_channels, 3, 1)
        self.stride, self.pad = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x), inplace=True))
        if self.stride != 1 or self.pad:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + x, inplace=True)


class ResNetRouter(nn.Module):
    """CIFAR ResNet with stage widths (w, 2w, 4w) and `blocks` blocks per stage, ending in a
    linear map to one logit per expert. blocks=3, width=16 is ResNet-20, the reference router;
    stride=2 makes its first conv strided, so the router sees the image at half resolution. For large
    images (`large`) it enters as the ImageNet ResNet does, a 7x7 conv of stride 2 (times `stride`) and a
    max-pool, so that at 224 x 224 it runs on 56 x 56 (28 x 28) and stays a small share of the MACs."""

    def __init__(self, in_channels: int, num_experts: int, width: int = 16, blocks: int = 3, stride: int = 1,
                 large: bool = False):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = ConvNorm2d(in_channels, width, 7, 2 * stride) if large else ConvNorm2d(in_channels, width, 3, stride)
        self.pool = nn.MaxPool2d(3, 2, 1) if large else None
        layers, channels = [], width
        for stage, out_channels in enumerate(widths):
            for i in range(blocks):
                layers.append(RouterBlock(channels, out_channels, 2 if stage > 0 and i == 0 else 1))
                channels = out_channels
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x), inplace=True)
        if self.pool is not None:
            x = self.pool(x)
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))

    def macs(self, h: int, w: int) -> int:
        total, h, w = self.stem.macs(h, w)
        if self.pool is not None:
            h, w = pooled(self.pool, h), pooled(self.pool, w)
        for block in self.blocks:
            m1, h, w = block.conv1.macs(h, w)
            m2, h, w = block.conv2.macs(h, w)
            total += m1 + m2
        return total + self.fc.in_features * self.fc.out_features
