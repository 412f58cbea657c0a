"""Random XMem weights in the official checkpoint layout, for tests, benchmarks and parity checks.

Plain random init makes a deep ResNet's features vanish, so every conv is rescaled once, data-
driven, to unit output deviation, and the BatchNorm statistics are taken from the same pass:
the resulting network has lively features, so tests and parity checks exercise real numbers.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from .model.network import XMemNet


def random_state_dict(seed: int = 0, sensory: bool = True, stage0: bool = False,
                      key_scale: float = 1.5) -> dict[str, torch.Tensor]:
    """A state dict with exactly the official key set (XMem / XMem-s012, or no-sensory);
    stage0: a 4-channel value_encoder.conv1.weight, as stage-0 checkpoints have. key_scale: the
    spread of the keys; larger makes top-k affinities sharper (near ties at the k-th element then
    matter less), too large makes every weight underflow on noisy frames."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = XMemNet(hidden_dim=64 if sensory else 0)
    hooks = []

    def unit_std(mod: nn.Module, _inp, out: torch.Tensor) -> torch.Tensor:
        std = out.std().clamp_min(1e-6)
        with torch.no_grad():
            mod.weight.div_(std)
            if mod.bias is not None:
                mod.bias.div_(std)
        return out / std

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(unit_std))
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running stats = this pass's statistics
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    net.train()
    with torch.no_grad():
        # Two passes (BN statistics accumulate): normalised uniform noise, the hardest input
        # (largest activations), then a smooth image; soft blob-like masks for two objects.
        smooth = nn.functional.interpolate(torch.randn(1, 3, 8, 12, generator=g), size=(96, 128), mode="bilinear")
        noise = (torch.rand(1, 3, 96, 128, generator=g) - 0.45) / 0.226
        masks = torch.sigmoid(3 * nn.functional.interpolate(torch.randn(1, 2, 6, 8, generator=g), size=(96, 128),
                                                            mode="bilinear"))[0]
        for img in (smooth, noise):
            feats = net.encode_key(img)
            value, _ = net.encode_value(img, feats["f16"], masks, None, False)
            hidden = torch.zeros(2, net.hidden_dim, *value.shape[-2:]) if sensory else None
            if sensory:
                net.value_encoder.hidden_reinforce(value, hidden)
            g16, g8, g4, logits = net.decode(feats, value, hidden)
            if sensory:
                net.update_hidden(g16, g8, g4, logits, hidden)
    for h in hooks:
        h.remove()
    net.eval()
    with torch.no_grad():
        # Similarities are exp'ed without max subtraction (as trained): keep key distances in the
        # range a trained model has, or every top-k weight underflows.
        for conv, scale in ((net.key_proj.key_proj, key_scale), (net.key_proj.d_proj, 0.3)):
            conv.weight.mul_(scale)
            conv.bias.mul_(scale)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if stage0:
        sd["value_encoder.conv1.weight"] = sd["value_encoder.conv1.weight"][:, :4].clone()
    return sd


def save_random_checkpoint(path: str | Path, seed: int = 0, sensory: bool = True, stage0: bool = False) -> Path:
    path = Path(path)
    torch.save(random_state_dict(seed, sensory, stage0), path)
    return path


@functools.lru_cache(maxsize=4)
def shared_random_state_dict(seed: int = 0, sensory: bool = True) -> dict[str, torch.Tensor]:
    """random_state_dict, made once per process (tests): read it, never modify it."""
    return random_state_dict(seed, sensory)
