"""XMem's building blocks. Objects are folded into the batch dimension: a per-object feature
map is (num_objects, C, H, W); an image feature is (1, C, H, W) and shared by all objects."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fastconv import Conv2d
from .resnet import BasicBlock, Bottleneck, make_layer, stem


def conv3x3(cin: int, cout: int) -> Conv2d:
    return Conv2d(cin, cout, 3, padding=1)


class GroupResBlock(nn.Module):
    """out = conv2(relu(conv1(relu(g)))) + (downsample(g) when the width changes, else g)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.downsample = conv3x3(cin, cout) if cin != cout else None
        self.conv1 = conv3x3(cin, cout)
        self.conv2 = conv3x3(cout, cout)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(F.relu(g))))
        return out + (g if self.downsample is None else self.downsample(g))


class _Wrapped(nn.Module):
    """Only there for the checkpoint's ``...spatial.conv`` key names."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ChannelGate(nn.Module):
    def __init__(self, c: int, reduction: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, c // reduction), nn.ReLU(), nn.Linear(c // reduction, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))
        return x * torch.sigmoid(att)[:, :, None, None]


class SpatialGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spatial = _Wrapped(nn.Conv2d(2, 1, 7, padding=3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.ChannelGate = ChannelGate(c)
        self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class FeatureFusionBlock(nn.Module):
    """block1(cat(x, g)) -> + CBAM -> block2, with x an image feature shared by all objects.

    block1's convs are linear in their input, so the part of conv(cat(x, g)) that reads x is
    computed once per frame, not once per object. x must be non-negative (it is a ReLU output,
    the key encoder's f16), so relu(x) = x and conv1's and the shortcut's x parts are one conv.
    """

    def __init__(self, x_dim: int, g_dim: int, mid_dim: int, out_dim: int) -> None:
        super().__init__()
        self.x_dim = x_dim
        self.block1 = GroupResBlock(x_dim + g_dim, mid_dim)
        self.attention = CBAM(mid_dim)
        self.block2 = GroupResBlock(mid_dim, out_dim)
        self._split: tuple[Conv2d, Conv2d, Conv2d] | None = None

    def prepare(self) -> None:
        """Split block1's weights into their x and g parts (after the weights are loaded)."""
        b, cx = self.block1, self.x_dim
        mid = b.conv1.out_channels
        x_conv = Conv2d(cx, 2 * mid, 3, padding=1)
        g1 = Conv2d(b.conv1.in_channels - cx, mid, 3, padding=1, bias=False)
        gd = Conv2d(b.conv1.in_channels - cx, mid, 3, padding=1, bias=False)
        with torch.no_grad():
            x_conv.weight.copy_(torch.cat([b.conv1.weight[:, :cx], b.downsample.weight[:, :cx]], 0))
            x_conv.bias.copy_(torch.cat([b.conv1.bias, b.downsample.bias], 0))
            g1.weight.copy_(b.conv1.weight[:, cx:])
            gd.weight.copy_(b.downsample.weight[:, cx:])
        for c in (x_conv, g1, gd):
            c.requires_grad_(False)
            c.winograd = b.conv1.winograd
        self._split = (x_conv, g1, gd)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half() must move the split convs too
        super()._apply(fn, *args, **kwargs)
        if self._split is not None:
            # Kept out of the module tree so the state dict stays the checkpoint's; nn.Module
            # therefore does not see them, and they would stay behind on the CPU.
            self._split = tuple(c._apply(fn, *args, **kwargs) for c in self._split)
        return self

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self._split is None:  # plain form, as the checkpoint defines it
            g = self.block1(torch.cat([x.expand(g.shape[0], -1, -1, -1), g], 1))
        else:
            x_conv, g1, gd = self._split
            mid = g1.out_channels
            xs = x_conv(x)
            out = g1(F.relu(g)) + xs[:, :mid]
            out = self.block1.conv2(F.relu(out))
            g = out + (gd(g) + xs[:, mid:])
        return self.block2(g + self.attention(g))


def gated_update(values: torch.Tensor, h: torch.Tensor, hidden_dim: int) -> torch.Tensor:
    """XMem's GRU-like unit: the new value comes before the forget gate (as trained)."""
    forget = torch.sigmoid(values[:, :hidden_dim])
    update = torch.sigmoid(values[:, hidden_dim:2 * hidden_dim])
    new = torch.tanh(values[:, 2 * hidden_dim:])
    return forget * h * (1 - update) + update * new


class HiddenReinforcer(nn.Module):
    """Deep update of the sensory memory from a new memory value (value encoder)."""

    def __init__(self, g_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.transform = conv3x3(g_dim + hidden_dim, 3 * hidden_dim)

    def forward(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gated_update(self.transform(torch.cat([g, h], 1)), h, self.hidden_dim)


class HiddenUpdater(nn.Module):
    """Normal update of the sensory memory from the decoder's three scales."""

    def __init__(self, g_dims: tuple[int, int, int], mid_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.g16_conv = Conv2d(g_dims[0], mid_dim, 1)
        self.g8_conv = Conv2d(g_dims[1], mid_dim, 1)
        self.g4_conv = Conv2d(g_dims[2], mid_dim, 1)
        self.transform = conv3x3(mid_dim + hidden_dim, 3 * hidden_dim)

    def forward(self, g16: torch.Tensor, g8: torch.Tensor, g4: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        g = (self.g16_conv(g16) + self.g8_conv(F.interpolate(g8, scale_factor=0.5, mode="area"))
             + self.g4_conv(F.interpolate(g4, scale_factor=0.25, mode="area")))
        return gated_update(self.transform(torch.cat([g, h], 1)), h, self.hidden_dim)


class KeyEncoder(nn.Module):
    """ResNet-50 up to layer3: f4 (256 ch), f8 (512), f16 (1024)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.maxpool = stem(3)
        self.res2 = make_layer(Bottleneck, 64, 64, 3, 1)
        self.layer2 = make_layer(Bottleneck, 256, 128, 4, 2)
        self.layer3 = make_layer(Bottleneck, 512, 256, 6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        f4 = self.res2(x)
        f8 = self.layer2(f4)
        return self.layer3(f8), f8, f4


class KeyProjection(nn.Module):
    """key, shrinkage d^2 + 1 and selection sigmoid(e): three 3x3 convs on f16."""

    def __init__(self, in_dim: int, key_dim: int) -> None:
        super().__init__()
        self.key_proj = conv3x3(in_dim, key_dim)
        self.d_proj = conv3x3(in_dim, 1)
        self.e_proj = conv3x3(in_dim, key_dim)

    def forward(self, f16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Shrinkage is only needed on memory frames, but that is decided after step: one
        # 1-channel conv is cheap enough to compute always.
        return self.key_proj(f16), self.d_proj(f16) ** 2 + 1, torch.sigmoid(self.e_proj(f16))


class ValueEncoder(nn.Module):
    """Per object: [image, its mask, the other objects' masks] -> ResNet-18 to layer3 -> fuse with f16."""

    def __init__(self, value_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.maxpool = stem(5)  # image, its mask, the other objects' masks
        self.layer1 = make_layer(BasicBlock, 64, 64, 2, 1)
        self.layer2 = make_layer(BasicBlock, 64, 128, 2, 2)
        self.layer3 = make_layer(BasicBlock, 128, 256, 2, 2)
        self.fuser = FeatureFusionBlock(1024, 256, value_dim, value_dim)
        self.hidden_reinforce = HiddenReinforcer(value_dim, hidden_dim) if hidden_dim > 0 else None

    def forward(self, image: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """image (1, 3, H, W), masks (N, H, W) soft probabilities -> values (N, C_v, H/16, W/16)."""
        n = masks.shape[0]
        others = masks.sum(0, keepdim=True) - masks if n > 1 else torch.zeros_like(masks)
        g = torch.cat([image.expand(n, -1, -1, -1), masks[:, None], others[:, None]], 1)
        # BN then max-pool then ReLU, the official order (equal to ReLU first: both monotone).
        g = F.relu(self.maxpool(self.bn1(self.conv1(g))))
        g = self.layer3(self.layer2(self.layer1(g)))
        return self.fuser(f16, g)


class UpsampleBlock(nn.Module):
    """skip_conv(skip feature) + bilinear x2 of the coarser per-object feature -> GroupResBlock."""

    def __init__(self, skip_dim: int, up_dim: int, out_dim: int) -> None:
        super().__init__()
        self.skip_conv = conv3x3(skip_dim, up_dim)
        self.out_conv = GroupResBlock(up_dim, out_dim)

    def forward(self, skip: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = F.interpolate(g, scale_factor=2, mode="bilinear", align_corners=False)
        return self.out_conv(self.skip_conv(skip) + g)


class Decoder(nn.Module):
    def __init__(self, value_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fuser = FeatureFusionBlock(1024, value_dim + hidden_dim, 512, 512)
        self.hidden_update = HiddenUpdater((512, 256, 257), 256, hidden_dim) if hidden_dim > 0 else None
        self.up_16_8 = UpsampleBlock(512, 512, 256)
        self.up_8_4 = UpsampleBlock(256, 256, 256)
        self.pred = conv3x3(256, 1)

    def forward(self, f16: torch.Tensor, f8: torch.Tensor, f4: torch.Tensor, readout: torch.Tensor,
                hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns g16, g8, g4 (kept for the hidden update) and the logits at stride 4 (N, 1, h, w)."""
        g = readout if hidden is None else torch.cat([readout, hidden], 1)
        g16 = self.fuser(f16, g)
        g8 = self.up_16_8(f8, g16)
        g4 = self.up_8_4(f4, g8)
        return g16, g8, g4, self.pred(F.relu(g4))
