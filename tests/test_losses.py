"""Distillation losses against hand-written numpy formulas on tiny tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.core.features import ImageFeatures, TextFeatures
from distill.core.features import TeacherTargets
from distill.core.errors import ConfigError
from distill.losses import LOSSES, DistillBatch, DistillLoss, Dims, create_loss
from distill.losses.projection import EmbedProjections
from distill.losses.queue import TeacherQueue

RNG = np.random.default_rng(0)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def rand_unit(n: int, d: int) -> np.ndarray:
    return unit(RNG.normal(size=(n, d)))


def t(x: np.ndarray | list) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def dims(ds: int = 2, dt: int = 2, si: int = 3, st: int = 3, ti: int = 3, tt: int = 3) -> Dims:
    return Dims(student_embed=ds, teacher_embed=dt, student_image_token=si, student_text_token=st,
                teacher_image_token=ti, teacher_text_token=tt)


def make_batch(s_img, s_txt, t_img, t_txt, ids=None, *, scale: float = 100.0, student_log_scale: float = 0.0,
               step: int = 0, total: int = 1, s_img_feats: dict | None = None, s_txt_feats: dict | None = None,
               t_img_feats: dict | None = None, t_txt_feats: dict | None = None,
               text_embed_mean: torch.Tensor | None = None) -> DistillBatch:
    ids = torch.arange(len(s_img)) if ids is None else torch.tensor(ids)
    return DistillBatch(
        s_img=ImageFeatures(t(s_img), **(s_img_feats or {})),
        s_txt=TextFeatures(t(s_txt), **(s_txt_feats or {})),
        teacher=TeacherTargets(ImageFeatures(t(t_img), **(t_img_feats or {})), TextFeatures(t(t_txt), **(t_txt_feats or {})),
                               logit_scale=scale, text_embed_mean=text_embed_mean),
        student_logit_scale=torch.tensor(student_log_scale),
        image_ids=ids, step=step, total_steps=total)


def np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy; -inf logits are excluded."""
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_builds_from_its_defaults(name):
    """Every loss (driven by the registry): its options are discoverable and all have defaults, it
    builds from dims alone and refuses an unknown option naming it."""
    known, required, _ = LOSSES.options(name)
    assert not required, f"{name}: every option needs a default (a config may give none)"
    loss = create_loss(name, dims(ds=4, dt=6, si=5, st=3, ti=7, tt=2))
    assert isinstance(loss, DistillLoss) and loss.queue_size >= 0
    with pytest.raises(ConfigError, match=f"^no_such_option: unknown option of loss '{name}'"):
        create_loss(name, dims(), no_such_option=1)


# ---------------------------------------------------------------- embedding-matching losses
def test_feature_l1_hand_value():
    b = make_batch([[1, 0], [0, 1]], [[0.6, 0.8], [1, 0]], [[0.6, 0.8], [0, 1]], [[0.6, 0.8], [0, -1]])
    # image: |1-.6| + |0-.8| + 0 + 0 = 1.2 over 4 elements; text: 0 + 0 + |1-0| + |0+1| = 2 over 4
    assert create_loss("feature_l1", dims())(b).item() == pytest.approx((0.3 + 0.5) / 2)


def test_cosine_hand_value():
    b = make_batch([[1, 0], [0, 1]], [[1, 0], [0, 1]], [[0, 1], [0, 1]], [[-1, 0], [0, 1]])
    # cosines: 0, 1, -1, 1 -> mean 0.25 -> 1 - 1.25 / 2
    assert create_loss("cosine", dims())(b).item() == pytest.approx(1 - 1.25 / 2)


def test_shared_projections_identity_or_linear_and_used_by_every_embedding_loss():
    same = EmbedProjections(4, 4)
    assert same.linear_maps() == {} and len(list(same.parameters())) == 0
    assert set(EmbedProjections(4, 4, "linear").linear_maps()) == {"image", "text"}
    proj = EmbedProjections(3, 2)
    assert tuple(proj.image.linear.weight.shape) == (2, 3) and proj.image.linear is not proj.text.linear
    w_img, w_txt = np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), np.array([[0.0, 1.0, 0.0], [1.0, 0.0, -1.0]])
    with torch.no_grad():
        proj.image.linear.weight.copy_(t(w_img))
        proj.text.linear.weight.copy_(t(w_txt))
    s_img, s_txt, t_img, t_txt = rand_unit(2, 3), rand_unit(2, 3), rand_unit(2, 2), rand_unit(2, 2)
    p_img, p_txt = unit(s_img @ w_img.T), unit(s_txt @ w_txt.T)
    cos = np.concatenate([(p_img * t_img).sum(1), (p_txt * t_txt).sum(1)])
    b = make_batch(s_img, s_txt, t_img, t_txt)
    with pytest.raises(ValueError, match="cosine: the student embedding \\(3\\) and the teacher's \\(2\\)"):
        create_loss("cosine", dims(3, 2))(b)
    got = create_loss("cosine", dims(3, 2))(proj.attach(b))
    assert got.item() == pytest.approx(1 - (cos.mean() + 1) / 2, abs=1e-6)
    l1 = create_loss("feature_l1", dims(3, 2))(proj.attach(b))
    assert l1.item() == pytest.approx((np.abs(p_img - t_img).mean() + np.abs(p_txt - t_txt).mean()) / 2, abs=1e-6)
    (got + l1).backward()
    assert proj.image.linear.weight.grad.abs().sum() > 0 and proj.text.linear.weight.grad.abs().sum() > 0
    for name in ("contrastive_distill", "feature_l1", "cosine", "deep_mse"):  # no loss owns a projection any more
        assert len(list(create_loss(name, dims(3, 2)).parameters())) == 0, name


