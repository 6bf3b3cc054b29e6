"""Exact image-text retrieval metrics (Recall@K in both directions) without sorting.

Protocol (CLIP_benchmark's): an image query hits at K when ANY of its captions is among its top K
captions; a caption query hits at K when its image is among its top K images. Recall is the
percentage of queries that hit; ``rsum`` adds up all recalls.

Ranks are counted, not sorted: the rank of a positive is the number of candidates with a strictly
higher score plus the number with an equal score and a smaller index, i.e. its position in a
*stable* descending sort (``torch.argsort(-s, stable=True)``). Ties are thus broken by index,
lower index first. (``torch.topk``, which CLIP_benchmark uses, orders ties arbitrarily; this is
its deterministic counterpart.) An image query's rank is that of its best caption (highest score,
first index on ties), which is the minimum rank over all its captions.

The score matrix is computed in square tiles (``chunk_size`` x ``chunk_size``) that stay in
cache while both directions are counted, so memory is bounded by one tile and one matrix product
serves image->text and text->image. The score of every matching (image, caption) pair is
recomputed exactly (float64, rounded to the score dtype) and written into the tiles, so a
positive's own score is identical wherever it is compared. Images without captions act as
distractors for caption queries and are not image queries.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

CPU_TILE = 1024  # default tile edge on CPU (a 4 MiB float32 tile stays in cache)
CUDA_TILE = 4096


def _check_embeddings(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        raise ValueError(f"embeddings must be 2-D, got image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding dims differ: image {image_emb.shape[1]} vs text {text_emb.shape[1]}")
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError(f"need at least one image and one caption, got {image_emb.shape[0]} and {text_emb.shape[0]}")
    if image_emb.device != text_emb.device:
        raise ValueError(f"embeddings on different devices: {image_emb.device} vs {text_emb.device}")
    for name, e in (("image", image_emb), ("text", text_emb)):
        if not bool(torch.isfinite(e).all()):
            raise ValueError(f"{name} embeddings contain NaN or Inf")


def _as_index(caption_image: Tensor | np.ndarray | Sequence[int], num_images: int, num_captions: int,
              device: torch.device) -> Tensor:
    idx = caption_image if isinstance(caption_image, Tensor) else torch.as_tensor(np.asarray(caption_image))
    if idx.dim() != 1 or idx.numel() != num_captions:
        raise ValueError(f"caption_image must have shape [{num_captions}] (one image index per caption), "
                         f"got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"caption_image must hold integer image indices, got {idx.dtype}")
    idx = idx.to(device=device, dtype=torch.long)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_images:
        raise ValueError(f"caption_image holds indices outside [0, {num_images}): min {lo}, max {hi}")
    return idx


def _count(hits: Tensor, dim: int, tile: int) -> Tensor:
    """Sum a bool tile along ``dim`` (int16 is exact for tiles up to 32767 and much faster)."""
    return hits.view(torch.uint8).sum(dim, dtype=torch.int16 if tile < 2 ** 15 else torch.int32)


@torch.no_grad()
def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor | np.ndarray | Sequence[int],
                    chunk_size: int | None = None, score_dtype: torch.dtype | None = None
                    ) -> tuple[Tensor, Tensor]:
    """0-based rank of the best positive of every query (ties: see the module doc).

    Returns ``(i2t [N], t2i [M])`` int64 tensors on the embeddings' device; images without
    captions get rank -1. ``chunk_size`` is the tile edge (default 1024 on CPU, 4096 on CUDA).
    ``score_dtype`` defaults to float32 (float64 inputs stay float64); float16/bfloat16 speed up
    the matrix product on GPU at the cost of more ties.
    """
    _check_embeddings(image_emb, text_emb)
    n, m = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device
    tile = chunk_size or (CUDA_TILE if device.type == "cuda" else CPU_TILE)
    if tile < 1:
        raise ValueError(f"chunk_size must be >= 1, got {tile}")
    dtype = score_dtype or torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    cap_img = _as_index(caption_image, n, m, device)
    img, txt = image_emb.to(dtype), text_emb.to(dtype)

    true_score = (img[cap_img].double() * txt.double()).sum(-1).to(dtype)  # [M] score of each caption's pair
    best = torch.full((n,), float("-inf"), dtype=dtype, device=device)
    best = best.scatter_reduce(0, cap_img, true_score, "amax")  # [N] best positive score per image
    captions = torch.arange(m, device=device)
    is_best = true_score == best[cap_img]
    best_col = torch.full((n,), m, dtype=torch.long, device=device)
    best_col = best_col.scatter_reduce(0, cap_img[is_best], captions[is_best], "amin")  # first best caption

    t2i = torch.zeros(m, dtype=torch.long, device=device)
    i2t = torch.zeros(n, dtype=torch.long, device=device)
    for r0 in range(0, n, tile):
        r1 = min(n, r0 + tile)
        row_thr = best[r0:r1].unsqueeze(1)
        for c0 in range(0, m, tile):
            c1 = min(m, c0 + tile)
            scores = img[r0:r1] @ txt[c0:c1].T  # [rows, cols]
            pair_img = cap_img[c0:c1]
            own = torch.nonzero((pair_img >= r0) & (pair_img < r1)).squeeze(1)
            scores[pair_img[own] - r0, own] = true_score[c0 + own]
            col_thr = true_score[c0:c1]

            t2i[c0:c1] += _count(scores > col_thr, 0, tile)
            rows, cols = torch.nonzero(scores == col_thr, as_tuple=True)
            earlier = rows + r0 < pair_img[cols]
            t2i[c0:c1] += torch.bincount(cols[earlier], minlength=c1 - c0)

            i2t[r0:r1] += _count(scores > row_thr, 1, tile)
            rows, cols = torch.nonzero(scores == row_thr, as_tuple=True)
            earlier = cols + c0 < best_col[r0 + rows]
            i2t[r0:r1] += torch.bincount(rows[earlier], minlength=r1 - r0)
    return i2t.masked_fill(best_col == m, -1), t2i


def recall_from_ranks(i2t: Tensor, t2i: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (percent) for both directions plus ``rsum`` from :func:`retrieval_ranks` output
    (negative ranks mark images that are no query)."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    i2t = i2t[i2t >= 0]
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * float((ranks < k).double().mean()) if ranks.numel() else 0.0
    out["rsum"] = sum(out.values())
    return out


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor | np.ndarray | Sequence[int],
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None,
                      score_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Exact Recall@K in percent: ``i2t_R@K`` (image -> text) and ``t2i_R@K`` (text -> image) for
    every K in ``ks``, and ``rsum``. Embeddings should be L2-normalised (scores are dot products)
    and may live on any device; ``caption_image[j]`` is the image index of caption ``j``."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, caption_image, chunk_size, score_dtype)
    return recall_from_ranks(i2t, t2i, ks)
