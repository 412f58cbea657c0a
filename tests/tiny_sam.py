"""A tiny randomly initialised SAM built from segment_anything's own classes (the weights are
random: its masks mean nothing, its plumbing is the real one)."""
from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

IMG = 128  # model input size; the embedding grid is IMG / 16
DIM = 32


def tiny_sam() -> Sam:
    torch.manual_seed(0)
    grid = IMG // 16
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=IMG, patch_size=16, embed_dim=DIM, depth=1, num_heads=2, mlp_ratio=2,
            out_chans=DIM, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=False, window_size=0, global_attn_indexes=()),
        prompt_encoder=PromptEncoder(
            embed_dim=DIM, image_embedding_size=(grid, grid), input_image_size=(IMG, IMG),
            mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=DIM, mlp_dim=64, num_heads=2),
            transformer_dim=DIM, iou_head_depth=2, iou_head_hidden_dim=32),
    )
    return model.eval()