def test_deep_mse_final_and_intermediate():
    s_img, s_txt, t_img, t_txt = rand_unit(3, 2), rand_unit(3, 2), rand_unit(3, 2), rand_unit(3, 2)
    base = ((s_img - t_img) ** 2).mean() / 2 + ((s_txt - t_txt) ** 2).mean() / 2
    assert create_loss("deep_mse", dims())(make_batch(s_img, s_txt, t_img, t_txt)).item() == pytest.approx(base, abs=1e-6)

    loss = create_loss("deep_mse", dims(), intermediates={"image.3": 3}, intermediate_weight=0.5)
    w = RNG.normal(size=(3, 2))
    with torch.no_grad():
        loss.heads["image__3"].weight.copy_(t(w))
    inter = RNG.normal(size=(3, 3)) * 5
    expected = base + 0.5 * ((unit(s_img @ w.T) - unit(inter)) ** 2).mean()
    got = loss(make_batch(s_img, s_txt, t_img, t_txt, t_img_feats={"intermediates": {"image.3": t(inter)}}))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(KeyError, match="image.3"):
        loss(make_batch(s_img, s_txt, t_img, t_txt, t_img_feats={"intermediates": {"image.5": t(inter)}}))


# ---------------------------------------------------------------- contrastive distillation + queue
def queued(b: DistillBatch, queue: TeacherQueue) -> DistillBatch:
    b.queue = queue.view()
    return b


def step_and_commit(loss, b: DistillBatch, queue: TeacherQueue) -> torch.Tensor:
    """One training step's queue protocol: forward on the queue, push, (backward), commit."""
    out = loss(queued(b, queue))
    queue.push(b.teacher.image.embed, b.teacher.text.embed, b.image_ids)
    queue.commit()
    return out


def test_contrastive_distill_in_batch_then_queue_negatives():
    tau = 0.5
    loss = create_loss("contrastive_distill", dims(), queue_size=8, temperature=tau, terms=["img_txt"],
                      multi_positive=False)
    queue = TeacherQueue(8, 2)
    s1, t1_img, t1_txt = rand_unit(2, 2), rand_unit(2, 2), rand_unit(2, 2)
    b1 = make_batch(s1, rand_unit(2, 2), t1_img, t1_txt, ids=[0, 1])
    assert step_and_commit(loss, b1, queue).item() == pytest.approx(np_ce(s1 @ t1_txt.T / tau, np.array([0, 1])), abs=1e-5)
    # the teacher text embeddings of batch 1 are now negatives (ids 0, 1); batch 2 has ids 1, 2 so the
    # queued id-1 entry is a false negative for row 0 and is dropped from its denominator
    s2, t2_txt = rand_unit(2, 2), rand_unit(2, 2)
    b2 = make_batch(s2, rand_unit(2, 2), rand_unit(2, 2), t2_txt, ids=[1, 2])
    logits = np.concatenate([s2 @ t2_txt.T, s2 @ t1_txt.T], axis=1) / tau
    logits[0, 3] = -np.inf
    assert loss(queued(b2, queue)).item() == pytest.approx(np_ce(logits, np.array([0, 1])), abs=1e-5)
    # multi-positive: the queued caption of image 1 is a second positive of row 0
    multi = create_loss("contrastive_distill", dims(), queue_size=8, temperature=tau, terms=["img_txt"])
    logits[0, 3] = (s2[0] @ t1_txt[1]) / tau
    lse = np.log(np.exp(logits).sum(1))
    expected = np.mean([lse[0] - np.log(np.exp(logits[0, [0, 3]]).sum()), lse[1] - logits[1, 1]])
    assert multi(queued(b2, queue)).item() == pytest.approx(expected, abs=1e-5)
    # the forward read the queue in place, without changing it
    assert queue.ids.tolist() == [0, 1, -1, -1, -1, -1, -1, -1] and queue.pending_rows() == 0


def test_contrastive_distill_all_terms_and_in_batch_false_negatives():
    tau = 0.05
    s_img, s_txt, t_img, t_txt = (rand_unit(3, 2) for _ in range(4))
    ids = np.array([7, 7, 9])
    same = ids[:, None] == ids[None, :]
    fn = same & ~np.eye(3, dtype=bool)
    masked, multi = [], []
    for a, b in ((s_img, t_img), (s_txt, t_txt), (s_img, t_txt), (s_txt, t_img)):
        lg = a @ b.T / tau
        lse = np.log(np.exp(lg - lg.max()).sum(1)) + lg.max()
        multi.append(np.mean([lse[i] - (np.log(np.exp(lg[i, same[i]] - lg.max()).sum()) + lg.max()) for i in range(3)]))
        lg[fn] = -np.inf
        masked.append(np_ce(lg, np.arange(3)))
    b = make_batch(s_img, s_txt, t_img, t_txt, ids=ids.tolist())
    got = create_loss("contrastive_distill", dims(), queue_size=0, temperature=tau, multi_positive=False)(b)
    assert got.item() == pytest.approx(np.mean(masked), rel=1e-5)
    got = create_loss("contrastive_distill", dims(), queue_size=0, temperature=tau)(b)
    assert got.item() == pytest.approx(np.mean(multi), rel=1e-5)


