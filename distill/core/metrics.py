"""Exact image-text retrieval metrics (Recall@K in both directions) without sorting.

Protocol (CLIP_benchmark's): an image query hits at K when ANY of its captions is among its top K
captions; a caption query hits at K when its image is among its top K images. Recall is the
percentage of queries that hit; ``rsum`` adds up all recalls.

Ranks are counted, not sorted: the rank of a positive is the number of candidates with a strictly
higher score plus the number with an equal score and a smaller index, i.e. its position in a
*stable* descending sort (``torch.argsort(-s, stable=True)``): ties are broken by index, lower
index first. (``torch.topk``, which CLIP_benchmark uses, orders ties arbitrarily; this is its
deterministic counterpart.) An image query's rank is that of its best caption (highest score,
first index on ties), which is the minimum rank over all its captions.

Scores are the exact dot products rounded to the score dtype, so identical embeddings always tie.
A fast matrix product screens them: scores farther than a rounding tolerance from a query's
positive score are decided by the product, the few within it are recomputed exactly (float64).
The product runs in square tiles (``chunk_size`` x ``chunk_size``) that stay in cache while
both directions are counted, so memory is bounded by one tile and one product serves
image->text and text->image. Images without captions act as distractors for caption queries and
are not image queries.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from distill.core.errors import ConfigError, DataError

CPU_TILE = 1024  # default tile edge on CPU (a 4 MiB float32 tile stays in cache)
CUDA_TILE = 4096
LOW_PRECISION = (torch.float16, torch.bfloat16)
EXACT_CHUNK = 1 << 20  # float64 elements per gathered block in _exact_scores (8 MiB)


def _rows_per_chunk(width: int) -> int:
    """Rows of a ``width``-wide matrix that make about ``EXACT_CHUNK`` elements."""
    return max(1, EXACT_CHUNK // max(1, width))


def _check_embeddings(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        raise DataError(f"embeddings must be 2-D, got image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise DataError(f"embedding dims differ: image {image_emb.shape[1]} vs text {text_emb.shape[1]}")
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise DataError(f"need at least one image and one caption, got {image_emb.shape[0]} and {text_emb.shape[0]}")
    if image_emb.device != text_emb.device:
        raise DataError(f"embeddings on different devices: {image_emb.device} vs {text_emb.device}")
    for name, e in (("image", image_emb), ("text", text_emb)):
        step = _rows_per_chunk(e.shape[1])  # blocks: isfinite of the whole matrix needs several copies of it
        if not all(bool(torch.isfinite(e[s:s + step]).all()) for s in range(0, e.shape[0], step)):
            raise DataError(f"{name} embeddings contain NaN or Inf")


def _as_index(caption_image: Tensor | np.ndarray | Sequence[int], num_images: int, num_captions: int,
              device: torch.device) -> Tensor:
    idx = caption_image if isinstance(caption_image, Tensor) else torch.as_tensor(np.asarray(caption_image))
    if idx.dim() != 1 or idx.numel() != num_captions:
        raise DataError(f"caption_image must have shape [{num_captions}] (one image index per caption), "
                         f"got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise DataError(f"caption_image must hold integer image indices, got {idx.dtype}")
    idx = idx.to(device=device, dtype=torch.long)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_images:
        raise DataError(f"caption_image holds indices outside [0, {num_images}): min {lo}, max {hi}")
    return idx


def _precision_backends() -> list[object]:
    """The matmul backends with an ``fp32_precision`` setting in this torch (cuBLAS, oneDNN)."""
    found = []
    for backend in (torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)):
        try:
            if backend is not None and isinstance(backend.fp32_precision, str):
                found.append(backend)
        except (AttributeError, RuntimeError):
            pass
    return found


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """float32 matrix products in full IEEE precision inside the block (no TF32 on CUDA, no bf16
    on oneDNN), whatever the process set: TF32 rounds scores to ~1e-3 and misranks near-ties. Uses
    the per-backend ``fp32_precision`` API (the legacy ``allow_tf32`` flag on older torch) and
    restores the previous settings on exit."""
    backends = _precision_backends()
    if not backends:  # torch without fp32_precision
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        return
    previous = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, previous):
            b.fp32_precision = value


def _exact_scores(img: Tensor, txt: Tensor, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    """Dot products of (rows[k], cols[k]) pairs in float64, rounded to ``dtype``; computed in chunks
    of about ``EXACT_CHUNK`` float64 elements so that memory does not grow with the number of pairs."""
    out = torch.empty(rows.shape[0], dtype=dtype, device=img.device)
    step = _rows_per_chunk(img.shape[1])
    for s in range(0, rows.shape[0], step):
        out[s:s + step] = (img[rows[s:s + step]].double() * txt[cols[s:s + step]].double()).sum(-1).to(dtype)
    return out


def _max_norm(e: Tensor) -> Tensor:
    """Largest float64 row norm, computed in blocks (no float64 copy of the whole matrix)."""
    step = _rows_per_chunk(e.shape[1])
    return torch.stack([e[s:s + step].double().norm(dim=1).max() for s in range(0, e.shape[0], step)]).max()


def _tolerance(img: Tensor, txt: Tensor, dtype: torch.dtype) -> float:
    """Bound on |matrix product - exactly rounded score| (50x the error seen on D=512 data)."""
    scale = float(_max_norm(img) * _max_norm(txt))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 4 * math.sqrt(img.shape[1]) * torch.finfo(acc).eps * scale
    if dtype in LOW_PRECISION:  # the product's float32 sum may round to a neighbouring level
        tol += 2 * torch.finfo(dtype).eps * scale
    return tol


class _Counter:
    """Counts, per query, the candidates ranked above its positive in one direction.

    ``thr`` is each query's positive score and ``limit`` the index of its positive candidate (a
    tied candidate counts when its index is lower). ``on_rows`` says whether the queries are the
    rows (images) or the columns (captions) of the score tiles.
    """

    def __init__(self, thr: Tensor, limit: Tensor, tol: float, tile: int, on_rows: bool) -> None:
        self.thr, self.limit, self.on_rows = thr, limit, on_rows
        self.lo, self.hi = thr - tol, thr + tol
        self.count = torch.zeros(thr.shape[0], dtype=torch.long, device=thr.device)
        self.sum_dtype = torch.int16 if tile < 2 ** 15 else torch.int32  # int16 is exact and fast

    def add(self, scores: Tensor, r0: int, c0: int, exact: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Add the counts of the tile whose top-left entry is (image ``r0``, caption ``c0``);
        ``exact(images, captions)`` recomputes scores that lie within the tolerance band."""
        q0, cand0 = (r0, c0) if self.on_rows else (c0, r0)
        q = slice(q0, q0 + scores.shape[0 if self.on_rows else 1])
        axis = 1 if self.on_rows else 0  # candidate axis
        shape = (-1, 1) if self.on_rows else (1, -1)
        hi, lo = self.hi[q].view(shape), self.lo[q].view(shape)
        above = (scores > hi).view(torch.uint8).sum(axis, dtype=self.sum_dtype)
        within = (scores >= lo).view(torch.uint8).sum(axis, dtype=self.sum_dtype) - above
        self.count[q] += above
        # the positive itself is always within the band and never above itself: look closer only
        # where something else is
        limit = self.limit[q]
        own = ((limit >= cand0) & (limit < cand0 + scores.shape[axis])).to(within.dtype)
        check = torch.nonzero(within > own).squeeze(1)
        if not check.numel():
            return
        sub = scores.index_select(1 - axis, check)
        band = (sub >= lo.index_select(1 - axis, check)) & (sub <= hi.index_select(1 - axis, check))
        i, j = torch.nonzero(band, as_tuple=True)
        query_local, cand_local = (check[i], j) if self.on_rows else (check[j], i)
        query, cand = query_local + q0, cand_local + cand0
        s = exact(query, cand) if self.on_rows else exact(cand, query)
        thr = self.thr[query]
        self.count.index_add_(0, query, ((s > thr) | ((s == thr) & (cand < self.limit[query]))).long())


