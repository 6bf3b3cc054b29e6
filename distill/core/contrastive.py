"""Contrastive (InfoNCE) losses shared by the layers: the symmetric CLIP loss of the student
(:mod:`distill.losses.student_clip`) and of LiT teacher training (:mod:`distill.pipeline.lit`), and
the multi-positive InfoNCE pieces the distillation losses build on.

Logits are ``scale * a @ b.T`` of the embeddings as given (normalise them first); rows belong to
images through integer image ids, and every candidate of the row's image is a positive (the
multi-caption protocol), unless the rows are pairs and ``own_offset`` asks for their own pair only.
"""
from __future__ import annotations

import torch
from torch import Tensor


def multi_positive_nce(logits: Tensor, positives: Tensor, average_positives: bool = False) -> Tensor:
    """Mean over rows of the InfoNCE loss with several positives per row (``positives``: bool mask
    of ``logits``' shape; excluded columns carry ``-inf``).

    Default: ``-log sum_{j positive} softmax(logits)_j`` (the positives pull jointly; with one
    positive per row it equals the cross-entropy). ``average_positives``: ``-mean_{j positive}
    log softmax(logits)_j`` (SupCon's L_out: each positive is its own cross-entropy target)."""
    if average_positives:
        logp = logits.log_softmax(dim=1).masked_fill(~positives, 0.0)
        return (-logp.sum(1) / positives.sum(1).clamp_min(1)).mean()
    pos = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(pos, dim=1)).mean()


def same_image(ids_a: Tensor, ids_b: Tensor) -> Tensor:
    """[len(a), len(b)] bool: True where two rows come from the same image."""
    return ids_a.reshape(-1, 1) == ids_b.reshape(1, -1)


def positives_and_mask(logits: Tensor, ids_rows: Tensor, ids_cols: Tensor, offset: int,
                       multi_positive: bool) -> tuple[Tensor, Tensor]:
    """(logits, positives) for an in-batch block whose own pair is column ``offset + i``: with
    ``multi_positive`` every column of the same image is a positive, otherwise the other columns of
    the same image are masked to ``-inf`` (false negatives) and only the own pair is positive."""
    same = same_image(ids_rows, ids_cols)
    own = torch.zeros_like(same)
    rows = torch.arange(logits.shape[0], device=logits.device)
    own[rows, rows + offset] = True
    if multi_positive:
        return logits, same | own
    return logits.masked_fill(same & ~own, float("-inf")), own


def clip_info_nce(img: Tensor, txt: Tensor, scale: Tensor | float, img_ids: Tensor, txt_ids: Tensor, *,
                  candidates: tuple[Tensor, Tensor, Tensor] | None = None, own_offset: int | None = None,
                  average_positives: bool = False) -> Tensor:
    """The symmetric CLIP InfoNCE: the mean of the image->text and the text->image loss.

    ``img`` [B, D] are images with ids ``img_ids`` [B], ``txt`` [M, D] captions with the ids of
    their images ``txt_ids`` [M]; image->text logits are ``scale * img @ texts.T``, text->image
    ``scale * txt @ images.T``. The candidates are the other modality's rows, or ``candidates`` =
    (images [G, D], texts [G, D], ids [G]) (e.g. the pairs of every rank). A row's positives are the
    candidates of its image (:func:`multi_positive_nce`, ``average_positives`` as there).

    ``own_offset`` (the rows are pairs: ``img[i]``, ``txt[i]``, their own pair candidate
    ``i + own_offset``): only the own pair is positive, and the other candidates of the same image
    are left out of the denominators (false negatives) instead of being positives.
    """
    txt_cands, txt_cand_ids = (candidates[1], candidates[2]) if candidates is not None else (txt, txt_ids)
    img_cands, img_cand_ids = (candidates[0], candidates[2]) if candidates is not None else (img, img_ids)
    i2t = _logits_and_positives(scale * img @ txt_cands.T, img_ids, txt_cand_ids, own_offset)
    t2i = _logits_and_positives(scale * txt @ img_cands.T, txt_ids, img_cand_ids, own_offset)
    return (multi_positive_nce(*i2t, average_positives) + multi_positive_nce(*t2i, average_positives)) / 2


def _logits_and_positives(logits: Tensor, row_ids: Tensor, col_ids: Tensor,
                          own_offset: int | None) -> tuple[Tensor, Tensor]:
    if own_offset is None:
        return logits, same_image(row_ids, col_ids)
    return positives_and_mask(logits, row_ids, col_ids, own_offset, multi_positive=False)
