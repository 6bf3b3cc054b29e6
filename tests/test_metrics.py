"""Recall@K on hand-made cases, tie handling, and the tiled counter against brute force."""
from __future__ import annotations

import pytest
import torch

from distill.core.metrics import recall_from_ranks, retrieval_metrics, retrieval_ranks


def brute_ranks(img: torch.Tensor, txt: torch.Tensor, cap_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position in a stable descending sort of exactly computed (float64) scores."""
    s = img.double() @ txt.double().T
    t2i = torch.stack([(torch.argsort(-s[:, j], stable=True) == cap_img[j]).nonzero()[0, 0] for j in range(len(cap_img))])
    i2t = []
    for i in range(img.shape[0]):
        order = torch.argsort(-s[i], stable=True)
        pos = (cap_img[order] == i).nonzero()
        i2t.append(pos[0, 0] if len(pos) else torch.tensor(-1))
    return torch.stack(i2t), t2i


def test_hand_made_two_images():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # captions 0,1 -> image 0; captions 2,3 -> image 1. Caption 1 points at image 1 (a miss for t2i@1).
    txt = torch.tensor([[1.0, 0.0], [0.1, 0.9], [0.0, 1.0], [0.2, 0.8]])
    m = retrieval_metrics(img, txt, [0, 0, 1, 1], ks=(1, 2))
    # image 0: best caption is caption 0 (rank 0) -> hit; image 1: caption 2 has score 1 -> hit
    assert m["i2t_R@1"] == 100.0
    # t2i: captions 0, 2, 3 retrieve their image first; caption 1 ranks it second
    assert m["t2i_R@1"] == 75.0 and m["t2i_R@2"] == 100.0
    assert m["rsum"] == pytest.approx(100 + 100 + 75 + 100)


def test_image_hits_if_any_caption_in_top_k():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # image 0's captions are 2 and 3; caption 0/1 of image 1 score higher for image 0 (0.99, 0.98 > 0.9)
    txt = torch.nn.functional.normalize(torch.tensor([[0.99, 0.1], [0.98, 0.2], [0.9, -0.5], [-1.0, 0.0]]), dim=1)
    i2t, _ = retrieval_ranks(img, txt, [1, 1, 0, 0])
    assert i2t[0] == 2  # two captions of image 1 rank above caption 2


def test_ties_break_by_index():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 identical
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    i2t, t2i = retrieval_ranks(img, txt, [0, 1, 2])
    assert t2i.tolist() == [0, 1, 0]  # caption 1's image ties with image 0, which comes first
    assert i2t.tolist() == [0, 1, 0]


def test_image_without_captions_is_only_a_distractor():
    img = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    txt = torch.tensor([[0.9, 0.1], [0.0, 1.0]])
    i2t, t2i = retrieval_ranks(img, txt, [1, 2])
    assert i2t[0] == -1
    assert t2i[0] == 1  # image 0 (no captions) outranks image 1 for caption 0
    m = recall_from_ranks(i2t, t2i, ks=(1,))
    assert m["i2t_R@1"] == 100.0 and m["t2i_R@1"] == 50.0


@pytest.mark.parametrize("chunk", [3, 7, 1024])
def test_tiles_match_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    n, per, d = 23, 5, 8
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    cap_img = torch.arange(n).repeat_interleave(per)
    txt = torch.nn.functional.normalize(img[cap_img] + 0.9 * torch.randn(n * per, d, generator=g), dim=1)
    txt[5] = img[3]  # exact duplicates create ties with the positive
    img[7] = img[3]
    i2t, t2i = retrieval_ranks(img, txt, cap_img, chunk_size=chunk)
    bi2t, bt2i = brute_ranks(img, txt, cap_img)
    assert torch.equal(i2t, bi2t) and torch.equal(t2i, bt2i)


def test_bad_inputs_are_rejected():
    img, txt = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError):
        retrieval_metrics(img, txt, [0, 1, 2])  # image index out of range
    with pytest.raises(ValueError):
        retrieval_metrics(img, torch.randn(3, 5), [0, 0, 1])  # dims differ
    with pytest.raises(ValueError):
        retrieval_metrics(img, txt, [0, 0, 1], ks=(0,))