@torch.no_grad()
def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor | np.ndarray | Sequence[int],
                    chunk_size: int | None = None, score_dtype: torch.dtype | None = None
                    ) -> tuple[Tensor, Tensor]:
    """0-based rank of the best positive of every query (ties: see the module doc).

    Returns ``(i2t [N], t2i [M])`` int64 tensors on the embeddings' device; images without
    captions get rank -1. ``chunk_size`` is the tile edge (default 1024 on CPU, 4096 on CUDA).
    ``score_dtype`` defaults to float32 (float64 inputs stay float64); float16/bfloat16 speed up
    the matrix product on GPU and round scores coarser, so more of them tie.
    """
    _check_embeddings(image_emb, text_emb)
    n, m = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device
    tile = chunk_size or (CUDA_TILE if device.type == "cuda" else CPU_TILE)
    if tile < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {tile}")
    dtype = score_dtype or torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    cap_img = _as_index(caption_image, n, m, device)
    img, txt = image_emb.to(dtype), text_emb.to(dtype)
    tol = _tolerance(img, txt, dtype)

    captions = torch.arange(m, device=device)
    true_score = _exact_scores(img, txt, cap_img, captions, dtype)  # [M] score of each caption's pair
    best = torch.full((n,), float("-inf"), dtype=dtype, device=device).scatter_reduce(0, cap_img, true_score, "amax")
    is_best = true_score == best[cap_img]
    best_col = torch.full((n,), m, dtype=torch.long, device=device)
    best_col = best_col.scatter_reduce(0, cap_img[is_best], captions[is_best], "amin")  # first best caption

    t2i = _Counter(true_score, cap_img, tol, tile, on_rows=False)
    i2t = _Counter(best, best_col, tol, tile, on_rows=True)

    def exact(images: Tensor, caps: Tensor) -> Tensor:
        return _exact_scores(img, txt, images, caps, dtype)

    with full_precision_matmul():  # the tolerance band assumes float32 products, not TF32
        for r0 in range(0, n, tile):
            for c0 in range(0, m, tile):
                scores = img[r0:r0 + tile] @ txt[c0:c0 + tile].T  # [rows, cols]
                t2i.add(scores, r0, c0, exact)
                i2t.add(scores, r0, c0, exact)
    return i2t.count.masked_fill(best_col == m, -1), t2i.count


def recall_from_ranks(i2t: Tensor, t2i: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (percent) for both directions plus ``rsum`` from :func:`retrieval_ranks` output
    (negative ranks mark images that are no query)."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ConfigError(f"ks must be positive integers, got {tuple(ks)}")
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
        raise ConfigError(f"ks must be positive integers, got {tuple(ks)}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, caption_image, chunk_size, score_dtype)
    return recall_from_ranks(i2t, t2i, ks)