def test_contrastive_distill_text_targets():
    tau = 0.1
    s_img, s_txt, t_img, t_cap, t_mean = (rand_unit(3, 2) for _ in range(5))
    b = make_batch(s_img, s_txt, t_img, t_cap, text_embed_mean=t(t_mean))

    def ce(a, tgt):
        return np_ce(a @ tgt.T / tau, np.arange(3))

    for target, img_txt, txt_txt in (("caption", t_cap, t_cap), ("caption_mean", t_mean, t_mean), ("both", t_mean, t_cap)):
        loss = create_loss("contrastive_distill", dims(), queue_size=0, temperature=tau, terms=["img_txt", "txt_txt"],
                          text_target=target)
        assert loss(b).item() == pytest.approx((ce(s_img, img_txt) + ce(s_txt, txt_txt)) / 2, rel=1e-5), target
    # without a caption mean in the batch (a teacher run online) the caption is the target
    no_mean = make_batch(s_img, s_txt, t_img, t_cap)
    loss = create_loss("contrastive_distill", dims(), queue_size=0, temperature=tau, terms=["img_txt"], text_target="caption_mean")
    assert loss(no_mean).item() == pytest.approx(ce(s_img, t_cap), rel=1e-5)
    with pytest.raises(ValueError, match="text_target"):
        create_loss("contrastive_distill", dims(), text_target="mean")


def test_queue_fifo_wraparound_checkpoint_and_nonfinite_rows():
    queue = TeacherQueue(5, 2)
    teacher_rows = []
    for step in range(3):
        t_img, t_txt = t(rand_unit(2, 2)), t(rand_unit(2, 2))
        teacher_rows.append((t_img, t_txt))
        queue.push(t_img, t_txt, torch.tensor([10 * step, 10 * step + 1]))
        queue.commit()
    # slots: batch0 -> 0,1; batch1 -> 2,3; batch2 -> 4, then wraps to 0
    assert queue.ids.tolist() == [21, 1, 10, 11, 20]
    assert int(queue.ptr) == 1 and int(queue.filled) == 5
    assert torch.equal(queue.img[0], teacher_rows[2][0][1]) and torch.equal(queue.txt[4], teacher_rows[2][1][0])
    assert torch.equal(queue.txt[1], teacher_rows[0][1][1])
    restored = TeacherQueue(5, 2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.img, queue.img) and int(restored.ptr) == 1
    # a non-finite row never enters: its slot keeps its previous entry, and it is counted
    bad_img = torch.tensor([[float("nan"), 0.0], [0.6, 0.8]])
    queue.push(bad_img, t(rand_unit(2, 2)), torch.tensor([30, 31]))
    queue.discard()  # a skipped step: nothing written
    assert queue.ids.tolist() == [21, 1, 10, 11, 20] and int(queue.nonfinite) == 0
    queue.push(bad_img, t(rand_unit(2, 2)), torch.tensor([30, 31]))
    queue.commit()
    assert queue.ids.tolist() == [21, 1, 31, 11, 20] and int(queue.nonfinite) == 1 and int(queue.ptr) == 3
    assert torch.isfinite(queue.img).all() and torch.equal(queue.img[1], teacher_rows[0][0][1])
    empty = TeacherQueue(4, 2)
    empty.push(bad_img, t(rand_unit(2, 2)), torch.tensor([5, 6]))
    empty.commit()
    assert empty.ids.tolist() == [-1, 6, -1, -1] and empty.view().valid.tolist() == [False, True, False, False]


def test_queue_keeps_newest_rows_of_oversized_batch_and_of_pending_pushes():
    queue = TeacherQueue(3, 2)
    queue.push(t(rand_unit(4, 2)), t(rand_unit(4, 2)), torch.tensor([0, 1, 2, 3]))
    queue.commit()
    assert sorted(queue.ids.tolist()) == [1, 2, 3] and int(queue.filled) == 3
    # rows 1, 2, 3 continue the FIFO order from slot 1: the next write goes to the oldest slot
    assert queue.ids.tolist() == [3, 1, 2] and int(queue.ptr) == 1
    for k in range(4):  # accumulated micro-batches: pending memory stays bounded by the queue size
        queue.push(t(rand_unit(2, 2)), t(rand_unit(2, 2)), torch.tensor([10 + 2 * k, 11 + 2 * k]))
    assert queue.pending_rows() <= 3 + 2
    queue.commit()
    assert sorted(queue.ids.tolist()) == [15, 16, 17]


def test_queue_forward_reads_buffers_and_backward_works_after_the_step():
    """No clone: the loss's graph holds the queue buffers; the commit comes after backward."""
    loss = create_loss("contrastive_distill", dims(), queue_size=4, temperature=0.1)
    queue = TeacherQueue(4, 2)
    queue.push(t(rand_unit(2, 2)), t(rand_unit(2, 2)), torch.tensor([5, 6]))
    queue.commit()
    s_img = torch.tensor(rand_unit(2, 2), dtype=torch.float32, requires_grad=True)
    b = queued(make_batch(rand_unit(2, 2), rand_unit(2, 2), rand_unit(2, 2), rand_unit(2, 2)), queue)
    b.s_img.embed = s_img
    out = loss(b)
    queue.push(b.teacher.image.embed, b.teacher.text.embed, b.image_ids)
    out.backward()
    queue.commit()
    assert torch.isfinite(s_img.grad).all() and queue.ids.tolist() == [5, 6, 0, 1]


