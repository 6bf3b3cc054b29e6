"""PUMA (layer-pruned self-distillation preset) and the CoMa compression warm-up stage:
the ``coma_reconstruct`` loss on hand-checkable cases, the ``train.warmup_stage`` switch (a first
training stage), exact resume across it, and an optimizer built only from trainable parameters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.pipeline.train import main as ts
from distill.core.checkpoint import load_checkpoint
from distill.pipeline.train.config import resolve_config
from distill.core.errors import ConfigError
from distill.core.dist import init_distributed
from distill.core.features import ImageFeatures, TextFeatures
from distill.core.features import TeacherTargets
from distill.losses import DistillBatch, Dims, create_loss
from distill.losses.coma_reconstruct import reconstruction_error
from distill.losses.mac import MACLoss
from distill.pipeline.train.log import read_log
from tests.helpers.training import assert_same_training_state, die_at, train_args

PUMA_YAML = Path(__file__).resolve().parents[1] / "distill" / "configs" / "puma.yaml"
COMA = "{name: coma_reconstruct, cfg: {width: 16, heads: 2, num_summary: 4}}"
STAGE = f"train.warmup_stage={{steps: 3, losses: [{COMA}]}}"
MAIN_LOSSES = "losses=[cosine, {name: contrastive_distill, cfg: {queue_size: 8}}, token]"


# ------------------------------------------------------------------------------ PUMA config
def test_puma_preset_and_config_file_agree():
    cfg = resolve_config("puma", overrides=["student.teacher=openclip:X", "student.image_layers=4"])
    assert cfg["student"] == {"name": "pruned", "teacher": "openclip:X", "image_layers": 4, "text_layers": 6}
    assert [x["name"] for x in cfg["losses"]] == ["mac", "deep_mse"]
    assert cfg["losses"][0]["cfg"] == {"tau_intra_start": 0.03, "tau_intra_end": 0.018, "decay_until": 0.5,
                                       "tau_inter": 0.03}
    assert cfg["balancer"] == {"name": "fixed", "cfg": {"weights": {"mac": 0.9, "deep_mse": 0.1}}}
    assert resolve_config(files=[PUMA_YAML], overrides=["student.teacher=openclip:X", "student.image_layers=4"]) == cfg
    on_gpu = resolve_config("gpu", [PUMA_YAML], overrides=["student.teacher=openclip:X"])
    assert on_gpu["student"]["name"] == "pruned" and "vision_width" not in on_gpu["student"]
    assert on_gpu["train"]["batch_size"] == 256 and on_gpu["train"]["precision"] == "bf16"


def test_deep_mse_is_mse_to_the_cached_final_embeddings():
    g = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = (F.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(4))
    batch = DistillBatch(ImageFeatures(s_img), TextFeatures(s_txt),
                         TeacherTargets(ImageFeatures(t_img), TextFeatures(t_txt)), torch.tensor(0.0), torch.arange(3))
    loss = create_loss("deep_mse", Dims(4, 4, 2, 2, 2, 2))  # equal widths: no projection
    expected = (((s_img - t_img) ** 2).mean() + ((s_txt - t_txt) ** 2).mean()) / 2
    torch.testing.assert_close(loss(batch), expected)


def test_tiny_puma_run(tmp_path, monkeypatch, capsys):
    """A 2-layer open_clip teacher: cache it, prune it to 1 layer per tower, train 5 PUMA steps."""
    from distill.pipeline.cache.main import main as cache_main
    from tests.helpers.data import make_tiny_dataset
    from tests.helpers.teachers import tiny_openclip_spec

    spec = tiny_openclip_spec(tmp_path)
    tsv = make_tiny_dataset(tmp_path / "data", n_images=8)
    cache_main(["--teacher", spec, "--data", str(tsv), "--out", str(tmp_path / "cache"), "--num-workers", "0",
                "--batch-size", "8", "--device", "cpu"])
    seen: list[tuple[int, int]] = []
    real_forward = MACLoss.forward

    def spy(self, batch):
        seen.append((batch.step, batch.total_steps))
        return real_forward(self, batch)

    monkeypatch.setattr(MACLoss, "forward", spy)
    out = tmp_path / "run"
    sets = [f"student.teacher={spec}", "student.image_layers=1", "student.text_layers=1", "student.embed_dim=8",
            "train.warmup_steps=2"]
    ts.main(["--preset", "puma", "--cache", str(tmp_path / "cache"), "--data", str(tsv), "--out", str(out),
             "--steps", "5", "--batch-size", "4", "--lr", "1e-3", "--num-workers", "0", "--device", "cpu",
             *[a for s in sets for a in ("--set", s)]])
    assert seen == [(s, 5) for s in range(5)]  # the MAC schedule sees the trainer's step count
    recs = read_log(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    for r in recs:
        assert r["weight/mac"] == 0.9 and r["weight/deep_mse"] == 0.1 and r["stage"] == 1  # the only stage
        assert r["total"] == pytest.approx(0.9 * r["loss/mac"] + 0.1 * r["loss/deep_mse"], rel=1e-6)
    # learning: the MAC-dominated total falls (deep_mse alone, at weight 0.1, is noise over 5 steps)
    assert recs[-1]["total"] < 0.5 * recs[0]["total"]
    ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
    expected = {"name": "pruned", "teacher": spec, "image_layers": 1, "text_layers": 1, "embed_dim": 8}
    assert {k: ckpt["student_config"][k] for k in expected} == expected
    assert "warm-up stage" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ coma_reconstruct
def test_reconstruction_error_hand_values():
    target = torch.tensor([[[1.0, 3.0], [5.0, 9.0], [7.0, -2.0]]])  # layer-normalised: [-1, 1], [-1, 1], [1, -1]
    mask = torch.tensor([[True, True, False]])
    exact = torch.tensor([[[-1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]]])
    assert reconstruction_error(exact, target, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert reconstruction_error(exact, target, mask, "cosine").item() == pytest.approx(0.0, abs=1e-5)
    flipped = torch.tensor([[[1.0, -1.0], [0.0, 0.0], [5.0, 5.0]]])  # token 0: mse 4, token 1: mse 1
    assert reconstruction_error(flipped, target, mask).item() == pytest.approx(2.5, abs=1e-4)
    assert reconstruction_error(-exact, target, mask, "cosine").item() == pytest.approx(2.0, abs=1e-5)
    assert reconstruction_error(torch.zeros(1, 3, 2), target).item() == pytest.approx(1.0, abs=1e-4)


def _coma_batch(s_img: torch.Tensor, s_txt: torch.Tensor, s_mask: torch.Tensor, t_img: torch.Tensor,
                t_txt: torch.Tensor, t_mask: torch.Tensor) -> DistillBatch:
    e = F.normalize(torch.ones(s_img.shape[0], 4), dim=-1)
    return DistillBatch(ImageFeatures(e, s_img, (2, 2)), TextFeatures(e, s_txt, s_mask),
                        TeacherTargets(ImageFeatures(e, t_img, (2, 2)), TextFeatures(e, t_txt, t_mask)),
                        torch.tensor(0.0), torch.arange(s_img.shape[0]))


def test_coma_loss_is_zero_when_the_decoder_outputs_the_target():
    g = torch.Generator().manual_seed(0)
    v_img, v_txt = torch.randn(6, generator=g), torch.randn(5, generator=g)
    # every teacher token is a positive rescaling + shift of one vector: its normalised target is LN(v)
    t_img = torch.rand(2, 4, 1, generator=g) * 3 + 0.5
    t_img = t_img * v_img + torch.randn(2, 4, 1, generator=g)
    t_txt = (torch.rand(2, 3, 1, generator=g) + 0.5) * v_txt + torch.randn(2, 3, 1, generator=g)
    t_mask = torch.tensor([[True, True, False], [True, False, False]])
    t_txt[~t_mask] = 1e3 * torch.randn(3, 5, generator=g)  # padding must not count
    s_mask = torch.tensor([[True, True, False], [True, True, True]])
    batch = _coma_batch(torch.randn(2, 4, 7, generator=g), torch.randn(2, 3, 3, generator=g), s_mask, t_img, t_txt, t_mask)
    for metric in ("mse", "cosine"):
        loss = create_loss("coma_reconstruct", Dims(4, 4, 7, 3, 6, 5), num_summary=2, width=8, heads=2, metric=metric)
        assert loss(batch).item() > 0.05
        with torch.no_grad():
            for r, v in ((loss.reconstructors["image"], v_img), (loss.reconstructors["text"], v_txt)):
                r.out.weight.zero_()
                r.out.bias.copy_(F.layer_norm(v, v.shape))
        assert loss(batch).item() == pytest.approx(0.0, abs=1e-5)


def test_coma_gradient_reaches_real_student_tokens_only():
    g = torch.Generator().manual_seed(1)
    s_img = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    s_txt = torch.randn(2, 3, 3, generator=g, requires_grad=True)
    s_mask = torch.tensor([[True, True, False], [True, True, True]])
    batch = _coma_batch(s_img, s_txt, s_mask, torch.randn(2, 4, 6, generator=g), torch.randn(2, 3, 5, generator=g),
                        s_mask.clone())
    loss = create_loss("coma_reconstruct", Dims(4, 4, 7, 3, 6, 5), num_summary=2, width=8, heads=2)
    loss(batch).backward()
    assert (s_img.grad.abs().sum(-1) > 0).all()
    assert torch.equal(s_txt.grad.abs().sum(-1) > 0, s_mask)  # padded student tokens are never attended
    assert all(p.grad is not None for p in loss.parameters())
    only_image = create_loss("coma_reconstruct", Dims(4, 4, 7, 3, 6, 5), width=8, heads=2, modalities=["image"])
    assert list(only_image.reconstructors) == ["image"]


def test_coma_rejects_bad_options():
    d = Dims(4, 4, 7, 3, 6, 5)
    with pytest.raises(ValueError, match="metric must be one of"):
        create_loss("coma_reconstruct", d, metric="l1")
    with pytest.raises(ValueError, match="modalities must be a non-empty subset"):
        create_loss("coma_reconstruct", d, modalities=["audio"])
    with pytest.raises(ValueError, match="width divisible by heads"):
        create_loss("coma_reconstruct", d, width=10, heads=4)


# ------------------------------------------------------------------------------ warm-up stage
def test_warmup_stage_config():
    stage = resolve_config(overrides=["train.warmup_stage.steps=5"])["train"]["warmup_stage"]
    assert stage == {"steps": 5, "losses": [{"name": "coma_reconstruct", "cfg": {}}], "weights": {}}
    assert resolve_config()["train"]["warmup_stage"] is None
    for bad, msg in (("train.warmup_stage.steps=0", "steps must be a positive integer"),
                     ("train.warmup_stage={steps: 2, lossess: []}", "unknown config key train.warmup_stage.lossess"),
                     ("train.warmup_stage={steps: 2, weights: {token: 2}}", "weights must map stage loss names"),
                     ("train.warmup_stage={steps: 2, losses: [token, token]}", "warmup_stage.losses must have distinct")):
        with pytest.raises(ConfigError, match=msg):
            resolve_config(overrides=[bad])


def test_stage_switch_at_step_n(tiny, tmp_path, capsys):
    tsv, cache = tiny
    extra = ("--set", MAIN_LOSSES, "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=0")
    ts.main(train_args(cache, tsv, tmp_path / "staged", 6, *extra, "--set", STAGE))
    assert "warm-up stage done after 3 steps (coma_reconstruct); now training with cosine, contrastive_distill, token" \
        in capsys.readouterr().out
    recs = read_log(tmp_path / "staged")
    main_keys = {"loss/cosine", "loss/contrastive_distill", "loss/token"}
    for r in recs[:3]:
        assert r["stage"] == 1 and {k for k in r if k.startswith("loss/")} == {"loss/coma_reconstruct"}
        assert r["weight/coma_reconstruct"] == 1.0 and r["total"] == r["loss/coma_reconstruct"]
    for r in recs[3:]:
        assert r["stage"] == 2 and {k for k in r if k.startswith("loss/")} == main_keys
    ts.main(train_args(cache, tsv, tmp_path / "plain", 6, *extra))
    plain = read_log(tmp_path / "plain")
    assert [r["lr"] for r in recs] == [r["lr"] for r in plain]  # one LR schedule over both stages
    assert all(r["stage"] == 1 for r in plain)  # one stage

    ck = {s: load_checkpoint(tmp_path / "staged" / "checkpoints" / f"step_{s:06d}.pt") for s in (1, 3, 6)}
    part_of = lambda ckpt, part: ckpt["student"] if part == "student" else ckpt["stages"][part]["losses"]  # noqa: E731
    changed = lambda a, b, part: [k for k in part_of(ck[a], part)  # noqa: E731
                                  if not torch.equal(part_of(ck[a], part)[k], part_of(ck[b], part)[k])]
    assert changed(1, 3, 0) and not changed(1, 3, 1)  # stage 1 trains only CoMa (+ student)
    assert changed(3, 6, 1) and not changed(3, 6, 0)  # stage 2 leaves CoMa alone
    assert changed(1, 3, "student") and changed(3, 6, "student")


def test_warmup_stage_must_end_before_training_does(tiny, tmp_path):
    tsv, cache = tiny
    with pytest.raises(ConfigError, match=r"warmup_stage.steps \(3\) must be smaller than the number of optimizer steps \(3\)"):
        ts.main(train_args(cache, tsv, tmp_path / "run", 3, "--set", STAGE))


def test_resume_across_the_stage_switch_is_exact(tiny, tmp_path, monkeypatch):
    tsv, cache = tiny
    extra = ("--set", MAIN_LOSSES, "--set", STAGE, "--set", "train.checkpoint_every=2")
    ts.main(train_args(cache, tsv, tmp_path / "full", 6, *extra))
    die_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        ts.main(train_args(cache, tsv, tmp_path / "cut", 6, *extra))
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")["step"] == 4
    (tmp_path / "cut" / "checkpoints" / "latest.pt").unlink()  # resume from step 2, inside stage 1
    monkeypatch.undo()
    ts.main(train_args(cache, tsv, tmp_path / "cut", 6, *extra, "--resume", str(tmp_path / "cut" / "checkpoints" /
                                                                              "step_000002.pt")))
    strip = lambda out: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_log(out)]  # noqa: E731
    assert strip(tmp_path / "cut") == strip(tmp_path / "full")
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")
    assert_same_training_state(a, b)
    assert any(k.startswith("coma_reconstruct.") for k in a["stages"][0]["losses"])


# ------------------------------------------------------------------------------ optimizer
def test_optimizer_holds_exactly_the_trainable_parameters(tiny):
    tsv, cache = tiny
    cfg = ts.config_from_args(ts.build_parser().parse_args(train_args(cache, tsv, Path("unused"), 6, "--set", STAGE)))
    run = ts.setup(cfg, init_distributed("cpu"))
    frozen = [p for name, p in run.student.named_parameters() if "visual" in name or "vision" in name]
    assert frozen
    for p in frozen:
        p.requires_grad_(False)
    optimizer = ts.make_optimizer(run.distiller, cfg["train"])
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in run.distiller.parameters() if p.requires_grad}
    assert in_optimizer == trainable and not in_optimizer & {id(p) for p in frozen}
    assert {id(p) for p in run.distiller.stages[0].losses.parameters()} <= in_optimizer
