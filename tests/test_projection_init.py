"""``train.init_projections``: least-squares start of a student's projection heads."""
from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from distill.pipeline.train import main as ts
from distill.core.features import ImageFeatures, TeacherTargets, TextFeatures
from distill.losses.projection import EmbedProjections
from distill.pipeline.train.projection_init import init_projections
from distill.core.errors import ProjectionInitError
from distill.pipeline.train.data import TrainBatch
from students import create_student
from tests.helpers.students import CAPTIONS
from tests.helpers.training import train_args


def _student(embed_dim: int):
    torch.manual_seed(0)
    return create_student("pruned", teacher="prunetoy:0", image_layers=3, text_layers=2, embed_dim=embed_dim)


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
        out.append(TrainBatch(pixels, texts, idx, idx, torch.zeros(size, dtype=torch.long),
                              TeacherTargets(ImageFeatures(img), TextFeatures(txt))))
    return out


def _vit(embed_dim: int = 16):
    torch.manual_seed(0)
    return create_student("vit", embed_dim=embed_dim, vision_width=32, vision_layers=1, vision_heads=2, image_size=32,
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
    assert F.cosine_similarity(emb, b.teacher.image.embed, dim=-1).min() > 0.99
    assert F.cosine_similarity(txt, b.teacher.text.embed, dim=-1).min() > 0.99
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
    pruned = ["--student", "pruned", "--plugin", "tests.helpers.toy_teachers", "--set", "student.teacher=prunetoy:0",
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



# ------------------------------------------------------------------------------ the distiller's shared projections
def _fit_cos(student, proj, batches) -> float:
    """Mean cosine between the projected student embeddings and the teacher embeddings (both modalities)."""
    cos = []
    with torch.no_grad():
        for b in batches:
            cos.append(F.cosine_similarity(proj.image(student.encode_image(b.pixels).embed), b.teacher.image.embed, dim=-1))
            cos.append(F.cosine_similarity(proj.text(student.encode_text(student.tokenize(b.texts)).embed),
                                           b.teacher.text.embed, dim=-1))
    return float(torch.cat(cos).mean())


@pytest.mark.parametrize("embed_dim", [16, 8])
def test_distiller_projections_start_by_least_squares(embed_dim):
    student = _student(embed_dim)
    g = torch.Generator().manual_seed(3)
    maps = {"image": torch.randn(24, 16, generator=g), "text": torch.randn(20, 16, generator=g)}
    batches = _batches(student, maps)
    torch.manual_seed(5)
    proj = EmbedProjections(embed_dim, 16, "linear")
    random_init = {m: lin.weight.clone() for m, lin in proj.linear_maps().items()}
    report = init_projections(student, batches, samples=32, device=torch.device("cpu"), projections=proj)
    for m in ("image", "text"):
        assert not torch.equal(proj.linear_maps()[m].weight, random_init[m])
        r = report[f"projection.{m}"]
        assert r["cos_after"] > r["cos_before"] + 0.2, report
    # measured independently, on the student's own forward: the fitted start beats the random one
    started = _fit_cos(student, proj, batches)
    with torch.no_grad():
        for m, lin in proj.linear_maps().items():
            lin.weight.copy_(random_init[m])
    assert started > _fit_cos(student, proj, batches) + 0.2
    assert started > (0.99 if embed_dim == 16 else 0.6)


def test_identity_projections_are_left_alone():
    student = _student(16)
    maps = {"image": torch.randn(24, 16), "text": torch.randn(20, 16)}
    report = init_projections(student, _batches(student, maps, n=1), samples=8, device=torch.device("cpu"),
                              projections=EmbedProjections(16, 16))
    assert not any(k.startswith("projection.") for k in report)


def _rank_fit_worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        student = _student(8)
        g = torch.Generator().manual_seed(3)
        maps = {"image": torch.randn(24, 16, generator=g), "text": torch.randn(20, 16, generator=g)}
        batches = _batches(student, maps, n=4)[2 * rank:2 * rank + 2]  # each rank sees other samples
        torch.manual_seed(10 + rank)  # and starts from another random projection
        proj = EmbedProjections(8, 16, "linear")
        init_projections(student, batches, samples=16, device=torch.device("cpu"), projections=proj)
        torch.save({"proj": proj.state_dict(), "heads": {m: w for m, (_, w) in student.projection_heads().items()}},
                   f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_projection_fit_is_identical_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_rank_fit_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for part in ("proj", "heads"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_resume_needs_the_shared_state_and_refuses_an_old_checkpoint(tiny, tmp_path):
    from distill.core.checkpoint import checksum, load_checkpoint
    from distill.core.errors import CheckpointError

    tsv, cache = tiny
    out = tmp_path / "run"
    args = train_args(cache, tsv, out, 2, "--set", "train.embed_projection=linear")
    ts.main(args)
    ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert set(ckpt["shared"]) == {"projections", "queue"}
    assert {"image.linear.weight", "text.linear.weight"} == set(ckpt["shared"]["projections"])
    assert int(ckpt["shared"]["queue"]["filled"]) > 0
    ts.main([*train_args(cache, tsv, out, 3, "--set", "train.embed_projection=linear"), "--resume"])  # a new run resumes
    old = {k: v for k, v in ckpt.items() if k not in ("shared", "stages", "checksum")}
    old["losses"] = {"contrastive_distill.proj.linear.weight": torch.zeros(2, 2), **ckpt["stages"][0]["losses"]}
    old["balancer"], old["warmup_losses"] = ckpt["stages"][0]["balancer"], {}
    old["checksum"] = checksum(old)  # an intact file of the old layout
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="predates the distiller's shared embedding projections"):
        ts.main([*train_args(cache, tsv, tmp_path / "other", 3, "--set", "train.embed_projection=linear"),
                 "--resume", str(tmp_path / "old.pt")])
