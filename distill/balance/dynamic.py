"""``dynamic`` (the default balancer): scale-invariant, rate-driven weights with floors and a cap.

For the K configured terms with raw losses ``L_i(t)`` (one update per balancer call, i.e. per
micro-batch), without gradient through the weights:

* **reference** ``ref_i``: the mean of the term's valid values ``ref_after + 1 .. ref_after +
  ref_steps``, then frozen; until that window is complete, the mean of every valid value so far
  (a provisional reference that tracks the term through its start-up transient: a filling queue,
  the LR warm-up, a student whose features still move fast). The
  total is ``sum_i w_i * L_i / ref_i``: multiplying a loss by a constant c multiplies its reference
  by c, so the total, its gradient and the weights are unchanged (scale invariance). Frozen, not
  tracking: ``L_i / ref_i`` then measures how far the term has come since its start, so a term
  heading to zero also fades out of the total. A reference that followed the loss would keep
  ``L_i / ref_i ~ 1`` and give a vanishing loss an ever larger multiplier (the failure of the
  ``1 / L_i`` weighting kept as ``dsmd``).
* **scale** (``scale``): what the reference measures. ``value`` (default): the loss value, as
  above. ``grad``: the norm of the term's gradient on the student's shared parameters (the last
  layer of each tower, :meth:`Student.shared_parameters`), measured every call with one small extra
  backward per term, down to those parameters only; the reference window and the provisional mean
  work the same way on these norms. A loss value is a poor proxy for a term's pull on the student: a
  margin loss at 0.2 can have the largest gradient of all, a cross-entropy over a queue grows with
  the number of columns while its gradient does not. With ``grad`` each term's gradient on the
  shared layer is about ``w_i`` times its reference norm's worth, i.e. the weights set the terms'
  shares of the gradient directly. Under torchrun the norms are averaged over the ranks (each rank
  measures its samples' part), so every rank keeps the same references and weights.
* **descent rate** ``r_i = exp(fast_i - slow_i)``: the ratio of a fast and a slow geometric EMA of
  ``L_i`` (bias-corrected EMAs of ``log L_i`` with ``beta_fast`` 0.9, about 10 steps, and
  ``beta_slow`` 0.99, about 100 steps). The ratio is the same on ``L_i / ref_i``, since ``ref_i`` is a
  constant factor. ``r < 1``: still descending, ``r ~ 1``: plateaued, ``r > 1``: rising.
  Geometric, not arithmetic: after a 20x descent an arithmetic slow EMA is dominated by the few
  early large values and keeps a plateaued term looking "descending" for several slow horizons;
  in the log domain those values weigh by their log-distance only.
* **target** ``u_i = p_i * exp(r_i / T)`` (``priors`` p_i, default 1; ``temperature`` T, default
  0.5: ``r`` 0.7 against 1 is a 1.8x weight ratio, 5% minibatch noise in a loss moves its weight
  by about 2%). A plateaued term gains weight relative to one that is still descending fast. A
  term with no more than ``ref_after + ref_steps`` valid values has no rate yet and gets the mean of the
  established terms' ``r / T`` (its prior alone), so the first ``ref_after + ref_steps`` calls use the priors (uniform by
  default).
* **weights** ``w_i = clip(s * u_i, floor_i, cap)``, with the one scale ``s`` that makes the mean
  weight over this step's valid terms 1 (sum K'). ``floors`` defaults to 0.5 on
  ``contrastive_distill`` and ``student_clip`` when those terms are configured: the
  retrieval-shaping terms never get less than half the mean weight. Given floors are merged over
  these defaults; give 0 to remove one. ``cap`` defaults to 3 (three times the mean). If the
  floors of the valid terms add up to more than K' (possible only with floors above 1 while other
  terms are skipped), every valid term gets exactly its floor (0 where it has none).

``weights`` (as logged) are the ``w_i``. The raw loss is multiplied by ``w_i / ref_i``
(:meth:`DynamicBalancer.references`). A term whose loss is non-finite or <= 0 gets weight 0 for
that step and leaves its state untouched. All state (counts, reference sums, EMAs) lives in
float64 buffers, so ``state_dict`` resumes with bit-identical next weights.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from distill.core.registry import BALANCERS
from distill.balance.base import Balancer
from distill.balance.common import grad_norm, loss_values, weighted_total
from distill.core.dist import all_reduce_mean
from distill.core.errors import CheckpointError, ConfigError

DEFAULT_FLOORS = {"contrastive_distill": 0.5, "student_clip": 0.5}
OPTIONS = ("temperature", "beta_fast", "beta_slow", "ref_steps", "ref_after", "scale", "cap", "floors", "priors")
SCALES = ("value", "grad")


def _number(key: str, value: Any, allow_inf: bool = False) -> float:
    """``value`` as a float; a ConfigError naming ``balancer.cfg.<key>`` when it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"balancer.cfg.{key} must be a finite number, got {value!r}")
    return float(value)