def test_contrastive_distill_is_fp32_under_autocast():
    s_img, s_txt, t_img, t_txt = (rand_unit(4, 8) for _ in range(4))
    ref = create_loss("contrastive_distill", dims(8, 8), queue_size=0)(make_batch(s_img, s_txt, t_img, t_txt))
    b = make_batch(s_img, s_txt, t_img, t_txt)
    b.s_img.embed, b.s_txt.embed = b.s_img.embed.bfloat16(), b.s_txt.embed.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = create_loss("contrastive_distill", dims(8, 8), queue_size=0)(b)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=0.05)


# ---------------------------------------------------------------- student-side contrastive losses
def test_student_clip_masks_or_joins_duplicate_images_and_clamps_scale():
    s_img, s_txt = rand_unit(3, 2), rand_unit(3, 2)
    ids = np.array([4, 4, 5])
    same = ids[:, None] == ids[None, :]
    fn = same & ~np.eye(3, dtype=bool)
    for log_scale, scale in ((math.log(10.0), 10.0), (math.log(1000.0), 100.0)):
        i2t, t2i = scale * s_img @ s_txt.T, scale * s_txt @ s_img.T
        # multi-positive: -log of the softmax mass on all captions (images) of the anchor's image
        multi = np.mean([np.log(np.exp(m[i]).sum()) - np.log(np.exp(m[i, same[i]]).sum())
                         for m in (i2t, t2i) for i in range(3)])
        i2t[fn] = t2i[fn] = -np.inf
        masked = (np_ce(i2t, np.arange(3)) + np_ce(t2i, np.arange(3))) / 2
        b = make_batch(s_img, s_txt, s_img, s_txt, ids=ids.tolist(), student_log_scale=log_scale)
        assert create_loss("student_clip", dims(), multi_positive=False)(b).item() == pytest.approx(masked, rel=1e-5)
        assert create_loss("student_clip", dims())(b).item() == pytest.approx(multi, rel=1e-5)
    # with distinct images both forms are the plain CLIP loss
    b = make_batch(s_img, s_txt, s_img, s_txt, ids=[0, 1, 2])
    assert create_loss("student_clip", dims())(b).item() == pytest.approx(
        create_loss("student_clip", dims(), multi_positive=False)(b).item(), rel=1e-6)


def test_mac_exponential_temperature_schedule():
    loss = create_loss("mac", dims())
    for step in (0, 10, 25, 40, 50, 80, 100):
        frac = min(1.0, step / 50)
        assert loss.tau_intra(step, 100) == pytest.approx(0.03 * (0.018 / 0.03) ** frac)
    assert loss.tau_intra(25, 100) == pytest.approx(math.sqrt(0.03 * 0.018))  # geometric mid-point
    assert loss.tau_intra(100, 100) == pytest.approx(0.018)
    linear = create_loss("mac", dims(), schedule="linear")
    assert linear.tau_intra(25, 100) == pytest.approx(0.024) and linear.tau_intra(60, 100) == pytest.approx(0.018)
    with pytest.raises(ValueError, match="schedule"):
        create_loss("mac", dims(), schedule="cosine")


def test_mac_hand_value_positive_in_the_intra_group():
    img, txt = rand_unit(3, 2), rand_unit(3, 2)
    ids = np.array([0, 0, 1])
    tau_e = 0.03
    tau_a = 0.03 * (0.018 / 0.03) ** 0.5  # step 25 of 100
    same = ids[:, None] == ids[None, :]
    expected = []
    for a, own, other in ((img, img, txt), (txt, txt, img)):
        cross = a @ other.T
        positive = np.diag(cross)[:, None] / tau_a  # the positive at the intra (hard) temperature
        inter, intra = cross / tau_e, a @ own.T / tau_a
        inter[same] = -np.inf  # the positive and other captions of the same image leave the inter group
        intra[same] = -np.inf
        expected.append(np_ce(np.concatenate([positive, inter, intra], axis=1), np.zeros(3, dtype=int)))
    b = make_batch(img, txt, img, txt, ids=ids.tolist(), step=25, total=100)
    assert create_loss("mac", dims())(b).item() == pytest.approx(np.mean(expected), rel=1e-5)
    # and not at the inter temperature (the former formulation)
    old = []
    for a, own, other in ((img, img, txt), (txt, txt, img)):
        inter, intra = a @ other.T / tau_e, a @ own.T / tau_a
        inter[same & ~np.eye(3, dtype=bool)] = -np.inf
        intra[same] = -np.inf
        old.append(np_ce(np.concatenate([inter, intra], axis=1), np.arange(3)))
    assert abs(np.mean(old) - np.mean(expected)) > 1e-3


# ---------------------------------------------------------------- relational losses
def np_kl_rows(t_logits: np.ndarray, s_logits: np.ndarray) -> float:
    pt = np.exp(t_logits) / np.exp(t_logits).sum(1, keepdims=True)
    ps = np.exp(s_logits) / np.exp(s_logits).sum(1, keepdims=True)
    return float((pt * np.log(pt / ps)).sum(1).mean())


