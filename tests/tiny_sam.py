"""A tiny randomly initialised SAM (or SAM-HQ) built from the package's own classes (the weights
are random: its masks mean nothing, its plumbing is the real one)."""
from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Any

import torch

IMG = 128  # model input size; the embedding grid is IMG / 16
DIM = 32


def _tiny(modeling: ModuleType, decoder: Any, depth: int = 1, **decoder_kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    grid = IMG // 16
    model = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=IMG, patch_size=16, embed_dim=DIM, depth=depth, num_heads=2, mlp_ratio=2,
            out_chans=DIM, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=False, window_size=0, global_attn_indexes=()),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=DIM, image_embedding_size=(grid, grid), input_image_size=(IMG, IMG),
            mask_in_chans=4),
        mask_decoder=decoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=1, embedding_dim=DIM, mlp_dim=64, num_heads=2),
            transformer_dim=DIM, iou_head_depth=2, iou_head_hidden_dim=32, **decoder_kw),
    )
    return model.eval()


def tiny_sam() -> torch.nn.Module:
    from segment_anything import modeling

    return _tiny(modeling, modeling.MaskDecoder)


def tiny_sam_hq() -> torch.nn.Module:
    """SAM-HQ: its decoder also reads the encoder's global-attention block outputs (all blocks
    here, window_size 0): two blocks, so the encoder returns two, as the official ones return four."""
    from lazyxmem_core.sam.hq import import_sam_hq

    modeling = import_sam_hq().modeling
    return _tiny(modeling, modeling.MaskDecoderHQ, depth=2, vit_dim=DIM)