def _count(key: str, value: Any, minimum: int) -> int:
    """``value`` as a count; a ConfigError naming ``balancer.cfg.<key>`` unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"balancer.cfg.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _per_term(key: str, given: Any, names: Sequence[str]) -> dict[str, float]:
    """A ``{term: number}`` mapping whose names are all configured loss terms."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"balancer.cfg.{key} must map loss names to numbers, got {given!r}")
    for name in given:
        if name not in names:
            raise ConfigError(f"balancer.cfg.{key}.{name}: no loss term named {name!r}; terms are {list(names)}")
    return {name: _number(f"{key}.{name}", v) for name, v in given.items()}


def fit_to_budget(raw: Sequence[float], lo: Sequence[float], hi: Sequence[float], total: float) -> list[float]:
    """``w_i = clip(s * raw_i, lo_i, hi_i)`` with the scale ``s >= 0`` that makes ``sum(w) = total``
    (``raw > 0``, ``0 <= lo <= hi``). ``f(s) = sum_i clip(s * raw_i)`` is continuous, non-decreasing and
    piecewise linear with knots ``lo / raw`` and ``hi / raw``: find the piece that reaches ``total``
    and solve it exactly. Returns ``lo`` when ``sum(lo) >= total`` and ``hi`` when ``sum(hi) <= total``."""
    def clip(s: float) -> list[float]:
        return [min(max(s * r, a), b) for r, a, b in zip(raw, lo, hi)]

    prev = 0.0
    for knot in sorted({x for r, a, b in zip(raw, lo, hi) for x in (a / r, b / r)}):
        if sum(clip(knot)) >= total:
            break
        prev = knot
    else:
        return list(hi)
    mid = (prev + knot) / 2
    free = [a < mid * r < b for r, a, b in zip(raw, lo, hi)]
    if not any(free):
        return clip(knot)
    fixed = sum(w for w, f in zip(clip(mid), free) if not f)
    return clip((total - fixed) / sum(r for r, f in zip(raw, free) if f))