def test_relation_kl_old_behaviour_both_directions_and_intra():
    s_img, s_txt, t_img, t_txt = (rand_unit(3, 2) for _ in range(4))
    b = make_batch(s_img, s_txt, t_img, t_txt, scale=10.0)
    old = {"temperature": None, "tau_squared": False, "queue": False}
    # temperature null: tau_t = tau_s = 1 / teacher scale
    expected = (np_kl_rows(10 * t_img @ t_txt.T, 10 * s_img @ s_txt.T)
                + np_kl_rows(10 * t_txt @ t_img.T, 10 * s_txt @ s_img.T)) / 2
    assert create_loss("relation_kl", dims(), **old)(b).item() == pytest.approx(expected, rel=1e-5)
    off = ~np.eye(3, dtype=bool)
    terms = [np_kl_rows(t_img @ t_txt.T / 0.2, s_img @ s_txt.T / 0.5),
             np_kl_rows(t_txt @ t_img.T / 0.2, s_txt @ s_img.T / 0.5)]
    for tt, ss in ((t_img, s_img), (t_txt, s_txt)):
        terms.append(np_kl_rows((tt @ tt.T / 0.2)[off].reshape(3, 2), (ss @ ss.T / 0.5)[off].reshape(3, 2)))
    got = create_loss("relation_kl", dims(), tau_t=0.2, tau_s=0.5, intra=True, queue=False, tau_squared=False)(b)
    assert got.item() == pytest.approx(np.mean(terms), rel=1e-5)
    # tau^2 scaling multiplies by tau_s ** 2
    got = create_loss("relation_kl", dims(), tau_t=0.2, tau_s=0.5, intra=True, queue=False)(b)
    assert got.item() == pytest.approx(0.25 * np.mean(terms), rel=1e-5)


def test_relation_kl_own_temperature_and_queue_columns():
    s_img, s_txt, t_img, t_txt = (rand_unit(3, 2) for _ in range(4))
    q_img, q_txt = rand_unit(2, 2), rand_unit(2, 2)
    queue = TeacherQueue(4, 2)
    queue.push(t(q_img), t(q_txt), torch.tensor([7, 8]))
    queue.commit()  # slots 2, 3 stay empty and must not count
    b = queued(make_batch(s_img, s_txt, t_img, t_txt, scale=100.0), queue)
    tau = 0.07
    t_rows = [t_img @ np.concatenate([t_txt, q_txt]).T, t_txt @ np.concatenate([t_img, q_img]).T]
    s_rows = [s_img @ np.concatenate([s_txt, q_txt]).T, s_txt @ np.concatenate([s_img, q_img]).T]
    expected = tau ** 2 * np.mean([np_kl_rows(tl / tau, sl / tau) for tl, sl in zip(t_rows, s_rows)])
    loss = create_loss("relation_kl", dims())
    assert loss.temperatures(100.0) == (0.07, 0.07) and loss.queue_size > 0 and loss.uses_projection
    got = loss(b)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # queue: false ignores the shared queue
    no_q = create_loss("relation_kl", dims(), queue=False)(b)
    assert no_q.item() == pytest.approx(tau ** 2 * (np_kl_rows(t_img @ t_txt.T / tau, s_img @ s_txt.T / tau)
                                                   + np_kl_rows(t_txt @ t_img.T / tau, s_txt @ s_img.T / tau)) / 2, rel=1e-5)


def test_relation_kl_gradient_bounded_at_small_tau():
    """With tau^2 scaling the gradient on the student similarities shrinks with tau; without it grows ~1/tau."""
    s_img, s_txt, t_img, t_txt = (rand_unit(8, 4) for _ in range(4))

    def grad_norm(**cfg):
        x = torch.tensor(s_img, dtype=torch.float32, requires_grad=True)
        b = make_batch(s_img, s_txt, t_img, t_txt)
        b.s_img.embed = x
        create_loss("relation_kl", dims(4, 4), queue=False, **cfg)(b).backward()
        return x.grad.norm().item()

    assert grad_norm(temperature=0.01, tau_squared=False) > 5 * grad_norm(temperature=0.1, tau_squared=False)
    assert grad_norm(temperature=0.01) < grad_norm(temperature=0.1)


def test_relation_kl_zero_when_student_equals_teacher():
    e_img, e_txt = rand_unit(4, 3), rand_unit(4, 3)
    b = make_batch(e_img, e_txt, e_img, e_txt)
    assert create_loss("relation_kl", dims(3, 3), intra=True)(b).item() == pytest.approx(0.0, abs=1e-6)
    queue = TeacherQueue(3, 3)
    queue.push(t(rand_unit(2, 3)), t(rand_unit(2, 3)), torch.tensor([9, 10]))
    queue.commit()
    assert create_loss("relation_kl", dims(3, 3), intra=True)(queued(b, queue)).item() == pytest.approx(0.0, abs=1e-6)


