"""The XMem network: key encoder + key projection, value encoder, decoder, soft aggregation."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .fastconv import set_winograd
from .modules import (
    Decoder,
    FeatureFusionBlock,
    KeyEncoder,
    KeyProjection,
    ValueEncoder,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def aggregate(prob: torch.Tensor) -> torch.Tensor:
    """Soft aggregation of N object probabilities (N, H, W) -> (N+1, H, W), background first."""
    q = torch.cat([torch.prod(1 - prob, 0, keepdim=True), prob], 0).clamp(1e-7, 1 - 1e-7)
    return F.softmax(torch.log(q / (1 - q)), 0)


class XMemNet(nn.Module):
    def __init__(self, key_dim: int = 64, value_dim: int = 512, hidden_dim: int = 64) -> None:
        super().__init__()
        self.key_dim, self.value_dim, self.hidden_dim = key_dim, value_dim, hidden_dim
        self.key_encoder = KeyEncoder()
        self.value_encoder = ValueEncoder(value_dim, hidden_dim)
        self.key_proj = KeyProjection(1024, key_dim)
        self.decoder = Decoder(value_dim, hidden_dim)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], fast: bool = True, winograd: bool = False) -> XMemNet:
        """Strict load of an official-layout state dict (dims read from it), then eval mode.

        fast: fold BatchNorm into the convs and split the fusion blocks' weights (same outputs
        up to float rounding). winograd: 3x3 convs through NNPACK on the CPU (see fastconv).
        """
        sd = dict(sd)
        w = sd.get("value_encoder.conv1.weight")
        if w is not None and w.shape[1] == 4:  # stage-0 weights: zero 5th channel (no other objects)
            sd["value_encoder.conv1.weight"] = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
        hidden = sd["decoder.hidden_update.transform.weight"].shape[0] // 3 if "decoder.hidden_update.transform.weight" in sd else 0
        net = cls(sd["key_proj.key_proj.weight"].shape[0], sd["value_encoder.fuser.block2.conv2.weight"].shape[0], hidden)
        # Some exports lack num_batches_tracked; it is never used in eval mode.
        own = net.state_dict()
        for k in own:
            if k.endswith("num_batches_tracked") and k not in sd:
                sd[k] = own[k]
        net.load_state_dict(sd, strict=True)
        net.eval().requires_grad_(False)
        if fast:
            net.optimise(winograd)
        return net

    def optimise(self, winograd: bool = False) -> None:
        """Eval-only rewrites of the mask paths: BN folded into the value encoder's convs, split
        fusion blocks, optionally Winograd convs in the decoder and the value encoder.

        The key path (key encoder, key projection) is left exactly as trained, op for op: keys
        feed a top-k selection, where any rounding difference can swap near-tied k-th and
        (k+1)-th memory elements; bit-equal keys keep the readout equal to the official one.
        """
        fold_batchnorm(self.value_encoder)
        set_winograd(self.decoder, winograd)
        set_winograd(self.value_encoder, winograd)
        for m in self.modules():
            if isinstance(m, FeatureFusionBlock):
                m.prepare()

    # ------------------------------------------------------------------ parts
    def encode_key(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image (1, 3, H, W) normalised and padded -> key, shrinkage, selection, f16, f8, f4."""
        f16, f8, f4 = self.key_encoder(image)
        key, shrinkage, selection = self.key_proj(f16)
        return {"key": key, "shrinkage": shrinkage, "selection": selection, "f16": f16, "f8": f8, "f4": f4}

    def encode_value(self, image: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor,
                     hidden: torch.Tensor | None, deep_update: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """masks (N, H, W) -> memory values (N, C_v, h, w) and the hidden state (deep-updated or not)."""
        value = self.value_encoder(image, f16, masks)
        if deep_update and self.value_encoder.hidden_reinforce is not None and hidden is not None:
            hidden = self.value_encoder.hidden_reinforce(value, hidden)
        return value, hidden

    def decode(self, feats: Mapping[str, torch.Tensor], readout: torch.Tensor, hidden: torch.Tensor | None):
        """-> (g16, g8, g4, logits at stride 4); see Decoder."""
        return self.decoder(feats["f16"], feats["f8"], feats["f4"], readout, hidden)

    def update_hidden(self, g16: torch.Tensor, g8: torch.Tensor, g4: torch.Tensor, logits4: torch.Tensor,
                      hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's normal sensory update (frames that are not deep-updated)."""
        return self.decoder.hidden_update(g16, g8, torch.cat([g4, logits4], 1), hidden)


def fold_batchnorm(net: nn.Module) -> int:
    """Fold every eval-mode BatchNorm into the conv before it (ResNet pairs) and drop it."""
    pairs = []  # (parent, bn attribute, conv, bn)
    for m in net.modules():
        if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], nn.BatchNorm2d):
            pairs.append((m, "1", m[0], m[1]))  # a ResNet shortcut: downsample.0 / downsample.1
        for i in (1, 2, 3):
            conv, bn = getattr(m, f"conv{i}", None), getattr(m, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                pairs.append((m, f"bn{i}", conv, bn))
    for m, bn_name, conv, bn in pairs:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            conv.weight.mul_(scale[:, None, None, None])
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is None:
                conv.bias = nn.Parameter(bias, requires_grad=False)
            else:
                conv.bias.copy_(conv.bias * scale + bias)
        setattr(m, bn_name, nn.Identity())  # nn.Sequential accepts "1" as well
    return len(pairs)
