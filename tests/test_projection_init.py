"""``train.init_projections``: least-squares start of a student's projection heads."""
from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from distill import train_student as ts
from distill.losses.base import TeacherBatch
from distill.projection_init import ProjectionInitError, init_projections
from distill.train_data import TrainBatch
from students import build_student
from tests.test_students import CAPTIONS  # noqa: F401  (also registers the "prunetoy" teacher)
from tests.test_train import tiny, train_args  # noqa: F401  (fixture)


def _student(embed_dim: int):
    torch.manual_seed(0)
    return build_student("pruned", teacher="prunetoy:0", image_layers=3, text_layers=2, embed_dim=embed_dim)


def _batches(student, maps: dict[str, torch.Tensor], n: int = 4, size: int = 8) -> list[TrainBatch]:
    """Batches whose teacher embeddings are an exact linear map of the student's pooled features."""
    g = torch.Generator().manual_seed(0)
    heads = student.projection_heads()
    out = []
    for b in range(n):
        pixels = torch.randn(size, 3, 32, 32, generator=g)
        texts = [f"caption {b} {i} " + CAPTIONS[i % 3] for i in range(size)]
        with torch.no_grad():
            img = heads["image"][0](pixels) @ maps["image"]
            txt = heads["text"][0](student.tokenize(texts)) @ maps["text"]
        idx = torch.arange(b * size, (b + 1) * size)
        out.append(TrainBatch(pixels, texts, idx, idx, torch.zeros(size, dtype=torch.long), TeacherBatch(img, txt)))
    return out


def _vit(embed_dim: int = 16):
    torch.manual_seed(0)
    return build_student("vit", embed_dim=embed_dim, vision_width=32, vision_layers=1, vision_heads=2, image_size=32,
                         patch_size=8, text_width=32, text_layers=1, text_heads=2, context_length=16)


@pytest.mark.parametrize("kind", ["pruned", "vit"])
def test_fit_recovers_an_exact_linear_teacher(kind):
    student = _student(16) if kind == "pruned" else _vit()  # the toy teacher's width: identity basis
    widths = {"pruned": (24, 20), "vit": (32, 32)}[kind]
    g = torch.Generator().manual_seed(1)
    maps = {"image": torch.randn(widths[0], 16, generator=g), "text": torch.randn(widths[1], 16, generator=g)}
    batches = _batches(student, maps)
    report = init_projections(student, batches, samples=32, device=torch.device("cpu"), ridge=1e-6)
    assert report["samples"] == 32
    for m in ("image", "text"):
        assert report[m]["cos_before"] < 0.5 and report[m]["cos_after"] > 0.999, report
    # the student's own embeddings now point where the teacher's do
    b = batches[0]
    with torch.no_grad():
        emb = student.encode_image(b.pixels).embed
        txt = student.encode_text(student.tokenize(b.texts)).embed
    assert F.cosine_similarity(emb, b.teacher.img_embed, dim=-1).min() > 0.99
    assert F.cosine_similarity(txt, b.teacher.txt_embed, dim=-1).min() > 0.99
    assert student.training  # training mode restored


def test_narrower_student_targets_principal_directions():
    student = _student(8)
    g = torch.Generator().manual_seed(2)
    maps = {"image": torch.randn(24, 16, generator=g), "text": torch.randn(20, 16, generator=g)}
    report = init_projections(student, _batches(student, maps), samples=32, device=torch.device("cpu"))
    # the teacher embeddings projected on their top-8 principal directions are still linear in the
    # student's features, so the fit is exact
    for m in ("image", "text"):
        assert report[m]["cos_after"] > 0.999, report
    assert report["image"]["cos_before"] < 0.5


def test_wider_student_and_headless_student_are_refused():
    wide = _student(32)
    maps = {"image": torch.randn(24, 16), "text": torch.randn(20, 16)}
    with pytest.raises(ProjectionInitError, match="wider than the teacher"):
        init_projections(wide, _batches(wide, maps, n=1), samples=8, device=torch.device("cpu"))
    headless = types.SimpleNamespace(name="headless", projection_heads=dict)
    with pytest.raises(ProjectionInitError, match="no projection heads"):
        init_projections(headless, [], samples=8, device=torch.device("cpu"))


def test_train_student_starts_from_fitted_projections(tiny, tmp_path, capsys):
    tsv, cache = tiny
    pruned = ["--student", "pruned", "--plugin", "tests.test_students", "--set", "student.teacher=prunetoy:0",
              "--set", "student.image_layers=2", "--set", "student.text_layers=1", "--set", "student.embed_dim=16"]
    base = train_args(cache, tsv, tmp_path / "plain", 2)
    keep = [a for i, a in enumerate(base) if not (a.startswith("student.") or (a == "--set" and base[i + 1].startswith("student.")))]
    ts.main([*keep, *pruned])
    ts.main([*[a.replace(str(tmp_path / "plain"), str(tmp_path / "init")) for a in keep], *pruned,
             "--set", "train.init_projections=8"])
    assert "projection heads fitted to the teacher on 8 samples" in capsys.readouterr().out
    plain, init = ([json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
                   for run in ("plain", "init"))
    # starting in the teacher's space lowers the teacher-matching losses from the first step on
    assert init[0]["loss/cosine"] < plain[0]["loss/cosine"]

