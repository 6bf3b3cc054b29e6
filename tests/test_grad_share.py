"""Per-term gradient shares (train.grad_share_every): exact on a linear model, logged by the loop."""
from __future__ import annotations

import pytest
import torch

from distill.pipeline.train.grad_share import grad_shares


def test_grad_shares_are_the_signed_parts_of_the_balanced_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    losses = {"a": (w * torch.tensor([3.0, 0.0])).sum(), "b": (w * torch.tensor([-1.0, 4.0])).sum(),
              "c": torch.tensor(5.0)}  # no gradient: not reported
    total = 2.0 * losses["a"] + 0.5 * losses["b"] + losses["c"]
    out = grad_shares(total, losses, [w])
    g_a, g_b = torch.tensor([6.0, 0.0]), torch.tensor([-0.5, 2.0])  # coefficient x gradient
    g = g_a + g_b
    assert set(out) == {"grad_share/a", "grad_share/b", "grad_norm/a", "grad_norm/b"}
    assert out["grad_share/a"].item() == pytest.approx(float(g_a @ g / (g @ g)))
    assert out["grad_share/a"].item() + out["grad_share/b"].item() == pytest.approx(1.0)
    assert out["grad_norm/b"].item() == pytest.approx(float(g_b.norm()))
    total.backward()  # the graph is kept for the step's own backward
    assert w.grad.tolist() == pytest.approx(g.tolist())


def test_the_loop_logs_grad_shares_on_the_measured_steps_only(tiny, tmp_path):
    from tests.helpers.training import first_step

    _, fields = first_step(tiny, tmp_path, "train.grad_share_every=1")
    shares = {k: float(v) for k, v in fields.items() if k.startswith("grad_share/")}
    terms = {k.split("/", 1)[1] for k in fields if k.startswith("loss/")}
    assert shares and {k.split("/", 1)[1] for k in shares} <= terms  # every term with a gradient
    assert "grad_share/student_clip" in shares and "grad_share/contrastive_distill" in shares
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
    _, plain = first_step(tiny, tmp_path / "off", "train.grad_share_every=2")  # step 0 is not a multiple
    assert not any(k.startswith("grad_share/") for k in plain)


def test_max_views_limits_the_views_a_run_samples(tiny):
    from distill.core.cache.reader import TeacherCache
    from distill.core.data.factory import load_dataset
    from distill.core.errors import ConfigError
    from distill.pipeline.train.data import DistillTrainSet

    tsv, cache_dir = tiny
    cache, ds = TeacherCache(cache_dir), load_dataset(str(tsv))
    assert DistillTrainSet(ds, cache, lambda im: im, 0).num_views == 2
    assert DistillTrainSet(ds, cache, lambda im: im, 0, max_views=1).num_views == 1
    with pytest.raises(ConfigError, match="data.max_views=3 but the cache"):
        DistillTrainSet(ds, cache, lambda im: im, 0, max_views=3)


def test_a_training_step_with_gradient_norm_references(tiny, tmp_path):
    from tests.helpers.training import first_step

    run, fields = first_step(tiny, tmp_path, "balancer.cfg.scale=grad", "train.grad_share_every=1")
    balancer = run.distiller.stage_at(0).balancer
    assert balancer.scale == "grad" and (balancer.references() != 1).all()  # gradient norms, measured
    assert torch.isfinite(torch.as_tensor(float(fields["total"])))
    shares = [float(v) for k, v in fields.items() if k.startswith("grad_share/")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-4)
