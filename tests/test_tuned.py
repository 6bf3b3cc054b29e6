"""``pmf`` and ``mwa`` students on a ``lit:`` teacher built from the real offline MobileNetV2 +
all-MiniLM-L6-v2 weights (64 px images, random projections, two images)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.core.data.factory import load_dataset
from distill.pipeline.train.main import make_optimizer
from students import create_student, load_student, save_student
from students.mwa import ParallelAdapted
from teachers import create_teacher
from teachers.lit import LiTConfig, LiTTeacher
from tests.helpers.data import make_tiny_dataset
from tests.helpers.paths import FLICKR8K

CAPTIONS = ["a dog runs on the grass", "two children play football in a park"]
OPTIM = {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.98], "eps": 1e-6}


@pytest.fixture(scope="module")
def lit_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("lit") / "lit"
    LiTTeacher(LiTConfig(image_size=64, embed_dim=32, seed=3)).save(folder)
    return f"lit:{folder}"


@pytest.fixture(scope="module")
def teacher(lit_spec: str) -> LiTTeacher:
    return create_teacher(lit_spec)


@pytest.fixture(scope="module")
def pixels(teacher: LiTTeacher) -> torch.Tensor:
    """Two Flickr8k test images (two synthetic ones when the data set is absent)."""
    tf = teacher.image_transform()
    if (FLICKR8K / "captions.tsv").is_file():
        data = load_dataset(FLICKR8K, "test").subset(range(2))
        return torch.stack([tf(data.load_image(i)) for i in range(2)])
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _step_loss(student, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP loss on the embeddings plus a token term, so every trainable module is on the graph."""
    img, txt = student.encode_image(pixels), student.encode_text(student.tokenize(CAPTIONS))
    logits = student.logit_scale.exp() * img.embed @ txt.embed.T
    labels = torch.arange(len(CAPTIONS))
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return clip + img.tokens.pow(2).mean() + txt.tokens[txt.mask].pow(2).mean()


def _frozen(student) -> dict[str, torch.Tensor]:
    """Every frozen parameter and every buffer (BatchNorm statistics), cloned."""
    state = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    return {**state, **{n: b.clone() for n, b in student.named_buffers()}}


def test_mwa_starts_as_the_teacher(lit_spec, teacher, pixels):
    s = create_student("mwa", teacher=lit_spec).eval()
    assert (s.embed_dim, s.image_token_dim, s.text_token_dim, s.image_size) == (32, 1280, 384, 64)
    assert sum(isinstance(m, ParallelAdapted) for m in s.backbone) == 17  # every inverted-residual block
    assert 0 < s.trainable_share() < 0.05
    batch = s.tokenize(CAPTIONS)
    with torch.no_grad():
        fi, ft = s.encode_image(pixels), s.encode_text(batch)
        ti, tt = teacher.encode_image(pixels), teacher.encode_text(teacher.tokenize(CAPTIONS))
    torch.testing.assert_close(fi.embed, ti.embed, rtol=0, atol=1e-6)
    torch.testing.assert_close(fi.tokens, ti.tokens, rtol=0, atol=1e-6)
    assert fi.grid == ti.grid == (2, 2)
    torch.testing.assert_close(ft.embed, tt.embed, rtol=0, atol=1e-6)
    torch.testing.assert_close(ft.tokens, tt.tokens, rtol=0, atol=1e-6)
    assert torch.equal(ft.mask, tt.mask)
    assert s.config() == {"name": "mwa", "teacher": lit_spec, "text_adapter_width": 64, "image_adapter_ratio": 0.25,
                          "enhancer_width": 64}


