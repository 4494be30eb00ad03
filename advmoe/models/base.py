"""What every architecture shares: the config, input normalization, routing and the two
executions ("masked" for training, "sparse" for inference)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from ..dispatch import capacity_dispatch, dispatch
from ..gate import GATE_GRADS, Route, needs_every_expert, route, sort_by_expert
from ..layers import ConvNorm2d, LayerGate, MoEConv2d, Normalize, _ConvUnit, pooled
from ..routers import ROUTERS, ResNetRouter
from ..runtimes import EXECUTIONS


STEMS = {"auto": "the ImageNet stem for images over 64 pixels where the architecture has one, else the small one",
         "small": "a 3x3 convolution of stride 1 (CIFAR-sized images)",
         "imagenet": "a 7x7 convolution of stride 2 and a 3x3 max-pool of stride 2 (ResNet-18 only)"}
LARGE_IMAGE = 64


@dataclass
class ModelConfig:
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32  # what the model is trained for; every architecture accepts 28, 32, 64
    width: float = 1.0  # multiplies every channel count: small models for CPU runs
    num_experts: int = 0  # 0: the dense twin
    expert_ratio: float = 1.0  # an expert's width over the dense twin's (r)
    router: str = "shared"  # "shared": one CNN on the image; "per_layer": a gate per MoE layer
    top_k: int = 1
    router_width: int = 16
    router_blocks: int = 3  # blocks per stage of the shared router: 3 = ResNet-20 (reference)
    # stride of the shared router's first conv: 2 runs the router on a quarter of the pixels. Its
    # narrow convs at full resolution were a quarter of the shipped model's time (docs/sparse.md).
    router_stride: int = 1
    gate_grad: str = "softmax"  # where the straight-through gradient goes (gate.GATE_GRADS); top-1 only
    # "small": a 3x3 conv at full resolution (CIFAR-sized images); "imagenet": a 7x7 conv of stride 2
    # and a max-pool, as torchvision's ResNet, for an architecture that has one (STEMS)
    stem: str = "auto"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def stem_kind(self, has_imagenet: bool) -> str:
        """The stem this config builds in an architecture with (or without) an ImageNet stem: "auto"
        takes it for images over LARGE_IMAGE pixels, where a full-resolution stem costs 16x the MACs."""
        if self.stem == "imagenet" and not has_imagenet:
            raise ValueError("invalid model config: stem=imagenet is ResNet-18's (resnet18, moe_resnet18); this "
                             "architecture has the small-image stem only: use resnet18 for large images")
        if self.stem == "auto":
            return "imagenet" if has_imagenet and self.image_size > LARGE_IMAGE else "small"
        return self.stem

    def dense_channels(self, channels: int) -> int:
        """Width of a layer the MoE model keeps at the dense twin's width."""
        return max(1, int(channels * self.width))

    def channels(self, channels: int) -> int:
        """Width of a layer the MoE model runs at w = int(r * C)."""
        return max(1, int(self.expert_ratio * self.dense_channels(channels)))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"invalid model config: {msg}")

        if self.num_classes < 1 or self.in_channels < 1:
            bad(f"num_classes={self.num_classes} and in_channels={self.in_channels} must be >= 1")
        if self.image_size < 8:
            bad(f"image_size={self.image_size} is too small; use 28, 32 or 64")
        if self.stem not in STEMS:
            bad(f"stem={self.stem!r}; choose one of {tuple(STEMS)}")
        if self.width <= 0:
            bad(f"width={self.width} must be > 0")
        if self.is_moe:
            if self.num_experts < 2:
                bad(f"num_experts={self.num_experts}: a MoE model needs at least 2 experts (0 = the dense twin)")
            if not 0 < self.expert_ratio <= 1:
                bad(f"expert_ratio={self.expert_ratio} must be in (0, 1]")
            if self.router not in ROUTERS:
                bad(f"router={self.router!r}; choose one of {tuple(ROUTERS)}")
            if not 1 <= self.top_k <= self.num_experts:
                bad(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
            if self.router_width < 1 or self.router_blocks < 1 or self.router_stride not in (1, 2):
                bad("router_width and router_blocks must be >= 1, router_stride 1 or 2")
            if self.gate_grad not in GATE_GRADS:
                bad(f"gate_grad={self.gate_grad!r}; choose one of {tuple(GATE_GRADS)}")
        elif self.expert_ratio != 1:
            bad(f"expert_ratio={self.expert_ratio} needs experts; the dense twin has num_experts=0")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) not in (1, self.in_channels):
                bad(f"{name} has {len(value)} values; give 1 or in_channels={self.in_channels}")
        if any(s <= 0 for s in self.std):
            bad(f"std={self.std} must be positive")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class MoENet(nn.Module):
    """Base class: subclasses build their layers with `self.conv(...)` (a MoE conv in the MoE
    model, a dense conv in its twin) and implement `forward_backbone(x, route)` and
    `backbone_macs(h, w)`."""

    has_imagenet_stem = False  # an architecture that has one builds it for stem_kind == "imagenet"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.stem_kind = cfg.stem_kind(self.has_imagenet_stem)
        channels = cfg.in_channels
        self.normalize = Normalize(_per_channel(cfg.mean, channels), _per_channel(cfg.std, channels))
        self.router = None
        if cfg.is_moe and cfg.router == "shared":
            # the router has an ImageNet entry whatever the backbone has: it takes it by the same rule
            self.router = ResNetRouter(channels, cfg.num_experts, cfg.router_width, cfg.router_blocks, cfg.router_stride,
                                       large=cfg.stem_kind(has_imagenet=True) == "imagenet")
        self.execution = "masked"
        self.capacity_buckets: tuple[int, ...] = ()  # static execution's capacities (set_execution)
        self.capacity: int | None = None  # static execution with the shared router: this capacity (graphs.py)
        self.expert_dtype: torch.dtype | None = None  # the experts (a dense model: all of it) under this autocast
        # Masked execution computes only the chosen experts when gradients flow and need no
        # other (`needs_every_expert`); False computes every expert always (benchmarks, tests).
        self.skip_unchosen = True
        self.channels_last = False
        self.last_routing: Tensor | None = None  # [B, n_moe_layers]: expert per sample and layer
        self.last_route = None  # the shared router's last Route (masked execution)
        self._folded_key: list | None = None  # versions of the weights the folded copies come from
        self._fold_sources: list[Tensor] = []

    # -- building ---------------------------------------------------------------------------
    def conv(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, norm: bool = True):
        cfg = self.cfg
        if not cfg.is_moe:
            return ConvNorm2d(in_channels, out_channels, kernel_size, stride, norm)
        return MoEConv2d(
            in_channels, out_channels, kernel_size, stride, norm,
            num_experts=cfg.num_experts, top_k=cfg.top_k, gate=cfg.router == "per_layer", gate_grad=cfg.gate_grad,
        )

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- parameter groups (AdvMoE trains them with separate optimisers) --------------------
    @cached_property
    def moe_layers(self) -> list[MoEConv2d]:
        """The MoE convs in module order: the columns of `last_routing`."""
        return [m for m in self.modules() if isinstance(m, MoEConv2d)]

    def router_parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules():
            if isinstance(m, (ResNetRouter, LayerGate)):
                yield from m.parameters()

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        router = {id(p) for p in self.router_parameters()}
        return (p for p in self.parameters() if id(p) not in router)

    # -- forward ----------------------------------------------------------------------------
    def forward_backbone(self, x: Tensor, route) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        logits, self.last_routing = self.forward_with_routing(x)
        return logits

    def forward_with_routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [B, classes] and the expert chosen per sample and MoE layer [B, n_moe_layers]
        (best first for top-k; [B, 0] for a dense model). What export traces."""
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected input [B, {self.cfg.in_channels}, H, W], got {list(x.shape)}")
        x = self.normalize(x)
        if self.execution != "masked":
            if not torch.compiler.is_exporting():  # export traces the weights folded before it
                self._prepare_sparse()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        if not self.cfg.is_moe:
            with self._expert_precision(x):
                logits = self.forward_backbone(x, None).float()
            return logits, torch.zeros((x.shape[0], 0), dtype=torch.long, device=x.device)
        n_layers = len(self.moe_layers)
        if self.router is None:  # per-layer gates: each MoE layer routes its own input
            logits = self.forward_backbone(x, None)
            return logits, torch.stack([m.last_route.top1 for m in self.moe_layers], 1)
        router_logits = self.router(x)
        if self.execution != "masked" and self.cfg.top_k == 1:
            # One decision for every layer: group the batch once, run a whole sub-network per group.
            experts = router_logits.argmax(1, keepdim=True)  # in float32: a route never flips on rounding
            with self._expert_precision(x):
                if self.execution == "static":
                    logits = capacity_dispatch(x, experts, self.cfg.num_experts, self.forward_backbone,
                                               capacity=self.capacity, buckets=self.capacity_buckets)
                else:
                    logits = dispatch(x, experts, self.cfg.num_experts, self.forward_backbone)
            logits = logits.float()
            self.last_route = None
            return logits, experts.expand(-1, n_layers)
        gate = self.last_route = route(router_logits, self.cfg.top_k, self.cfg.gate_grad)
        if self._skips_unchosen_now(x, gate):
            # Sort the batch by expert, run each expert on its own rows, put the rows back.
            order, sorted_route = sort_by_expert(gate, self.cfg.num_experts)
            logits = self.forward_backbone(x.index_select(0, order), sorted_route)
            logits = torch.empty_like(logits).index_copy(0, order, logits)
        else:
            logits = self.forward_backbone(x, gate)
        return logits, gate.top1[:, None].expand(-1, n_layers)

    def _expert_precision(self, x: Tensor):
        """bf16 (or fp16) autocast for the experts when expert_dtype asks for it, else nothing."""
        if self.expert_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.expert_dtype)

    @property
    def can_skip_unchosen(self) -> bool:
        """Whether masked execution may run only the chosen experts wherever the router learns:
        a shared top-1 router and a gate gradient that needs no unchosen expert's output
        (`needs_every_expert`)."""
        return self.router is not None and not needs_every_expert(self.cfg.top_k, self.cfg.gate_grad)

    def _skips_unchosen_now(self, x: Tensor, gate: Route) -> bool:
        # Only where gradients flow (training, attacks): without them masked execution stays the
        # reference's every-expert path that benchmarks and `ADVMOE_EXECUTION=masked` compare
        # against. Not while tracing: the slices have data-dependent sizes.
        safe = self.router is not None and not needs_every_expert(self.cfg.top_k, self.cfg.gate_grad,
                                                                  gate.weights.requires_grad)
        return (self.skip_unchosen and safe and torch.is_grad_enabled() and x.shape[0] > 0
                and not torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not torch.jit.is_tracing())

    @property
    def router_scores(self) -> Tensor | None:
        """Softmax scores of the routers in the last masked forward: [B, N] for the shared
        router, [B, n_moe_layers, N] for per-layer gates."""
        return self._last_routes("scores")

    @property
    def router_logits(self) -> Tensor | None:
        """Logits of the routers in the last masked forward, shaped as `router_scores`. Router
        losses and attacks take their log_softmax: the log of a saturated softmax clamped away
        from zero has no gradient, exactly where a confident route needs one."""
        return self._last_routes("logits")

    def _last_routes(self, attr: str) -> Tensor | None:
        if not self.cfg.is_moe:
            return None
        if self.router is None:
            return torch.stack([getattr(m.last_route, attr) for m in self.moe_layers], 1)
        return getattr(self.last_route, attr) if self.last_route is not None else None

    def shared_router_logits(self, x: Tensor) -> Tensor:
        """The shared router's logits [B, N] for raw pixels x, without running the backbone
        (AdvMoE's router step: the router alone on x and x')."""
        if self.router is None:
            raise ValueError("the model has no shared router (per-layer gates need the backbone)")
        return self.router(self.normalize(x))

    def _prepare_sparse(self) -> None:
        if self.training:
            raise RuntimeError(
                "sparse execution is inference-only: call model.eval(), "
                "or set_execution(model, 'masked') to train"
            )
        # Fold BatchNorm into detached inference weights; fold again whenever a weight or a
        # running statistic changed since (optimizer step, load_state_dict, .to(device)).
        # The tensors are listed once: walking the modules on every call costs ~1 ms.
        if self._folded_key is None:
            self._fold_sources = [*self.parameters(), *self.buffers()]
        key = [(t.data_ptr(), t._version) for t in self._fold_sources]
        if key != self._folded_key:
            for m in self.modules():
                if isinstance(m, _ConvUnit):
                    m.fold(self.channels_last)
            self._folded_key = key

    # -- cost -------------------------------------------------------------------------------
    def backbone_macs(self, h: int, w: int) -> int:
        raise NotImplementedError

    def macs(self, h: int, w: int) -> int:
        """MACs per image of the path sparse execution runs (conv and linear layers), router included."""
        router = self.router.macs(h, w) if self.router is not None else 0
        return router + self.backbone_macs(h, w)


class ResidualBlock(nn.Module):
    """A block of conv1 -> conv2 plus a shortcut (a conv on the block's input, or identity)."""

    def macs(self, h: int, w: int) -> tuple[int, int, int]:
        m1, ho, wo = self.conv1.macs(h, w)
        m2, ho, wo = self.conv2.macs(ho, wo)
        m3 = self.shortcut.macs(h, w)[0] if self.shortcut is not None else 0
        return m1 + m2 + m3, ho, wo


def chain_macs(stem: nn.Module, blocks: nn.ModuleList, head: nn.Linear, h: int, w: int,
               pool: nn.MaxPool2d | None = None) -> int:
    """MACs of stem -> (pool) -> blocks -> linear head, each block reporting (macs, h, w)."""
    total, h, w = stem.macs(h, w)
    if pool is not None:  # no MACs, but every later layer sees its output size
        h, w = pooled(pool, h), pooled(pool, w)
    for block in blocks:
        macs, h, w = block.macs(h, w)
        total += macs
    return total + head.in_features * head.out_features


def set_execution(model: nn.Module, mode: str, channels_last: bool = True,
                  capacity_buckets: tuple[int, ...] = ()) -> nn.Module:
    """"masked": every expert computed, the chosen kept (training, gradients flow).
    "sparse": inference; each sample runs its chosen experts only, BatchNorm folded, channels_last.
    "static": the sparse path with static shapes (dispatch.capacity_dispatch): every expert runs on
    its group padded to the batch, or to the smallest of `capacity_buckets` that holds the largest
    group (one read of the group sizes per forward and MoE layer).
    For a dense model "sparse" and "static" are the same inference preparation without experts."""
    if mode not in EXECUTIONS:
        raise ValueError(f"execution must be one of {tuple(EXECUTIONS)}, got {mode!r}")
    if not isinstance(model, MoENet):
        raise TypeError(f"set_execution needs an advmoe model, got {type(model).__name__}")
    if any(b < 1 for b in capacity_buckets):
        raise ValueError(f"capacity buckets must be >= 1, got {capacity_buckets}")
    model.execution, model.channels_last = mode, channels_last and mode != "masked"
    model.capacity_buckets, model.capacity = tuple(capacity_buckets), None
    model._folded_key = None
    for m in model.modules():
        if isinstance(m, _ConvUnit):
            m.unfold()
        if isinstance(m, MoEConv2d):
            m.capacity_buckets = model.capacity_buckets if mode == "static" else None
    return model


def set_gate_grad(model: nn.Module, grad: str) -> nn.Module:
    """Where the straight-through gradient of the gate goes from now on (gate.GATE_GRADS), for
    the shared router and every per-layer gate. The forward pass is the same either way: only
    training and gradient attacks see the change. It is part of the config a checkpoint saves."""
    if grad not in GATE_GRADS:
        raise ValueError(f"gate grad must be one of {tuple(GATE_GRADS)}, got {grad!r}")
    if not isinstance(model, MoENet):
        raise TypeError(f"set_gate_grad needs an advmoe model, got {type(model).__name__}")
    model.cfg.gate_grad = grad
    for m in model.moe_layers:
        m.gate_grad = grad
    return model


def _per_channel(values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values * channels if len(values) == 1 else values