def test_triplet_uses_teacher_hard_negatives_and_skips_same_image():
    s_img = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    s_txt = np.array([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    # teacher: image 0's hardest wrong caption is caption 2, image 1's is caption 0, image 2's is caption 0
    t_img = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    t_txt = np.array([[0.9, 0.1], [0.0, 1.0], [0.7, 0.3]])
    t_img, t_txt = unit(t_img), unit(t_txt)
    s = s_img @ s_txt.T
    tsim = t_img @ t_txt.T

    def hinges(s_mat: np.ndarray, t_mat: np.ndarray, invalid: np.ndarray) -> list[float]:
        out = []
        for i in range(len(s_mat)):
            cand = np.where(invalid[i], -np.inf, t_mat[i])
            if np.isfinite(cand).any():
                out.append(max(0.0, 0.2 - s_mat[i, i] + s_mat[i, int(np.argmax(cand))]))
        return out

    for ids in ([0, 1, 2], [0, 1, 0]):
        inv = np.array(ids)[:, None] == np.array(ids)[None, :]
        expected = np.mean(hinges(s, tsim, inv) + hinges(s.T, tsim.T, inv))
        got = create_loss("triplet", dims())(make_batch(s_img, s_txt, t_img, t_txt, ids=ids))
        assert got.item() == pytest.approx(expected, abs=1e-6)
    # ids [0, 1, 0]: anchor 0 may not use caption 2 (same image) even though the teacher ranks it highest
    assert int(np.argmax(np.where(inv[0], -np.inf, tsim[0]))) == 1


# ---------------------------------------------------------------- token loss
def token_batch(s_tokens=None, t_tokens=None, s_grid=None, t_grid=None, s_txt=None, s_mask=None,
                t_txt=None, t_mask=None) -> DistillBatch:
    e = rand_unit(len(s_tokens if s_tokens is not None else s_txt), 2)
    return make_batch(e, e, e, e,
                      s_img_feats={"tokens": None if s_tokens is None else t(s_tokens), "grid": s_grid},
                      s_txt_feats={"tokens": None if s_txt is None else t(s_txt),
                                   "mask": None if s_mask is None else torch.tensor(s_mask)},
                      t_img_feats={"tokens": None if t_tokens is None else t(t_tokens), "grid": t_grid},
                      t_txt_feats={"tokens": None if t_txt is None else t(t_txt),
                                   "mask": None if t_mask is None else torch.tensor(t_mask)})


def identity_token_loss(c: int = 3, **cfg):
    loss = create_loss("token", dims(si=c, st=c, ti=c, tt=c), **cfg)
    with torch.no_grad():
        loss.img_proj.weight.copy_(torch.eye(c))
        loss.txt_proj.weight.copy_(torch.eye(c))
    return loss


def np_one_minus_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1 - (unit(a) * unit(b)).sum(-1)


def test_token_grid_pooling_4x4_to_2x2():
    s = RNG.normal(size=(2, 16, 3))
    tt = RNG.normal(size=(2, 4, 3))
    grid = s.reshape(2, 4, 4, 3)
    pooled = np.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2)) for i in range(2) for j in range(2)], 1)
    got = identity_token_loss()(token_batch(s, tt, (4, 4), (2, 2)))
    assert got.item() == pytest.approx(np_one_minus_cos(pooled, tt).mean(), rel=1e-5)


def test_token_grid_pooling_3x3_to_2x2_overlapping_bins():
    s = RNG.normal(size=(1, 9, 3))
    tt = RNG.normal(size=(1, 4, 3))
    grid = s.reshape(1, 3, 3, 3)
    bins = [(0, 2), (1, 3)]  # adaptive pooling bins for 3 -> 2: [floor(i*3/2), ceil((i+1)*3/2))
    pooled = np.stack([grid[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in bins for c0, c1 in bins], 1)
    got = identity_token_loss()(token_batch(s, tt, (3, 3), (2, 2)))
    assert got.item() == pytest.approx(np_one_minus_cos(pooled, tt).mean(), rel=1e-5)


def test_token_attention_matching_without_grid():
    s = RNG.normal(size=(1, 3, 2))
    tt = RNG.normal(size=(1, 2, 2))
    scores = tt[0] @ s[0].T / math.sqrt(2)
    attn = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    expected = np_one_minus_cos(attn @ s[0], tt[0]).mean()
    got = identity_token_loss(2)(token_batch(s, tt, (1, 3), None))  # teacher top-k tokens: no grid
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_token_text_padding_is_ignored_positional_and_attention():
    s = RNG.normal(size=(2, 4, 3))
    tt = RNG.normal(size=(2, 4, 3))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)
    loss = identity_token_loss()
    expected = np_one_minus_cos(s, tt)[mask].mean()
    assert loss(token_batch(s_txt=s, s_mask=mask, t_txt=tt, t_mask=mask)).item() == pytest.approx(expected, rel=1e-5)
    t_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)  # another tokeniser -> attention
    s_pad, t_pad = s.copy(), tt.copy()
    s_pad[~mask], t_pad[~t_mask] = 1e4, -1e4
    st = torch.tensor(s_pad, dtype=torch.float32, requires_grad=True)
    b = token_batch(s_txt=s_pad, s_mask=mask, t_txt=t_pad, t_mask=t_mask)
    b.s_txt.tokens = st
    got = loss(b)
    ref = loss(token_batch(s_txt=s, s_mask=mask, t_txt=tt, t_mask=t_mask))
    assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), rel=1e-6)
    got.backward()
    assert torch.all(st.grad[torch.tensor(~mask)] == 0) and st.grad[torch.tensor(mask)].abs().sum() > 0
    # hand value of the attention path for row 0: 3 real student tokens, 2 real teacher tokens
    rows = []
    for i in range(2):
        ks, qs = s[i][mask[i]], tt[i][t_mask[i]]
        sc = qs @ ks.T / math.sqrt(3)
        a = np.exp(sc) / np.exp(sc).sum(1, keepdims=True)
        rows.append(np_one_minus_cos(a @ ks, qs))
    assert got.item() == pytest.approx(np.concatenate(rows).mean(), rel=1e-5)


