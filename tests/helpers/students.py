"""The tiny ``vit`` student (16-dim embeddings, 32 px / patch 8, 2+2 layers of width 32, context 16)
and captions of different lengths to tokenize with it."""
from __future__ import annotations

TINY_VIT = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                text_width=32, text_layers=2, text_heads=2, context_length=16)
CAPTIONS = ["a dog runs on the grass", "cat", "the red cat sits on a blue beach towel"]
