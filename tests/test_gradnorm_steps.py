"""GradNorm inside the trainer's step protocol: measured on GradScaler-scaled losses (scale
invariant), one update per optimizer step over the accumulated micro-steps, none on a skipped
step or on inf/NaN gradients."""
from __future__ import annotations

import torch

from distill.balance import create_balancer


def linear_losses(shared: torch.nn.Parameter, k: float = 1.0) -> dict[str, torch.Tensor]:
    """Two terms linear in the shared parameter: gradient norms 5k and 0.5k, values 7k and 0.7k."""
    return {"big": (shared * torch.tensor([3.0, 4.0])).sum() * k,
            "small": (shared * torch.tensor([0.3, 0.4])).sum() * k}


def quadratic_losses(shared: torch.nn.Parameter, step: int) -> dict[str, torch.Tensor]:
    """Terms whose values and gradients change from step to step (the rates r_i move)."""
    return {"big": ((shared - 0.1 * step) * torch.tensor([4.0, 2.0])).sum() ** 2 / 2,
            "small": (shared * torch.tensor([0.2, 0.1 + 0.05 * step])).sum() ** 2 * 2}


def state(bal) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bal.state_dict().items()}


def run_steps(scale: float, accum: int, steps: int = 12) -> dict[str, torch.Tensor]:
    shared = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    bal = create_balancer("gradnorm", ["big", "small"], lr=0.05)
    for s in range(steps):
        bal.begin_step(scale)
        for _ in range(accum):
            bal(quadratic_losses(shared, s), [shared])
        bal.end_step(True)
    return state(bal)


def test_weights_do_not_depend_on_the_loss_scale():
    ref = run_steps(1.0, 2)
    assert not torch.equal(ref["weights"], torch.ones(2, dtype=torch.float64))  # they moved
    for scale in (2.0**16, 2.0**-3, 3.0):
        for k, v in run_steps(scale, 2).items():
            torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=0)


def test_norms_are_measured_on_the_scaled_loss():
    """fp16 gradients of 1e-8 underflow to 0 unscaled; measured at scale 2**15 they come back."""
    from distill.balance.common import grad_norm

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    loss = ((p * 1e-4) * 1e-4).sum().float()
    assert grad_norm(loss, [p]).item() == 0.0
    measured = grad_norm(loss, [p], 2.0**15).item()
    assert abs(measured - 2e-8) / 2e-8 < 1e-2  # ||(1e-8,) * 4|| = 2e-8
    q = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    loss = (q * q).sum() / 2
    assert grad_norm(loss, [q], 1024.0).item() == grad_norm(loss, [q]).item() == 5.0


def test_one_update_per_optimizer_step_from_the_micro_step_means():
    shared = torch.nn.Parameter(torch.tensor([1.0, -0.5]))
    bal = create_balancer("gradnorm", ["big", "small"], lr=0.05)
    ref = create_balancer("gradnorm", ["big", "small"], lr=0.05)
    for _ in range(3):
        before = state(bal)
        bal.begin_step(1024.0)
        _, w1 = bal(linear_losses(shared, 1.0), [shared])
        _, w2 = bal(linear_losses(shared, 3.0), [shared])
        assert w1 == w2  # both micro-steps use the same weights
        for k, v in state(bal).items():
            assert torch.equal(v, before[k]), k  # nothing moves until the step is done
        bal.end_step(True)
        ref(linear_losses(shared, 2.0), [shared])  # one update on the means (values and norms are linear in k)
        for k, v in state(bal).items():
            torch.testing.assert_close(v, state(ref)[k], rtol=1e-6, atol=0)
    assert bal.adam_steps.tolist() == [3, 3]


def test_skipped_step_and_non_finite_gradients_leave_the_state_alone():
    shared = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    bal = create_balancer("gradnorm", ["big", "small"], lr=0.05)
    bal.begin_step(1.0)
    bal(linear_losses(shared), [shared])
    bal.end_step(True)
    before = state(bal)
    bal.begin_step(1.0)
    bal(linear_losses(shared), [shared])
    bal.end_step(False)  # the optimizer step was skipped
    bal.begin_step(2.0**200)  # scaled fp32 losses overflow: inf gradients, as under a too-large GradScaler scale
    total, w = bal(linear_losses(shared), [shared])
    assert torch.isfinite(total)
    bal.end_step(True)
    for k, v in state(bal).items():
        assert torch.equal(v, before[k]), k
    bal.begin_step(1.0)  # a later finite step updates again
    bal(linear_losses(shared), [shared])
    bal.end_step(True)
    assert bal.adam_steps.tolist() == [2, 2]