def test_token_text_positional_across_padding_lengths():
    """Same tokeniser, different context lengths: trimmed to the common length and matched by position."""
    s = RNG.normal(size=(2, 6, 3))
    tt = RNG.normal(size=(2, 4, 3))
    s_mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=bool)
    t_mask = s_mask[:, :4]
    expected = np_one_minus_cos(s[:, :4], tt)[t_mask].mean()
    for match in ("auto", "position"):
        got = identity_token_loss(text_match=match)(token_batch(s_txt=s, s_mask=s_mask, t_txt=tt, t_mask=t_mask))
        assert got.item() == pytest.approx(expected, rel=1e-5), match
    # teacher longer than student: the same
    got = identity_token_loss()(token_batch(s_txt=tt, s_mask=t_mask, t_txt=s, t_mask=s_mask))
    assert got.item() == pytest.approx(np_one_minus_cos(tt, s[:, :4])[t_mask].mean(), rel=1e-5)
    # attention matching gives another value: the auto path really matched by position
    att = identity_token_loss(text_match="attention")(token_batch(s_txt=s, s_mask=s_mask, t_txt=tt, t_mask=t_mask))
    assert abs(att.item() - expected) > 1e-3


def test_token_text_disagreeing_tokenisers_use_attention():
    s = RNG.normal(size=(2, 6, 3))
    tt = RNG.normal(size=(2, 4, 3))
    s_mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=bool)  # real tokens beyond length 4
    t_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
    other = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=bool)  # fits, but masks differ
    for sm in (s_mask, other):
        b = token_batch(s_txt=s, s_mask=sm, t_txt=tt, t_mask=t_mask)
        auto = identity_token_loss()(b)
        att = identity_token_loss(text_match="attention")(b)
        assert auto.item() == pytest.approx(att.item(), rel=1e-6)
        with pytest.raises(ValueError, match="cannot be matched by position"):
            identity_token_loss(text_match="position")(b)


def test_token_missing_teacher_tokens_gives_zero_with_graph():
    loss = identity_token_loss()
    out = loss(token_batch(s_tokens=RNG.normal(size=(2, 4, 3)), s_grid=(2, 2)))
    assert out.item() == 0.0
    out.backward()
    assert torch.all(loss.img_proj.weight.grad == 0)


def test_token_projection_maps_widths_and_rejects_bad_grid():
    loss = create_loss("token", dims(si=5, ti=3, st=4, tt=6))
    assert tuple(loss.img_proj.weight.shape) == (3, 5) and tuple(loss.txt_proj.weight.shape) == (6, 4)
    with pytest.raises(ValueError, match="grids"):
        loss(token_batch(RNG.normal(size=(1, 6, 5)), RNG.normal(size=(1, 4, 3)), (2, 2), (2, 2)))


# ---------------------------------------------------------------- DDP gather (2 gloo processes)
def _two_queue_steps(loss, b1: DistillBatch, b2: DistillBatch, queue: TeacherQueue) -> float:
    """Step 1 fills the queue with the (gathered) teacher rows of b1, step 2 reads it."""
    from distill.losses.common import gather_pairs

    loss(queued(b1, queue))
    g = gather_pairs(b1.teacher.image.embed, b1.teacher.text.embed, b1.image_ids, True)
    queue.push(g.img, g.txt, g.ids)
    queue.commit()
    return loss(queued(b2, queue)).item()