def test_pmf_shapes_and_image_start(lit_spec, teacher, pixels):
    s = create_student("pmf", teacher=lit_spec, prompt_layers=3).eval()
    assert len(s.text_prompts) == 3 and len(s.image_layers) == 3 and s.image_token_dim == 256
    assert 0 < s.trainable_share() < 0.2
    with torch.no_grad():
        fi, ft = s.encode_image(pixels), s.encode_text(s.tokenize(CAPTIONS))
        ti, tt = teacher.encode_image(pixels), teacher.encode_text(teacher.tokenize(CAPTIONS))
    torch.testing.assert_close(fi.embed, ti.embed, rtol=0, atol=1e-6)  # zero-initialised query read-out
    assert fi.tokens.shape == (2, 4, 256) and fi.grid == (2, 2)
    assert ft.tokens.shape == (2, 32, 384) and torch.equal(ft.mask, tt.mask)
    torch.testing.assert_close(ft.embed.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(ft.embed, tt.embed, atol=1e-3)  # the deep prompts change the text features
    assert s.config()["prompt_layers"] == 3


@pytest.mark.parametrize("name", ["mwa", "pmf"])
def test_frozen_towers_get_no_gradient_and_do_not_move(name, lit_spec, pixels):
    s = create_student(name, teacher=lit_spec)
    s.train()
    assert not s.backbone.training and not s.text_model.training  # BatchNorm statistics stay fixed
    frozen = _frozen(s)
    towers = [(n, p) for n, p in s.named_parameters() if n.startswith(("backbone.", "text_model."))]
    assert towers and all(p.requires_grad == (".adapter." in n) for n, p in towers)
    opt = make_optimizer(s, OPTIM)
    trainable = [p for p in s.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    _step_loss(s, pixels).backward()
    assert all(p.grad is None for p in s.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in trainable)
    opt.step()
    after = _frozen(s)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), [k for k in frozen if not torch.equal(frozen[k], after[k])]
    up = s.shared_parameters()
    assert all(p.requires_grad and p.abs().sum() > 0 for p in up)


def test_save_load_round_trip(lit_spec, pixels, tmp_path: Path):
    for name, cfg in [("mwa", {"text_adapter_width": 16}), ("pmf", {"prompt_layers": 2, "image_width": 64})]:
        s = create_student(name, teacher=lit_spec, **cfg)
        opt = make_optimizer(s, OPTIM)
        _step_loss(s, pixels).backward()
        opt.step()
        s.eval()
        loaded = load_student(save_student(s, tmp_path / name))
        assert loaded.config() == s.config() and isinstance(loaded, type(s))
        batch = s.tokenize(CAPTIONS)
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode_image(pixels).embed, s.encode_image(pixels).embed)
            torch.testing.assert_close(loaded.encode_text(batch).tokens, s.encode_text(batch).tokens)
        assert loaded.trainable_share() == pytest.approx(s.trainable_share())


def test_bad_configs(lit_spec):
    with pytest.raises(ValueError, match="needs a lit: teacher"):
        create_student("mwa", teacher="toy:0")
    with pytest.raises(ValueError, match=r"prompt_layers must be in 1\.\.6"):
        create_student("pmf", teacher=lit_spec, prompt_layers=7)
    with pytest.raises(ValueError, match="adapter widths must be positive"):
        create_student("mwa", teacher=lit_spec, text_adapter_width=0)


def test_train_student_cli_with_mwa(lit_spec, teacher, tmp_path: Path):
    from distill.pipeline.train import main as ts
    from distill.pipeline.cache.main import main as cache_main

    tsv = make_tiny_dataset(tmp_path / "data", n_images=8)
    cache = tmp_path / "cache"
    cache_main(["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", str(tsv), "--out", str(cache),
                "--num-workers", "0", "--batch-size", "8", "--device", "cpu"])
    out = tmp_path / "run"
    summary = ts.train_from_argv(["--cache", str(cache), "--data", str(tsv), "--out", str(out), "--steps", "3", "--batch-size", "4",
                       "--lr", "1e-3", "--num-workers", "0", "--device", "cpu", "--student", "mwa",
                       "--set", f"student.teacher={lit_spec}", "--set", "train.warmup_steps=1"])
    assert summary.steps == 3 and summary.skipped_nonfinite == 0 and summary.final_total > 0
    s = load_student(out / "student")
    assert s.config()["name"] == "mwa"
    # the towers are still exactly the teacher's, the adapters moved
    torch.testing.assert_close(s.text_model.embeddings.word_embeddings.weight,
                               teacher.text_model.embeddings.word_embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(s.backbone[0][0].weight, teacher.backbone[0][0].weight, rtol=0, atol=0)
    assert s.text_model.encoder.layer[0].output.adapter.up.weight.abs().sum() > 0
