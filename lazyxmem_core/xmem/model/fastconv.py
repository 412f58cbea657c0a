"""A Conv2d that can run its 3x3 stride-1 case through NNPACK's Winograd kernels on the CPU.

On a CPU XMem's time is almost all 3x3 convolutions at stride 4, 8 and 16; oneDNN's direct
convolution already runs them near the cores' peak, so only fewer multiplications help.
Winograd needs about 3x fewer for 3x3 kernels at a relative error of ~1e-5 (measured against
the direct convolution), which is switched on per network (``set_winograd``), never for
autograd or non-fp32 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Calling _nnpack_available() also initialises NNPACK; without it every NNPACK call fails.
_NNPACK = bool(getattr(torch, "_nnpack_available", lambda: False)())


def winograd_available() -> bool:
    return _NNPACK


# Below this many pixels the convs are bound by reading their weights and NNPACK's transforms
# only add time (96x160 frames: 350 vs 200 ms per frame); at 480p every scale is above it.
MIN_WINOGRAD_PIXELS = 1024


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict names) with an optional Winograd path."""

    winograd = False  # set per instance by set_winograd()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.winograd and x.device.type == "cpu" and x.dtype == torch.float32
                and x.shape[-2] * x.shape[-1] >= MIN_WINOGRAD_PIXELS and not torch.is_grad_enabled()):
            # One image at a time: NNPACK's batched mode picks a slower algorithm (measured 2.7x
            # slower than two single-image calls for 2 objects at 480p).
            return torch.cat([torch._nnpack_spatial_convolution(x[i:i + 1], self.weight, self.bias, self.padding,
                                                                self.stride) for i in range(x.shape[0])])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def winograd_eligible(m: nn.Module) -> bool:
    return (isinstance(m, Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1)


def set_winograd(net: nn.Module, enabled: bool) -> int:
    """Switch the Winograd path on every eligible conv of ``net``; returns how many."""
    n = 0
    for m in net.modules():
        if winograd_eligible(m):
            m.winograd = bool(enabled and _NNPACK)
            n += 1
    return n
