"""The parameter layout of the official XMem checkpoints (release v1.0 of hkchengrex/XMem).

There is no XMem network in this package, so a downloaded checkpoint is checked against the
layout instead: the key names follow from the architecture (a ResNet-50 key encoder cut after
layer3, a ResNet-18 value encoder cut after layer3, two feature-fusion blocks, the key
projection, the decoder and, unless it is the no-sensory variant, the sensory-memory GRUs), and
a handful of shapes fix the dimensions that the XMem network reads back from its weights.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

# The dimensions of the released models (XMem's default config).
KEY_DIM, VALUE_DIM, HIDDEN_DIM = 64, 512, 64
F16_DIM = 1024  # width of the key encoder's layer3 (ResNet-50), input of key_proj
VALUE_F16_DIM = 256  # width of the value encoder's layer3 (ResNet-18)
DECODER_DIM = 256  # width of the decoder's upsampling path (and of the hidden_update's g16 input)
BN_BUFFERS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str) -> Iterator[str]:
    return (f"{prefix}.{s}" for s in BN_BUFFERS)


def _conv_bn(conv: str, bn: str) -> Iterator[str]:
    yield f"{conv}.weight"  # ResNet convs have no bias
    yield from _bn(bn)


def _resnet_stem(prefix: str) -> Iterator[str]:
    yield from _conv_bn(f"{prefix}.conv1", f"{prefix}.bn1")


def _bottleneck_layer(prefix: str, blocks: int) -> Iterator[str]:
    for b in range(blocks):
        p = f"{prefix}.{b}"
        for i in (1, 2, 3):
            yield from _conv_bn(f"{p}.conv{i}", f"{p}.bn{i}")
        if b == 0:  # every ResNet-50 stage changes width in its first block
            yield from _conv_bn(f"{p}.downsample.0", f"{p}.downsample.1")


def _basic_layer(prefix: str, blocks: int, downsample: bool) -> Iterator[str]:
    for b in range(blocks):
        p = f"{prefix}.{b}"
        for i in (1, 2):
            yield from _conv_bn(f"{p}.conv{i}", f"{p}.bn{i}")
        if b == 0 and downsample:
            yield from _conv_bn(f"{p}.downsample.0", f"{p}.downsample.1")


def _with_bias(*modules: str) -> Iterator[str]:
    for m in modules:
        yield f"{m}.weight"
        yield f"{m}.bias"


def _fusion_block(prefix: str) -> Iterator[str]:
    """FeatureFusionBlock: a GroupResBlock that changes width, CBAM, a GroupResBlock that does not."""
    yield from _with_bias(f"{prefix}.block1.downsample", f"{prefix}.block1.conv1", f"{prefix}.block1.conv2",
                          f"{prefix}.attention.ChannelGate.mlp.1", f"{prefix}.attention.ChannelGate.mlp.3",
                          f"{prefix}.attention.SpatialGate.spatial.conv",
                          f"{prefix}.block2.conv1", f"{prefix}.block2.conv2")


def expected_keys(sensory: bool = True) -> list[str]:
    """Every key of an official XMem state dict, in the official order (no-sensory: ``sensory=False``)."""
    keys: list[str] = []
    keys += _resnet_stem("key_encoder")
    keys += _bottleneck_layer("key_encoder.res2", 3)
    keys += _bottleneck_layer("key_encoder.layer2", 4)
    keys += _bottleneck_layer("key_encoder.layer3", 6)
    keys += _resnet_stem("value_encoder")
    keys += _basic_layer("value_encoder.layer1", 2, downsample=False)
    keys += _basic_layer("value_encoder.layer2", 2, downsample=True)
    keys += _basic_layer("value_encoder.layer3", 2, downsample=True)
    keys += _fusion_block("value_encoder.fuser")
    if sensory:
        keys += _with_bias("value_encoder.hidden_reinforce.transform")
    keys += _with_bias("key_proj.key_proj", "key_proj.d_proj", "key_proj.e_proj")
    keys += _fusion_block("decoder.fuser")
    if sensory:
        keys += _with_bias(*(f"decoder.hidden_update.{m}" for m in ("g16_conv", "g8_conv", "g4_conv", "transform")))
    keys += _with_bias("decoder.up_16_8.skip_conv", "decoder.up_16_8.out_conv.downsample",
                       "decoder.up_16_8.out_conv.conv1", "decoder.up_16_8.out_conv.conv2",
                       "decoder.up_8_4.skip_conv", "decoder.up_8_4.out_conv.conv1", "decoder.up_8_4.out_conv.conv2",
                       "decoder.pred")
    return keys


def identifying_shapes(key_dim: int = KEY_DIM, value_dim: int = VALUE_DIM,
                       hidden_dim: int = HIDDEN_DIM) -> dict[str, tuple[int, ...]]:
    """The shapes that fix the layout and its dims; hidden_dim 0 means no sensory memory."""
    shapes = {
        "key_encoder.conv1.weight": (64, 3, 7, 7),
        "key_encoder.layer3.5.conv3.weight": (F16_DIM, 256, 1, 1),
        "key_proj.key_proj.weight": (key_dim, F16_DIM, 3, 3),
        "key_proj.e_proj.weight": (key_dim, F16_DIM, 3, 3),
        "key_proj.d_proj.weight": (1, F16_DIM, 3, 3),
        "value_encoder.conv1.weight": (64, 5, 7, 7),  # image + mask + other objects' masks
        "value_encoder.fuser.block1.conv1.weight": (value_dim, F16_DIM + VALUE_F16_DIM, 3, 3),
        "value_encoder.fuser.block2.conv2.weight": (value_dim, value_dim, 3, 3),
        "decoder.fuser.block1.conv1.weight": (512, F16_DIM + value_dim + hidden_dim, 3, 3),
        "decoder.pred.weight": (1, DECODER_DIM, 3, 3),
    }
    if hidden_dim:
        # GRU-style updates: 3 * hidden rows (forget, update, new value).
        shapes["value_encoder.hidden_reinforce.transform.weight"] = (3 * hidden_dim, value_dim + hidden_dim, 3, 3)
        shapes["decoder.hidden_update.transform.weight"] = (3 * hidden_dim, DECODER_DIM + hidden_dim, 3, 3)
    return shapes


@dataclass(frozen=True)
class XMemLayout:
    """What a checked state dict turned out to be."""

    key_dim: int
    value_dim: int
    hidden_dim: int  # 0: the no-sensory variant
    stage0: bool  # value_encoder.conv1 takes 4 channels (stage-0 / static-image pretraining)
    n_keys: int

    @property
    def sensory(self) -> bool:
        return self.hidden_dim > 0


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict", "network"):  # usual training-checkpoint wrappers
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not an XMem state dict "
                              "(a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from a DataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _shape_of(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    t = sd.get(key)
    return None if t is None else tuple(t.shape)


def check_xmem_state_dict(state_dict: Mapping[str, Any], source: str = "the checkpoint",
                          sensory: bool | None = None) -> XMemLayout:
    """Check key names and identifying shapes against the official layout; CheckpointError if not.

    ``sensory`` None accepts both XMem and XMem-no-sensory; True / False demands one of them.
    """
    sd = _unwrap(dict(state_dict), source)
    has_hidden = "decoder.hidden_update.transform.weight" in sd
    if sensory is not None and sensory != has_hidden:
        want, got = ("XMem (with sensory memory)", "no-sensory") if sensory else ("XMem-no-sensory", "with sensory memory")
        raise CheckpointError(f"{source} is an XMem checkpoint {got}, but {want} was expected: "
                              "download the matching variant")
    expected = expected_keys(has_hidden)
    optional = {k for k in expected if k.endswith(".num_batches_tracked")}  # absent in some exports
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in set(expected)]
    if missing or unexpected:
        hint = "" if any(k.startswith("key_encoder.") for k in sd) else " (no key_encoder.* keys: not an XMem checkpoint)"
        raise CheckpointError(
            f"{source} does not have the official XMem key layout{hint}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "download an official XMem checkpoint (XMem.pth, XMem-s012.pth or XMem-no-sensory.pth)")

    key_dim = _shape_of(sd, "key_proj.key_proj.weight")[0]
    value_dim = _shape_of(sd, "value_encoder.fuser.block2.conv2.weight")[0]
    hidden_dim = _shape_of(sd, "decoder.hidden_update.transform.weight")[0] // 3 if has_hidden else 0
    wrong = []
    for key, shape in identifying_shapes(key_dim, value_dim, hidden_dim).items():
        got = _shape_of(sd, key)
        if key == "value_encoder.conv1.weight" and got == (64, 4, 7, 7):
            continue  # stage-0 weights: XMem zero-initialises the 5th channel when it loads them
        if got != shape:
            wrong.append(f"{key} is {got}, expected {shape}")
    if wrong:
        raise CheckpointError(f"{source} has the XMem key names but not its shapes: " + "; ".join(wrong[:3]))
    official = (KEY_DIM, VALUE_DIM, HIDDEN_DIM if has_hidden else 0)
    if (key_dim, value_dim, hidden_dim) != official:
        raise CheckpointError(f"{source} has key_dim {key_dim}, value_dim {value_dim}, hidden_dim {hidden_dim}; "
                              f"the official checkpoints have {official}: download an official XMem checkpoint")
    stage0 = _shape_of(sd, "value_encoder.conv1.weight")[1] == 4
    return XMemLayout(key_dim, value_dim, hidden_dim, stage0, len(sd))


def load_xmem_state_dict(path: str | Path, sensory: bool | None = None) -> tuple[dict[str, torch.Tensor], XMemLayout]:
    """Read an XMem checkpoint on the CPU (as data only) and check its layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"XMem checkpoint {path} not found: run `lazyxmem weights download xmem` "
                              "or pass the path of XMem.pth")
    try:
        # weights_only: a checkpoint is data, it must not run code when it is opened.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated / non-torch file
        first = str(e).splitlines()[0] if str(e) else "no details"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}): "
                              "the download may be truncated or the file is something else; delete it and "
                              "download the official XMem checkpoint again") from e
    sd = _unwrap(obj, str(path))
    return sd, check_xmem_state_dict(sd, str(path), sensory)
