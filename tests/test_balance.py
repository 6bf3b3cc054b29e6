"""Loss balancers: dynamic (scale-invariant, rate-driven, floors/cap), dsmd (the released DSMD formula),
fixed, uncertainty, GradNorm."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from distill.balance import BALANCERS, create_balancer
from distill.core.errors import CheckpointError, ConfigError


def L(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("name", BALANCERS.names())
def test_every_registered_balancer_keeps_the_contract(name):
    """Every balancer (driven by the registry, so a new one is checked too): weights for exactly the
    configured terms, a finite total whose gradient reaches the losses, weight 0 for a NaN term with
    a finite total, options discoverable, and a state_dict that resumes to the same next weights."""
    known, required, _ = BALANCERS.options(name)
    assert not required, f"{name}: every option needs a default (a config may give none)"
    shared = torch.nn.Parameter(torch.tensor(1.0))

    def terms(a: float, b: float) -> dict[str, torch.Tensor]:
        return {"a": shared * a, "b": shared * b}

    bal = create_balancer(name, ["a", "b"])
    for a, b in ((2.0, 1.0), (1.5, 0.9), (1.2, 0.8)):
        bal.begin_step()
        total, w = bal(terms(a, b), [shared])
        bal.end_step(True)
        assert set(w) == {"a", "b"} and all(np.isfinite(v) and v >= 0 for v in w.values())
        assert torch.isfinite(total)
    shared.grad = None
    total.backward()
    assert shared.grad is not None and torch.isfinite(shared.grad)
    bal.begin_step()
    total, w = bal(terms(float("nan"), 1.0), [shared])
    bal.end_step(False)
    assert w["a"] == 0.0 and torch.isfinite(total)
    again = create_balancer(name, ["a", "b"])
    again.load_state_dict(copy.deepcopy(bal.state_dict()))
    for b in (bal, again):
        b.begin_step()
    assert bal(terms(1.1, 0.7), [shared])[1] == again(terms(1.1, 0.7), [shared])[1]


# ---------------------------------------------------------------- dsmd (the former dynamic)
def test_dsmd_magnitude_normalisation_first_step():
    bal = create_balancer("dsmd", ["a", "b"])
    total, w = bal(L(a=4.0, b=1.0))
    # m = [1, 4], rates = 1 -> d = [1, 1]; normalised to sum 2 -> [0.4, 1.6]; weighted terms are equal
    assert w["a"] == pytest.approx(0.4) and w["b"] == pytest.approx(1.6)
    assert total.item() == pytest.approx(0.4 * 4 + 1.6 * 1)


def test_dsmd_rates_use_raw_losses_and_slower_descent_gets_more_weight():
    bal = create_balancer("dsmd", ["fast", "slow"], beta=0.0)
    # "fast" halves every step, "slow" shrinks by 10%; magnitudes differ by 100x
    for step in range(3):
        rates = bal.descent_rates().tolist()  # the rates this step will use
        if step < 2:
            assert rates == [1.0, 1.0]  # the first two steps have no two-step history
        bal(L(fast=100.0 * 0.5**step, slow=1.0 * 0.9**step))
    # rates from the raw history L(t-1)/L(t-2); on magnitude-normalised losses both would be 1
    rates = bal.descent_rates().tolist()
    assert rates == pytest.approx([0.25 / 0.5, 0.81 / 0.9])
    assert rates[0] != pytest.approx(rates[1])
    # next step with equal current losses: m = [1, 1] so the weights are exactly the DWA part
    _, w = bal(L(fast=1.0, slow=1.0))
    d = 2 * np_softmax(np.array([0.5, 0.9]) / 2.0)
    assert [w["fast"], w["slow"]] == pytest.approx(d.tolist())
    assert w["slow"] > w["fast"]


def test_dsmd_combines_magnitude_and_rate():
    bal = create_balancer("dsmd", ["a", "b"], beta=0.0, temperature=1.0)
    for la, lb in ((8.0, 2.0), (4.0, 1.8)):
        bal(L(a=la, b=lb))
    _, w = bal(L(a=2.0, b=1.0))
    r = np.array([4.0 / 8.0, 1.8 / 2.0])
    raw = np.array([2.0 / 2.0, 2.0 / 1.0]) * 2 * np_softmax(r)
    assert [w["a"], w["b"]] == pytest.approx((raw * 2 / raw.sum()).tolist())


def test_dsmd_ema_smoothing():
    bal = create_balancer("dsmd", ["a", "b"])  # beta 0.9
    bal(L(a=4.0, b=1.0))  # target [0.4, 1.6] initialises the EMA
    _, w = bal(L(a=1.0, b=1.0))  # target [1, 1] (rates still 1)
    assert [w["a"], w["b"]] == pytest.approx([0.9 * 0.4 + 0.1, 0.9 * 1.6 + 0.1])


def test_dsmd_zero_and_nan_losses_get_zero_weight_and_state_stays_finite():
    bal = create_balancer("dsmd", ["a", "b", "c"])
    bal(L(a=2.0, b=1.0, c=3.0))
    before = {k: v.clone() for k, v in bal.state_dict().items()}
    total, w = bal(L(a=float("nan"), b=1.0, c=0.0))
    assert w["a"] == 0.0 and w["c"] == 0.0 and math.isfinite(w["b"]) and w["b"] > 0
    assert torch.isfinite(total)
    total.backward()
    for name in ("prev1", "prev2", "ema"):
        state = getattr(bal, name)
        assert torch.isfinite(state).all()
        assert state[0] == before[name][0] and state[2] == before[name][2]  # untouched for a and c
    total, w = bal(L(a=float("inf"), b=float("nan"), c=-1.0))
    assert all(v == 0.0 for v in w.values()) and total.item() == 0.0
    total.backward()
    _, w = bal(L(a=2.0, b=1.0, c=3.0))
    assert all(math.isfinite(v) and v > 0 for v in w.values())


def test_dsmd_min_max_clamp():
    bal = create_balancer("dsmd", ["a", "b"], min_weight=0.5, max_weight=1.2)
    _, w = bal(L(a=4.0, b=1.0))  # unclamped [0.4, 1.6]
    assert (w["a"], w["b"]) == (0.5, 1.2)


def test_dsmd_state_dict_round_trip_gives_identical_next_weights():
    bal = create_balancer("dsmd", ["a", "b", "c"])
    for step in range(4):
        bal(L(a=3.0 / (step + 1), b=1.0 + 0.1 * step, c=0.5 * 0.8**step))
    restored = create_balancer("dsmd", ["a", "b", "c"])
    restored.load_state_dict(bal.state_dict())
    nxt = L(a=0.7, b=1.3, c=0.2)
    assert bal(nxt)[1] == restored(nxt)[1]


@pytest.mark.parametrize("name", ["dynamic", "dsmd"])
def test_balancer_rejects_unknown_terms(name):
    with pytest.raises(KeyError, match="missing \\['b'\\]"):
        create_balancer(name, ["a", "b"])(L(a=1.0))


# ---------------------------------------------------------------- dynamic
RETRIEVAL = ["contrastive_distill", "student_clip"]


def np_dynamic_weights(history: np.ndarray, temperature: float = 0.5, beta_fast: float = 0.9,
                       beta_slow: float = 0.99) -> np.ndarray:
    """Oracle for the weights after feeding the rows of ``history`` [steps, K] (all valid, no active
    floor or cap): bias-corrected fast/slow EMAs of log L, r = exp(fast - slow), w = K * softmax(r / T)."""
    n, history = len(history), np.log(history)
    fast = sum((1 - beta_fast) * beta_fast ** (n - 1 - t) * history[t] for t in range(n)) / (1 - beta_fast**n)
    slow = sum((1 - beta_slow) * beta_slow ** (n - 1 - t) * history[t] for t in range(n)) / (1 - beta_slow**n)
    return history.shape[1] * np_softmax(np.exp(fast - slow) / temperature)


def test_dynamic_warmup_uses_priors_and_normalises_by_the_reference():
    bal = create_balancer("dynamic", ["a", "b", "c"], ref_steps=3, priors={"a": 2.0})
    losses = L(a=8.0, b=0.5, c=2.0)
    total, w = bal(losses)
    assert [w["a"], w["b"], w["c"]] == pytest.approx([1.5, 0.75, 0.75])  # priors [2, 1, 1], mean 1
    assert total.item() == pytest.approx(3.0)  # every term is at its reference on the first step
    total.backward()
    # the raw loss is multiplied by w_i / ref_i
    assert [losses[k].grad.item() for k in "abc"] == pytest.approx([1.5 / 8.0, 0.75 / 0.5, 0.75 / 2.0])
    for a in (4.0, 6.0):
        _, w = bal(L(a=a, b=0.5, c=2.0))
        assert [w["a"], w["b"], w["c"]] == pytest.approx([1.5, 0.75, 0.75])  # still warming up
    assert bal.references().tolist() == pytest.approx([6.0, 0.5, 2.0])  # mean of the first 3 values
    bal(L(a=100.0, b=9.0, c=9.0))
    assert bal.references().tolist() == pytest.approx([6.0, 0.5, 2.0])  # frozen after ref_steps


def test_dynamic_weights_are_the_rate_softmax():
    rng = np.random.default_rng(0)
    steps = np.arange(40)
    history = np.stack([3.0 * 0.97**steps, 0.2 + 0.0 * steps, 1.0 / (1 + 0.1 * steps)], axis=1)
    history *= 1 + 0.05 * rng.standard_normal(history.shape)
    bal = create_balancer("dynamic", ["a", "b", "c"], cap=math.inf)  # no floors on these names
    for row in history:
        total, w = bal(L(a=row[0], b=row[1], c=row[2]))
    expected = np_dynamic_weights(history)
    assert [w["a"], w["b"], w["c"]] == pytest.approx(expected.tolist(), rel=1e-9)
    refs = history[:20].mean(axis=0)
    assert total.item() == pytest.approx(float((expected * history[-1] / refs).sum()), rel=1e-6)
    assert w["b"] == max(w.values())  # the flat term


def test_dynamic_plateaued_term_gains_weight():
    rng = np.random.default_rng(1)
    bal = create_balancer("dynamic", ["steady", "stalls"])
    trace = []
    for t in range(400):
        noise = 1 + 0.05 * rng.standard_normal(2)
        stalls = 0.97 ** min(t, 100)  # descends like "steady" (~10x faster at first), then plateaus
        _, w = bal(L(steady=2.0 * 0.995**t * noise[0], stalls=5.0 * stalls * noise[1]))
        trace.append(w["stalls"])
    assert max(trace[60:100]) < 0.7  # while it descends faster than "steady" it gets less weight
    assert min(trace[250:]) > 1.0  # once plateaued it gets more than the still descending term
    assert trace[399] > 1.2 and trace[399] > trace[99] * 2


def test_dynamic_scale_invariance():
    """Multiplying one loss by 100 changes neither the weights nor the gradient of the total."""
    theta = torch.nn.Parameter(torch.tensor([1.0, -0.5, 2.0]))
    names = ["contrastive_distill", "feature_l1", "triplet"]
    plain, scaled = create_balancer("dynamic", names), create_balancer("dynamic", names)
    rng = np.random.default_rng(2)
    for t in range(80):
        point = torch.tensor([1.0, -0.5, 2.0]) * 0.98**t + torch.from_numpy(0.05 * rng.standard_normal(3)).float()
        with torch.no_grad():
            theta.copy_(point)
        terms = {"contrastive_distill": (theta**2).sum() + 1.0, "feature_l1": theta.abs().sum(),
                 "triplet": torch.relu(theta[0] - theta[1] + 0.5)}
        grads, weights = [], []
        for bal, factor in ((plain, 1.0), (scaled, 100.0)):
            losses = dict(terms, feature_l1=terms["feature_l1"] * factor)
            total, w = bal(losses)
            (g,) = torch.autograd.grad(total, [theta], retain_graph=True)
            grads.append(g)
            weights.append(w)
        assert weights[1] == pytest.approx(weights[0], rel=1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_dynamic_term_heading_to_zero_does_not_take_the_budget():
    rng = np.random.default_rng(3)
    names = RETRIEVAL + ["feature_l1", "triplet"]
    bal, old = create_balancer("dynamic", names), create_balancer("dsmd", names)
    shares = []
    for t in range(600):
        noise = 1 + 0.05 * rng.standard_normal(4)
        losses = {"contrastive_distill": 6.0 * (0.3 + 0.7 * 0.995**t) * noise[0],
                  "student_clip": 4.0 * (0.4 + 0.6 * 0.997**t) * noise[1],
                  "feature_l1": 0.5 * 0.98**t * noise[2],  # heading to zero
                  # a hinge: heads to zero, then sits near it (exact zeros on some steps)
                  "triplet": max(0.2 * 0.97**t * noise[3] - 1e-4 * (t > 300) * (rng.random() < 0.5), 0.0)}
        total, w = bal(L(**losses))
        _, w_old = old(L(**losses))
        valid = [n for n in names if losses[n] > 0]
        assert all(w[n] <= 3.0 + 1e-12 for n in names)
        assert all(w[n] >= 0.5 - 1e-12 for n in RETRIEVAL)
        assert sum(w[n] for n in valid) == pytest.approx(len(valid))
        refs = dict(zip(names, bal.references().tolist()))
        terms = {n: w[n] * losses[n] / refs[n] for n in names}
        assert total.item() == pytest.approx(sum(terms.values()), rel=1e-5)
        shares.append(terms["feature_l1"] / sum(terms.values()))
    # the vanishing term's share of the weighted total shrinks instead of growing ...
    assert shares[-1] < 1e-3 and max(shares[100:]) < shares[25]
    # ... whereas dsmd (weights ~ 1 / L) hands it the largest weight
    assert w_old["feature_l1"] > 100 * w_old["contrastive_distill"]


def test_dynamic_floors_and_cap_are_respected_exactly():
    bal = create_balancer("dynamic", ["a", "b", "c"], priors={"a": 100.0}, cap=2.0, floors={"b": 0.8})
    _, w = bal(L(a=1.0, b=1.0, c=1.0))
    # raw [100, 1, 1] on a budget of 3: a capped at 2, the remaining 1 split equally would give b 0.5 < 0.8
    assert [w["a"], w["b"], w["c"]] == pytest.approx([2.0, 0.8, 0.2])
    # a skipped term frees its share of the budget: K' = 2
    _, w = bal(L(a=1.0, b=float("nan"), c=1.0))
    assert [w["a"], w["b"], w["c"]] == pytest.approx([200 / 101, 0.0, 2 / 101])  # a below the cap now
    _, w = bal(L(a=float("nan"), b=1.0, c=1.0))
    assert [w["a"], w["b"], w["c"]] == pytest.approx([0.0, 1.0, 1.0])


def test_dynamic_default_floors_on_the_retrieval_terms():
    assert create_balancer("dynamic", RETRIEVAL + ["x"]).floors == [0.5, 0.5, 0.0]
    assert create_balancer("dynamic", ["x", "student_clip"], floors={"student_clip": 0.0}).floors == [0.0, 0.0]
    assert create_balancer("dynamic", RETRIEVAL, floors={"student_clip": 0.9}).floors == [0.5, 0.9]
    assert create_balancer("dynamic", ["x", "y"]).floors == [0.0, 0.0]


@pytest.mark.parametrize("seed", range(20))
def test_fit_to_budget_matches_bisection(seed):
    from distill.balance.dynamic import fit_to_budget

    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 8))
    raw = np.exp(rng.normal(0, 3, k))
    lo = np.where(rng.random(k) < 0.5, rng.uniform(0, 1.0, k), 0.0)
    hi = np.maximum(np.where(rng.random(k) < 0.5, rng.uniform(1.0, 3.0, k), k), lo)
    w = np.array(fit_to_budget(raw.tolist(), lo.tolist(), hi.tolist(), float(k)))
    a, b = 0.0, 1e30
    for _ in range(3000):
        mid = (a + b) / 2
        a, b = (mid, b) if np.clip(mid * raw, lo, hi).sum() < k else (a, mid)
    assert w.sum() == pytest.approx(k) and (w >= lo - 1e-12).all() and (w <= hi + 1e-12).all()
    np.testing.assert_allclose(w, np.clip(b * raw, lo, hi), rtol=1e-9, atol=1e-12)


def test_dynamic_zero_and_nan_losses_get_zero_weight_and_leave_state_untouched():
    bal = create_balancer("dynamic", ["a", "b", "c"], ref_steps=5)
    for _ in range(3):
        bal(L(a=2.0, b=1.0, c=3.0))
    before = {k: v.clone() for k, v in bal.state_dict().items()}
    total, w = bal(L(a=float("nan"), b=0.5, c=0.0))
    assert w["a"] == 0.0 and w["c"] == 0.0 and w["b"] == 1.0  # the one valid term gets the whole budget
    assert total.item() == pytest.approx(0.5 / 0.875)  # 1 * 0.5 / ref mean(1, 1, 1, 0.5)
    total.backward()
    for name, old in before.items():
        new = bal.state_dict()[name]
        assert torch.isfinite(new).all()
        assert new[0] == old[0] and new[2] == old[2] and new[1] != old[1]
    total, w = bal(L(a=float("inf"), b=float("nan"), c=-1.0))
    assert all(v == 0.0 for v in w.values()) and total.item() == 0.0
    total.backward()
    _, w = bal(L(a=2.0, b=1.0, c=3.0))
    assert all(math.isfinite(v) and v > 0 for v in w.values())


def test_dynamic_ref_after_tracks_the_transient_then_freezes_the_reference_window():
    bal = create_balancer("dynamic", ["a", "b"], ref_steps=2, ref_after=3)
    for a, ref in ((1.0, 1.0), (3.0, 2.0), (8.0, 4.0)):  # provisional: the mean of every value so far
        bal(L(a=a, b=1.0))
        assert bal.references()[0].item() == pytest.approx(ref)
    for a in (5.0, 7.0):  # values 4 and 5: the reference window
        _, w = bal(L(a=a, b=1.0))
        assert w == pytest.approx({"a": 1.0, "b": 1.0})  # no rates before the window is complete
    assert bal.references().tolist() == pytest.approx([6.0, 1.0])
    bal(L(a=100.0, b=9.0))
    assert bal.references().tolist() == pytest.approx([6.0, 1.0])  # frozen


def test_dynamic_grad_scale_equalises_the_terms_gradients_on_the_shared_parameters():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    bal = create_balancer("dynamic", ["margin", "xent"], scale="grad", ref_steps=1)
    assert bal.uses_loss_scale  # measured on the GradScaler-scaled loss, like GradNorm

    def losses():  # a small loss with a large gradient, a large one with a small gradient
        return {"margin": 0.2 + (w * torch.tensor([3.0, 0.0, 0.0])).sum() - 3.0,
                "xent": 9.0 + (w * torch.tensor([0.0, 0.1, 0.0])).sum() + 0.2}

    bal(losses(), [w])  # reference: the first gradient norms, 3.0 and 0.1
    assert bal.references().tolist() == pytest.approx([3.0, 0.1])
    total, weights = bal(losses(), [w])
    total.backward()
    # each term's gradient is its weight times one reference norm: equal shares, not 15:1
    assert weights == pytest.approx({"margin": 1.0, "xent": 1.0})
    assert w.grad.tolist() == pytest.approx([1.0, 1.0, 0.0])
    with pytest.raises(ConfigError, match="shared parameters"):
        create_balancer("dynamic", ["a"], scale="grad")({"a": torch.tensor(1.0, requires_grad=True)})


def test_dynamic_resumes_a_state_written_before_ref_after():
    bal = create_balancer("dynamic", ["a", "b"], ref_steps=3)
    for a in (4.0, 2.0):
        bal(L(a=a, b=1.0))
    state = {k: v for k, v in bal.state_dict().items() if k != "all_sum"}
    restored = create_balancer("dynamic", ["a", "b"], ref_steps=3)
    restored.load_state_dict(state)
    assert restored.references().tolist() == pytest.approx([3.0, 1.0])
    with pytest.raises(CheckpointError, match="ref_after"):
        create_balancer("dynamic", ["a", "b"], ref_steps=3, ref_after=5).load_state_dict(state)


def test_dynamic_state_dict_round_trip_gives_identical_next_weights():
    rng = np.random.default_rng(4)
    names = RETRIEVAL + ["feature_l1"]
    bal = create_balancer("dynamic", names, ref_steps=5)
    for step in range(30):
        v = (1 + 0.1 * rng.standard_normal(3)) * np.array([3.0 / (step + 1), 1.0 + 0.1 * step, 0.5 * 0.8**step])
        bal(L(**dict(zip(names, v.tolist()))))
    state = bal.state_dict()
    assert all(t.dtype == torch.float64 for t in state.values())
    restored = create_balancer("dynamic", names, ref_steps=5)
    restored.load_state_dict(state)
    for v in ((0.7, 1.3, 0.2), (0.6, 1.2, 0.1)):
        nxt = L(**dict(zip(names, v)))
        (t1, w1), (t2, w2) = bal(nxt), restored(nxt)
        assert w1 == w2 and t1.item() == t2.item()


def test_dynamic_refuses_a_dsmd_state_with_a_clear_error():
    from distill.core.errors import CheckpointError

    old = create_balancer("dsmd", ["a", "b"])
    old(L(a=1.0, b=2.0))
    with pytest.raises(CheckpointError, match="balancer.name=dsmd"):
        create_balancer("dynamic", ["a", "b"]).load_state_dict(old.state_dict())


@pytest.mark.parametrize("cfg, key", [
    ({"floors": {"student_clip": -0.1}}, "floors.student_clip"),
    ({"floors": {"nope": 0.5}}, "floors.nope"),
    ({"floors": {"student_clip": 2.0}, "cap": 1.5}, "floors.student_clip"),
    ({"floors": {"student_clip": 2.0, "triplet": 1.5}}, "floors add up"),
    ({"floors": [0.5]}, "floors"),
    ({"priors": {"triplet": 0}}, "priors.triplet"),
    ({"priors": {"zzz": 1.0}}, "priors.zzz"),
    ({"cap": 0.5}, "cap"),
    ({"cap": "3"}, "cap"),
    ({"temperature": 0}, "temperature"),
    ({"beta_fast": 1.0}, "beta_fast"),
    ({"beta_fast": 0.99, "beta_slow": 0.9}, "beta_slow"),
    ({"ref_steps": 0}, "ref_steps"),
    ({"ref_steps": 2.5}, "ref_steps"),
    ({"ref_after": -1}, "ref_after"),
    ({"scale": "loss"}, "scale"),
    ({"min_weight": 0.1}, "min_weight"),
])
def test_dynamic_bad_config_names_the_key(cfg, key):
    with pytest.raises(ValueError, match=f"balancer.cfg.{key}" if "add up" not in key else key):
        create_balancer("dynamic", ["student_clip", "triplet"], **cfg)


# ---------------------------------------------------------------- fixed / uncertainty
def test_fixed_weights_and_nan_term_skipped():
    bal = create_balancer("fixed", ["a", "b"], weights={"b": 0.5})
    total, w = bal(L(a=2.0, b=4.0))
    assert w == {"a": 1.0, "b": 0.5} and total.item() == pytest.approx(4.0)
    total, w = bal(L(a=float("nan"), b=4.0))
    assert w == {"a": 0.0, "b": 0.5} and total.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown terms \\['z'\\]"):
        create_balancer("fixed", ["a"], weights={"z": 1.0})


def test_uncertainty_total_and_gradients():
    bal = create_balancer("uncertainty", ["a", "b"])
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.5, -1.0]))
    total, w = bal(L(a=2.0, b=3.0))
    assert total.item() == pytest.approx(math.exp(-0.5) * 2 + 0.5 + math.exp(1.0) * 3 - 1.0, rel=1e-6)
    assert w["a"] == pytest.approx(math.exp(-0.5)) and w["b"] == pytest.approx(math.exp(1.0))
    total.backward()
    # d/ds (e^-s L + s) = 1 - e^-s L
    assert bal.log_vars.grad.tolist() == pytest.approx([1 - math.exp(-0.5) * 2, 1 - math.exp(1.0) * 3], rel=1e-5)
    _, w = bal(L(a=float("nan"), b=3.0))
    assert w["a"] == 0.0 and all(math.isfinite(v) for v in w.values())


# ---------------------------------------------------------------- gradnorm
def toy_losses(weight: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """Two terms on one shared parameter whose gradient norms differ by ~20x."""
    return {"big": (weight * torch.tensor([4.0, 2.0])).sum() ** 2 / 2,
            "small": (weight * torch.tensor([0.2, 0.1])).sum() ** 2 * 2}


def weighted_grad_norms(weight: torch.nn.Parameter, w: dict[str, float]) -> list[float]:
    out = []
    for name, loss in toy_losses(weight).items():
        (g,) = torch.autograd.grad(loss, [weight])
        out.append(w[name] * g.norm().item())
    return out


def test_gradnorm_moves_weights_towards_equal_gradient_norms():
    shared = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    bal = create_balancer("gradnorm", ["big", "small"], lr=0.05)
    _, w0 = bal(toy_losses(shared), [shared])
    assert w0 == {"big": 1.0, "small": 1.0}
    g0 = weighted_grad_norms(shared, w0)
    for _ in range(60):  # losses stay constant, so every relative rate is 1: target = equal norms
        total, w = bal(toy_losses(shared), [shared])
        assert all(math.isfinite(v) for v in w.values())
        assert sum(w.values()) == pytest.approx(2.0)
    g = weighted_grad_norms(shared, w)
    assert w["small"] > w["big"]
    assert max(g) / min(g) < 0.25 * max(g0) / min(g0)
    total.backward()
    assert shared.grad is not None and torch.isfinite(shared.grad).all()


def test_gradnorm_state_round_trip_nan_term_and_requires_params():
    shared = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    bal = create_balancer("gradnorm", ["big", "small"])
    for _ in range(3):
        bal(toy_losses(shared), [shared])
    restored = create_balancer("gradnorm", ["big", "small"])
    restored.load_state_dict(bal.state_dict())
    assert bal(toy_losses(shared), [shared])[1] == restored(toy_losses(shared), [shared])[1]
    losses = toy_losses(shared)
    losses["small"] = torch.tensor(float("nan"))
    total, w = bal(losses, [shared])
    assert w["small"] == 0.0 and torch.isfinite(total) and torch.isfinite(bal.weights).all()
    with pytest.raises(ValueError, match="shared_params"):
        bal(toy_losses(shared))


# ---------------------------------------------------------------- weight trajectories plot
def test_weights_png_from_the_train_log(tmp_path):
    from PIL import Image

    from distill.pipeline.train.log import TrainLogger, plot_losses, plot_weights

    log = TrainLogger(tmp_path, tensorboard=False)
    log.log({"kind": "train", "step": 1, "loss/a": 2.0})
    log.close()
    assert plot_weights(tmp_path) is None  # no weights logged
    log = TrainLogger(tmp_path, tensorboard=False)
    bal = create_balancer("dynamic", ["student_clip", "feature_l1"], ref_steps=2)
    for step in range(1, 30):
        losses = {"student_clip": 3.0, "feature_l1": 0.5 * 0.9**step}
        _, w = bal(L(**losses))
        log.log({"kind": "train", "step": step, **{f"loss/{k}": v for k, v in losses.items()},
                 **{f"weight/{k}": v for k, v in w.items()}})
    log.close()
    assert plot_losses(tmp_path) == tmp_path / "plots" / "losses.png"
    png = tmp_path / "plots" / "weights.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size == (800, 450)
        # the two weight lines are drawn in colour (the axes, grid and dashed mean line are grey)
        rgb = np.asarray(im.convert("RGB")).astype(int)
        assert (np.ptp(rgb, axis=2) > 80).sum() > 500