def _gather_worker(rank: int, tmp: str, data: dict) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        rows = slice(2 * rank, 2 * rank + 2)
        b = make_batch(*(data[k][rows] for k in ("s_img", "s_txt", "t_img", "t_txt")), ids=data["ids"][rows].tolist(),
                       student_log_scale=math.log(20.0), step=3, total=10)
        b2 = make_batch(*(data[k][rows][::-1].copy() for k in ("s_img", "s_txt", "t_img", "t_txt")),
                        ids=[10 + i for i in data["ids"][rows][::-1].tolist()])
        out = {name: create_loss(name, dims(), **cfg)(b).item()
               for name, cfg in (("student_clip", {}), ("mac", {}))}
        queue = TeacherQueue(6, 2)
        out["contrastive_distill"] = _two_queue_steps(create_loss("contrastive_distill", dims(), queue_size=6), b, b2, queue)
        out["queue_ids"] = queue.ids.tolist()
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_gather_over_two_ranks_equals_full_batch(tmp_path):
    import json

    import torch.multiprocessing as mp

    data = {k: rand_unit(4, 2) for k in ("s_img", "s_txt", "t_img", "t_txt")}
    data["ids"] = np.array([0, 1, 1, 2])
    full = make_batch(data["s_img"], data["s_txt"], data["t_img"], data["t_txt"], ids=data["ids"].tolist(),
                      student_log_scale=math.log(20.0), step=3, total=10)
    expected = {name: create_loss(name, dims())(full).item() for name in ("student_clip", "mac")}
    # the same two queue steps in one process: rank r's second batch is its rows reversed
    rev = [1, 0, 3, 2]
    full2 = make_batch(*(data[k][rev] for k in ("s_img", "s_txt", "t_img", "t_txt")),
                       ids=[10 + i for i in data["ids"][rev].tolist()])
    expected["contrastive_distill"] = _two_queue_steps(create_loss("contrastive_distill", dims(), queue_size=6), full,
                                                       full2, TeacherQueue(6, 2))
    mp.start_processes(_gather_worker, args=(str(tmp_path), data), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, value in expected.items():
        assert (results[0][name] + results[1][name]) / 2 == pytest.approx(value, rel=1e-5), name
    assert results[0]["queue_ids"] == results[1]["queue_ids"] == [0, 1, 1, 2, -1, -1]


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_fp32_finite_and_differentiable_under_autocast(name):
    d = dims(ds=4, dt=6, si=5, st=3, ti=7, tt=2)
    s_img = torch.tensor(rand_unit(4, 4), dtype=torch.bfloat16, requires_grad=True)
    b = make_batch(rand_unit(4, 4), rand_unit(4, 4), rand_unit(4, 6), rand_unit(4, 6), ids=[0, 0, 1, 2],
                   s_img_feats={"tokens": t(RNG.normal(size=(4, 9, 5))).bfloat16(), "grid": (3, 3)},
                   s_txt_feats={"tokens": t(RNG.normal(size=(4, 5, 3))), "mask": torch.arange(5) < torch.tensor([[5], [3], [2], [4]])},
                   t_img_feats={"tokens": t(RNG.normal(size=(4, 4, 7))), "grid": (2, 2)},
                   t_txt_feats={"tokens": t(RNG.normal(size=(4, 6, 2))),
                                "mask": torch.arange(6) < torch.tensor([[6], [2], [3], [4]])})
    b.s_img.embed = s_img
    tokens = [f.tokens.detach().requires_grad_(True) for f in (b.s_img, b.s_txt)]
    b.s_img.tokens, b.s_txt.tokens = tokens
    queue = TeacherQueue(5, 6)
    queue.push(t(rand_unit(3, 6)), t(rand_unit(3, 6)), torch.tensor([0, 7, 8]))
    queue.commit()
    b.queue = queue.view()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = create_loss(name, d)(EmbedProjections(4, 6).attach(b))
    assert out.dtype == torch.float32 and out.dim() == 0 and torch.isfinite(out)
    out.backward()
    grads = [x.grad for x in (s_img, *tokens) if x.grad is not None]  # embedding- or token-level losses
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- caption-mean target from the loader
def test_loader_serves_the_caption_mean_of_all_captions(tiny):
    from distill.core.cache.reader import TeacherCache
    from distill.pipeline.train.data import fetch_teacher

    _, cache_dir = tiny
    cache = TeacherCache(cache_dir)
    images = np.array([3, 0, 3, 5])
    caption = cache.offsets[images] + 1
    teacher = fetch_teacher(cache, images, caption, np.zeros_like(images), keep_fp16=True)
    for row, i in enumerate(images):
        caps = cache.texts(np.arange(cache.offsets[i], cache.offsets[i + 1])).embed
        assert len(caps) == 2
        expected = torch.nn.functional.normalize(caps.mean(0), dim=0)
        torch.testing.assert_close(teacher.text_embed_mean[row], expected, rtol=1e-5, atol=1e-6)
    assert teacher.text_embed_mean.dtype == torch.float32
    # the sampled caption's own embedding differs from the mean
    assert not torch.allclose(teacher.text_embed_mean, teacher.text.embed.float())


# ---------------------------------------------------------------- the distiller's shared projections and queue
def test_distiller_owns_one_projection_per_modality_and_one_queue():
    from distill.distiller import build_distiller
    from students import create_student

    torch.manual_seed(0)
    student = create_student("vit", embed_dim=16, vision_width=32, vision_layers=1, vision_heads=2, image_size=32,
                            patch_size=8, text_width=32, text_layers=1, text_heads=2, context_length=16)
    d = Dims(16, 24, student.image_token_dim, student.text_token_dim, 8, 8)
    cfg = [{"name": "contrastive_distill", "cfg": {"queue_size": 8}}, {"name": "relation_kl", "cfg": {"queue_size": 4}},
           {"name": "cosine"}, {"name": "student_clip"}]
    distiller = build_distiller(student, d, [{"losses": cfg, "balancer": {"name": "fixed", "cfg": {}}}])
    assert set(distiller.projections.linear_maps()) == {"image", "text"} and distiller.queue.size == 8
    assert all(len(list(loss.parameters())) == 0 for loss in distiller.stages[0].losses.values())
    assert not any(n.startswith("queue.") for n in distiller.rollback_buffers())
    pixels = torch.randn(3, 3, 32, 32)
    text = student.tokenize(["a dog", "a cat", "the sea"])
    teacher = TeacherTargets(ImageFeatures(t(rand_unit(3, 24))), TextFeatures(t(rand_unit(3, 24))))
    out = distiller(pixels, text, teacher, torch.tensor([0, 1, 2]))
    assert distiller.queue.pending_rows() == 3 and int(distiller.queue.filled) == 0  # written only at commit
    out.total.backward()
    for name in ("image", "text"):
        assert distiller.projections.linear_maps()[name].weight.grad.abs().sum() > 0
    distiller.commit_queues()
    assert distiller.queue.ids.tolist()[:3] == [0, 1, 2] and distiller.queue.pending_rows() == 0
    distiller.eval()
    with torch.no_grad():
        distiller(pixels, text, teacher, torch.tensor([3, 4, 5]))
    assert distiller.queue.pending_rows() == 0  # evaluation forwards never enqueue
    only_token = build_distiller(student, d, [{"losses": [{"name": "token"}], "balancer": {"name": "fixed", "cfg": {}}}])
    assert only_token.projections is None and only_token.queue is None
