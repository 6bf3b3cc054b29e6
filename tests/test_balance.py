"""Loss balancers: dynamic (magnitude x descent rate, EMA), fixed, uncertainty, GradNorm."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.balance import BALANCERS, build_balancer


def L(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_registry():
    assert BALANCERS.names() == ["dynamic", "fixed", "gradnorm", "uncertainty"]


# ---------------------------------------------------------------- dynamic
def test_dynamic_magnitude_normalisation_first_step():
    bal = build_balancer("dynamic", ["a", "b"])
    total, w = bal(L(a=4.0, b=1.0))
    # m = [1, 4], rates = 1 -> d = [1, 1]; normalised to sum 2 -> [0.4, 1.6]; weighted terms are equal
    assert w["a"] == pytest.approx(0.4) and w["b"] == pytest.approx(1.6)
    assert total.item() == pytest.approx(0.4 * 4 + 1.6 * 1)


def test_dynamic_rates_use_raw_losses_and_slower_descent_gets_more_weight():
    bal = build_balancer("dynamic", ["fast", "slow"], beta=0.0)
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


def test_dynamic_combines_magnitude_and_rate():
    bal = build_balancer("dynamic", ["a", "b"], beta=0.0, temperature=1.0)
    for la, lb in ((8.0, 2.0), (4.0, 1.8)):
        bal(L(a=la, b=lb))
    _, w = bal(L(a=2.0, b=1.0))
    r = np.array([4.0 / 8.0, 1.8 / 2.0])
    raw = np.array([2.0 / 2.0, 2.0 / 1.0]) * 2 * np_softmax(r)
    assert [w["a"], w["b"]] == pytest.approx((raw * 2 / raw.sum()).tolist())


def test_dynamic_ema_smoothing():
    bal = build_balancer("dynamic", ["a", "b"])  # beta 0.9
    bal(L(a=4.0, b=1.0))  # target [0.4, 1.6] initialises the EMA
    _, w = bal(L(a=1.0, b=1.0))  # target [1, 1] (rates still 1)
    assert [w["a"], w["b"]] == pytest.approx([0.9 * 0.4 + 0.1, 0.9 * 1.6 + 0.1])


def test_dynamic_zero_and_nan_losses_get_zero_weight_and_state_stays_finite():
    bal = build_balancer("dynamic", ["a", "b", "c"])
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


def test_dynamic_min_max_clamp():
    bal = build_balancer("dynamic", ["a", "b"], min_weight=0.5, max_weight=1.2)
    _, w = bal(L(a=4.0, b=1.0))  # unclamped [0.4, 1.6]
    assert (w["a"], w["b"]) == (0.5, 1.2)


def test_dynamic_state_dict_round_trip_gives_identical_next_weights():
    bal = build_balancer("dynamic", ["a", "b", "c"])
    for step in range(4):
        bal(L(a=3.0 / (step + 1), b=1.0 + 0.1 * step, c=0.5 * 0.8**step))
    restored = build_balancer("dynamic", ["a", "b", "c"])
    restored.load_state_dict(bal.state_dict())
    nxt = L(a=0.7, b=1.3, c=0.2)
    assert bal(nxt)[1] == restored(nxt)[1]


def test_balancer_rejects_unknown_terms():
    with pytest.raises(KeyError, match="missing \\['b'\\]"):
        build_balancer("dynamic", ["a", "b"])(L(a=1.0))


# ---------------------------------------------------------------- fixed / uncertainty
def test_fixed_weights_and_nan_term_skipped():
    bal = build_balancer("fixed", ["a", "b"], weights={"b": 0.5})
    total, w = bal(L(a=2.0, b=4.0))
    assert w == {"a": 1.0, "b": 0.5} and total.item() == pytest.approx(4.0)
    total, w = bal(L(a=float("nan"), b=4.0))
    assert w == {"a": 0.0, "b": 0.5} and total.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown terms \\['z'\\]"):
        build_balancer("fixed", ["a"], weights={"z": 1.0})


def test_uncertainty_total_and_gradients():
    bal = build_balancer("uncertainty", ["a", "b"])
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
    bal = build_balancer("gradnorm", ["big", "small"], lr=0.05)
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
    bal = build_balancer("gradnorm", ["big", "small"])
    for _ in range(3):
        bal(toy_losses(shared), [shared])
    restored = build_balancer("gradnorm", ["big", "small"])
    restored.load_state_dict(bal.state_dict())
    assert bal(toy_losses(shared), [shared])[1] == restored(toy_losses(shared), [shared])[1]
    losses = toy_losses(shared)
    losses["small"] = torch.tensor(float("nan"))
    total, w = bal(losses, [shared])
    assert w["small"] == 0.0 and torch.isfinite(total) and torch.isfinite(bal.weights).all()
    with pytest.raises(ValueError, match="shared_params"):
        bal(toy_losses(shared))