@BALANCERS.register("dynamic")
class DynamicBalancer(Balancer):
    def __init__(self, names: list[str], temperature: float = 0.5, beta_fast: float = 0.9, beta_slow: float = 0.99,
                 ref_steps: int = 20, ref_after: int = 0, scale: str = "value", cap: float = 3.0, floors: Mapping[str, float] | None = None,
                 priors: Mapping[str, float] | None = None, **unknown: Any) -> None:
        if unknown:
            raise ConfigError(f"balancer.cfg.{sorted(unknown)[0]}: unknown option of the dynamic balancer; "
                              f"known: {', '.join(OPTIONS)}")
        super().__init__()
        self.names = list(names)
        k = len(self.names)
        self.temperature = _number("temperature", temperature)
        if self.temperature <= 0:
            raise ConfigError(f"balancer.cfg.temperature must be > 0, got {temperature!r}")
        self.beta_fast, self.beta_slow = _number("beta_fast", beta_fast), _number("beta_slow", beta_slow)
        if not 0 <= self.beta_fast < 1:
            raise ConfigError(f"balancer.cfg.beta_fast must be in [0, 1), got {beta_fast!r}")
        if not self.beta_fast < self.beta_slow < 1:
            raise ConfigError(f"balancer.cfg.beta_slow must be in (beta_fast, 1) = ({beta_fast}, 1), got {beta_slow!r}")
        self.ref_steps = _count("ref_steps", ref_steps, 1)
        self.ref_after = _count("ref_after", ref_after, 0)
        if scale not in SCALES:
            raise ConfigError(f"balancer.cfg.scale must be one of {', '.join(SCALES)}, got {scale!r}")
        self.scale = scale
        self.uses_loss_scale = scale == "grad"  # gradient norms are measured on the GradScaler-scaled loss
        self._loss_scale = 1.0
        self.cap = _number("cap", cap, allow_inf=True)
        if self.cap < 1:
            raise ConfigError(f"balancer.cfg.cap must be >= 1 (the mean weight is 1), got {cap!r}")
        floor = {n: v for n, v in DEFAULT_FLOORS.items() if n in self.names} | _per_term("floors", floors, self.names)
        for name, value in floor.items():
            if not 0 <= value <= self.cap:
                raise ConfigError(f"balancer.cfg.floors.{name} must be in [0, cap={self.cap:g}], got {value!r}")
        if sum(floor.values()) > k:
            raise ConfigError(f"balancer.cfg.floors add up to {sum(floor.values()):g}, more than the weight budget "
                              f"{k} of the {k} terms (the mean weight is 1)")
        prior = _per_term("priors", priors, self.names)
        for name, value in prior.items():
            if value <= 0:
                raise ConfigError(f"balancer.cfg.priors.{name} must be > 0, got {value!r}")
        self.floors = [floor.get(n, 0.0) for n in self.names]
        self.priors = [prior.get(n, 1.0) for n in self.names]
        self.register_buffer("count", torch.zeros(k, dtype=torch.float64))  # valid values seen
        self.register_buffer("ref_sum", torch.zeros(k, dtype=torch.float64))  # sum over the reference window
        self.register_buffer("all_sum", torch.zeros(k, dtype=torch.float64))  # sum of every value (provisional)
        self.register_buffer("fast", torch.zeros(k, dtype=torch.float64))  # EMAs of log L from 0,
        self.register_buffer("slow", torch.zeros(k, dtype=torch.float64))  # bias-corrected when read

    def references(self) -> Tensor:
        """``ref_i``: the mean over the reference window once it is complete, before that the mean of
        every valid value so far (1 where none yet)."""
        done = self.count >= self.ref_after + self.ref_steps
        provisional = torch.where(self.count > 0, self.all_sum / self.count.clamp(min=1), torch.ones_like(self.count))
        return torch.where(done, self.ref_sum / self.ref_steps, provisional)

    def rates(self) -> Tensor:
        """``r_i = exp(fast_i - slow_i)`` of the bias-corrected log-EMAs (1 where no value was seen yet)."""
        seen = self.count > 0
        fast = self.fast / (1 - torch.pow(self.beta_fast, self.count))
        slow = self.slow / (1 - torch.pow(self.beta_slow, self.count))
        return torch.where(seen, torch.exp(fast - slow), torch.ones_like(slow))

    def weights_from_state(self, valid: Tensor) -> list[float]:
        """The weights for the ``valid`` terms from the current state (0 for the others)."""
        idx = [i for i, ok in enumerate(valid.tolist()) if ok]
        if not idx:
            return [0.0] * len(self.names)
        logits = (self.rates() / self.temperature).tolist()
        established = (self.count > self.ref_after + self.ref_steps).tolist()  # reference complete before this step
        known = [logits[i] for i in idx if established[i]]
        neutral = sum(known) / len(known) if known else 0.0
        z = [logits[i] if established[i] else neutral for i in idx]
        top = max(z)
        raw = [max(self.priors[i] * math.exp(v - top), 1e-300) for i, v in zip(idx, z)]
        budget = float(len(idx))
        lo = [self.floors[i] for i in idx]
        hi = [max(min(self.cap, budget), a) for a in lo]
        out = [0.0] * len(self.names)
        for i, w in zip(idx, fit_to_budget(raw, lo, hi, budget)):
            out[i] = w
        return out

    def begin_step(self, loss_scale: float = 1.0) -> None:
        self._loss_scale = float(loss_scale)

    @torch.no_grad()
    def _update(self, values: Tensor, valid: Tensor, scales: Tensor) -> None:
        """Fold this step's valid values (and the ``scales`` the references measure: the values
        themselves or gradient norms) into the state (invalid terms untouched)."""
        zero = torch.zeros_like(values)
        window = (self.count >= self.ref_after) & (self.count < self.ref_after + self.ref_steps)
        self.ref_sum += torch.where(valid & window, scales, zero)
        self.all_sum += torch.where(valid, scales, zero)
        self.count += valid.double()
        logs = torch.where(valid, values, torch.ones_like(values)).log()
        self.fast.copy_(torch.where(valid, self.beta_fast * self.fast + (1 - self.beta_fast) * logs, self.fast))
        self.slow.copy_(torch.where(valid, self.beta_slow * self.slow + (1 - self.beta_slow) * logs, self.slow))

    def forward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter] = ()) -> tuple[Tensor, dict[str, float]]:
        values, finite = loss_values(losses, self.names, self.count.device, torch.float64)
        valid = finite & (values > 0)
        scales = values
        if self.scale == "grad":
            if not shared_params:
                raise ConfigError("balancer.cfg.scale=grad needs the student's shared parameters "
                                  "(Student.shared_parameters); use scale=value")
            norms = torch.stack([grad_norm(losses[n], shared_params, self._loss_scale).to(values.device)
                                 for n in self.names])
            # under torchrun each rank sees its part of the gradient: the mean over ranks keeps the
            # references, hence the weights and the total, the same on every rank
            norms = all_reduce_mean(norms)
            valid = valid & torch.isfinite(norms) & (norms > 0)
            scales = norms
        values = torch.where(valid, values, torch.zeros_like(values))
        self._update(values, valid, torch.where(valid, scales, torch.zeros_like(scales)))
        weights = self.weights_from_state(valid)
        scale = [w / r for w, r in zip(weights, self.references().tolist())]
        return weighted_total(losses, self.names, scale, valid.tolist()), dict(zip(self.names, weights))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if "prev1" in state_dict and "count" not in state_dict:
            raise CheckpointError("the checkpoint's balancer state was written by the former `dynamic` formula, "
                                  "now `dsmd`: resume it with --set balancer.name=dsmd")
        if "all_sum" not in state_dict and "ref_sum" in state_dict:  # written before ref_after existed
            if self.ref_after:
                raise CheckpointError("the checkpoint's dynamic balancer predates balancer.cfg.ref_after; "
                                      "resume it with balancer.cfg.ref_after=0")
            state_dict = {**state_dict, "all_sum": state_dict["ref_sum"].clone()}
        return super().load_state_dict(state_dict, strict, assign)
