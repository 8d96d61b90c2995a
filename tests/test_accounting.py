"""Tests for mico_jax.accounting.

References come from Microsoft's `prv-accountant` 0.2.0, the accountant (and
version) MICO trained with (microsoft/MICO, training/train_purchase100.py and
requirements-purchase100.txt). MICO's Purchase-100 recipe: n = 150,000, batch
512, 30 epochs, δ = 1e-5. Its `DataLoader` keeps the last partial batch, so
steps per epoch = len(train_loader) = ceil(150000 / 512) = 293; MICO sets
sample rate = 1 / len(train_loader) = 1/293 and steps = 293 * 30 = 8,790, and
calls `find_noise_multiplier(..., eps_error=0.1)`.

The hard-coded numbers below were produced once with prv-accountant 0.2.0
(numpy 2, scipy 1.x, Python 3.11) by:

  python -c "from prv_accountant.dpsgd import find_noise_multiplier as f; \
print([f(sampling_probability=1/293, num_steps=8790, target_epsilon=e, \
target_delta=1e-5, eps_error=0.1) for e in (10.0, 4.0)])"
  -> [0.5415591087480112, 0.7067022435373795]

  python -c "from prv_accountant.dpsgd import DPSGDAccountant as A; \
print([A(noise_multiplier=s, sampling_probability=1/293, max_steps=8790, \
eps_error=0.01, delta_error=1e-9).compute_epsilon(delta=1e-5, num_steps=8790) \
for s in (0.5415591087480112, 0.7067022435373795)])"
  -> [(9.926716006966206, 9.936782600261548, 9.946849200044799),
      (3.9364262578362985, 3.946453715591527, 3.956481175986148)]
     (lower bound, estimate, upper bound on ε)

When prv-accountant is installed (`pip install prv-accountant==0.2.0`, in the
`test` extra), the tests marked `prv` also recompute them.
"""

import functools
import math

import numpy as np
import pytest
from scipy import special
from scipy import stats

from mico_jax import accounting, dp, tasks

# MICO's Purchase-100 recipe.
N = 150_000
STEPS_PER_EPOCH = math.ceil(N / 512)  # 293: len(DataLoader), drop_last=False.
Q = 1 / STEPS_PER_EPOCH
STEPS = 30 * STEPS_PER_EPOCH  # 8,790.
DELTA = 1e-5

# σ that MICO's `find_noise_multiplier(eps_error=0.1)` returns (see docstring).
MICO_SIGMA = {10.0: 0.5415591087480112, 4.0: 0.7067022435373795}
# prv-accountant's (lower, estimate, upper) ε at MICO_SIGMA, eps_error = 0.01.
PRV_EPSILON_AT_MICO_SIGMA = {
    10.0: (9.926716006966206, 9.936782600261548, 9.946849200044799),
    4.0: (3.9364262578362985, 3.946453715591527, 3.956481175986148),
}


@functools.lru_cache
def _sigma(target_epsilon: float) -> float:
  return accounting.noise_multiplier(target_epsilon, DELTA, Q, STEPS)


def test_mico_recipe_is_calibrated_with_mico_sampling(monkeypatch):
  # What the engine derives from the Purchase-100 task's own recipe must be
  # MICO's sampling: q = 1 / len(DataLoader) = 1/293 and 293 * 30 = 8,790
  # steps, the numbers MICO passes to its accountant (σ is checked below).
  seen = []
  monkeypatch.setattr(accounting, "noise_multiplier",
                      lambda eps, delta, q, steps: seen.append((q, steps))
                      or 1.0)
  recipe = tasks.PURCHASE100.scenarios["hi"]
  # Unwrapped: the cached function may already hold the real σ.
  mechanism = dp.calibrate.__wrapped__(
      recipe.dp, tasks.PURCHASE100.len_training, recipe.batch_size,
      recipe.epochs)
  assert (mechanism.sample_rate, mechanism.steps) == (1 / 293, 8790)
  assert seen == [(1 / 293, 8790)]
  assert mechanism.expected_batch_size == pytest.approx(150_000 / 293)
  assert (recipe.dp.epsilon, recipe.dp.delta, recipe.dp.clip_norm) == (
      10.0, 1e-5, 2.6)


@pytest.mark.parametrize("target_epsilon", [10.0, 4.0])
def test_noise_multiplier_matches_mico_prv(target_epsilon):
  sigma = _sigma(target_epsilon)
  ref = MICO_SIGMA[target_epsilon]
  assert sigma == pytest.approx(ref, rel=0.01)
  # MICO's search returns the upper end of its final bracket (its σ reaches
  # ε ≈ 9.94 / 3.95, not 10 / 4), so ours is a little smaller, not larger.
  assert sigma <= ref


@pytest.mark.parametrize("target_epsilon", [10.0, 4.0])
def test_epsilon_within_prv_bounds(target_epsilon):
  lower, estimate, upper = PRV_EPSILON_AT_MICO_SIGMA[target_epsilon]
  eps = accounting.epsilon(MICO_SIGMA[target_epsilon], DELTA, Q, STEPS)
  assert lower <= eps <= upper
  assert eps == pytest.approx(estimate, rel=1e-3)


@functools.lru_cache
def _prv_find_noise_multiplier(target_epsilon: float) -> float:
  from prv_accountant import dpsgd  # pylint: disable=g-import-not-at-top
  # Exactly MICO's call in training/train_purchase100.py.
  return dpsgd.find_noise_multiplier(
      sampling_probability=Q,
      num_steps=STEPS,
      target_epsilon=target_epsilon,
      target_delta=DELTA,
      eps_error=0.1)


@pytest.mark.parametrize("target_epsilon", [10.0, 4.0])
def test_noise_multiplier_against_live_prv(target_epsilon):
  pytest.importorskip("prv_accountant")
  ref = _prv_find_noise_multiplier(target_epsilon)
  assert ref == pytest.approx(MICO_SIGMA[target_epsilon], rel=1e-6)
  assert _sigma(target_epsilon) == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize("target_epsilon", [10.0, 4.0])
def test_prv_epsilon_at_our_sigma(target_epsilon):
  """PRV, at our σ, puts ε right at the target: σ is neither loose nor short."""
  dpsgd = pytest.importorskip("prv_accountant.dpsgd")
  prv = dpsgd.DPSGDAccountant(
      noise_multiplier=_sigma(target_epsilon),
      sampling_probability=Q,
      max_steps=STEPS,
      eps_error=0.01,
      delta_error=1e-9)
  lower, estimate, _ = prv.compute_epsilon(delta=DELTA, num_steps=STEPS)
  assert lower <= target_epsilon
  assert estimate == pytest.approx(target_epsilon, rel=2e-3)


@pytest.mark.parametrize("target_epsilon", [10.0, 4.0])
def test_round_trip(target_epsilon):
  eps = accounting.epsilon(_sigma(target_epsilon), DELTA, Q, STEPS)
  assert target_epsilon * (1 - 1e-3) <= eps <= target_epsilon


def test_round_trip_small_recipe():
  sigma = accounting.noise_multiplier(2.0, 1e-6, 0.01, 500)
  eps = accounting.epsilon(sigma, 1e-6, 0.01, 500)
  assert 2.0 * (1 - 1e-3) <= eps <= 2.0


def _analytic_gaussian_delta(eps: float, sigma: float) -> float:
  """Exact δ(ε) of the Gaussian mechanism, sensitivity 1 (Balle & Wang 2018)."""
  phi = special.ndtr
  return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(
      -0.5 / sigma - eps * sigma)


def test_full_batch_single_step_is_the_gaussian_mechanism():
  # q = 1, one step: no subsampling, an independent closed form.
  sigma = accounting.noise_multiplier(1.0, 1e-5, 1.0, 1)
  assert _analytic_gaussian_delta(1.0, sigma) <= 1e-5
  assert _analytic_gaussian_delta(1.0, sigma * (1 - 2e-3)) > 1e-5


def test_epsilon_grows_with_steps_and_falls_with_noise():
  by_steps = [accounting.epsilon(0.8, DELTA, Q, t) for t in (293, 1000, 4000)]
  assert np.all(np.diff(by_steps) > 0)
  by_sigma = [accounting.epsilon(s, DELTA, Q, 1000) for s in (0.7, 1.0, 2.0)]
  assert np.all(np.diff(by_sigma) < 0)


def test_noise_grows_with_steps():
  short = accounting.noise_multiplier(4.0, DELTA, 0.01, 200)
  assert short < accounting.noise_multiplier(4.0, DELTA, 0.01, 800)


_GOOD = dict(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.01, steps=10)
_GOOD_EPS = dict(
    noise_multiplier=1.0, target_delta=1e-5, sample_rate=0.01, steps=10)


@pytest.mark.parametrize(
    "name, value",
    [("target_epsilon", 0.0), ("target_epsilon", -1.0),
     ("target_epsilon", math.inf), ("target_epsilon", math.nan),
     ("target_delta", 0.0), ("target_delta", 1.0), ("target_delta", -1e-5),
     ("sample_rate", 0.0), ("sample_rate", 1.5), ("sample_rate", -0.1),
     ("steps", 0), ("steps", -3), ("steps", 2.5)])
def test_noise_multiplier_rejects(name, value):
  with pytest.raises(ValueError, match=name):
    accounting.noise_multiplier(**{**_GOOD, name: value})


def test_noise_multiplier_out_of_range():
  # q = 1, one step, ε = 1e-7, δ = 1e-12 needs σ ~ 4e11.
  with pytest.raises(ValueError, match="target_epsilon"):
    accounting.noise_multiplier(1e-7, 1e-12, 1.0, 1)


@pytest.mark.parametrize(
    "name, value",
    [("noise_multiplier", 0.0), ("noise_multiplier", -1.0),
     ("target_delta", 1.5), ("sample_rate", 0.0), ("steps", 0)])
def test_epsilon_rejects(name, value):
  with pytest.raises(ValueError, match=name):
    accounting.epsilon(**{**_GOOD_EPS, name: value})


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(dataset_size=100), "capacity"),
     (dict(capacity=10), "dataset_size"),
     (dict(dataset_size=100, capacity=101), "capacity"),
     (dict(dataset_size=0, capacity=10), "dataset_size")])
def test_truncation_arguments_rejected(kwargs, name):
  with pytest.raises(ValueError, match=name):
    accounting.epsilon(**_GOOD_EPS, **kwargs)


@pytest.mark.parametrize(
    "args, name",
    [((0.0, 1e-5, 1.0), "epsilon"), ((math.inf, 1e-5, 1.0), "epsilon"),
     ((4.0, 0.0, 1.0), "delta"), ((4.0, 1.0, 1.0), "delta"),
     ((4.0, 1e-5, 0.0), "clip_norm"), ((4.0, 1e-5, -2.6), "clip_norm")])
def test_validate_dp(args, name):
  accounting.validate_dp(10.0, 1e-5, 2.6)
  with pytest.raises(ValueError, match=name):
    accounting.validate_dp(*args)


@pytest.mark.parametrize("failure_probability", [1e-6, 1e-9, 1e-15])
def test_batch_capacity_bound(failure_probability):
  cap = accounting.batch_capacity(N, Q, STEPS, failure_probability)
  tail = stats.binom.sf(cap, N, Q)
  # Union bound holds, and so does the exact P(some batch > cap).
  assert STEPS * tail <= failure_probability
  assert -math.expm1(STEPS * math.log1p(-tail)) <= failure_probability
  # Smallest such capacity.
  assert STEPS * stats.binom.sf(cap - 1, N, Q) > failure_probability
  # No larger than Bernstein's inequality, P(X - mean >= t) <=
  # exp(-t^2 / (2 (var + t / 3))), allows with the same union bound.
  mean, var = N * Q, N * Q * (1 - Q)
  log_inv = math.log(STEPS / failure_probability)
  t = log_inv / 3 + math.sqrt((log_inv / 3)**2 + 2 * var * log_inv)
  assert mean < cap <= mean + t + 1


def test_batch_capacity_mico_default():
  cap = accounting.batch_capacity(N, Q, STEPS)
  mean, std = N * Q, math.sqrt(N * Q * (1 - Q))
  assert cap == 686 and cap <= mean + 8 * std
  assert accounting.overflow_probability(N, Q, STEPS, cap) <= 1e-9


def test_batch_capacity_edges():
  assert accounting.batch_capacity(1000, 1.0, 5) == 1000
  assert accounting.batch_capacity(10, 1e-6, 1) == 1
  with pytest.raises(ValueError, match="failure_probability"):
    accounting.batch_capacity(N, Q, STEPS, 0.0)


def test_truncation_at_default_capacity_is_free():
  cap = accounting.batch_capacity(N, Q, STEPS)
  sigma = MICO_SIGMA[10.0]
  plain = accounting.epsilon(sigma, DELTA, Q, STEPS)
  truncated = accounting.epsilon(
      sigma, DELTA, Q, STEPS, dataset_size=N, capacity=cap)
  assert truncated == pytest.approx(plain, rel=1e-6)
  # A capacity near the mean batch size truncates often, and that costs ε:
  # the truncated event is really accounted for.
  tight = accounting.epsilon(
      sigma, DELTA, Q, STEPS, dataset_size=N, capacity=560)
  assert tight > 2 * plain


def test_delta_with_overflow():
  assert accounting.delta_with_overflow(4.0, 1e-5, 0.0) == 1e-5
  assert accounting.delta_with_overflow(10.0, 1e-5, 1e-13) == pytest.approx(
      1e-5 + (1 + math.exp(10.0)) * 1e-13)
  assert accounting.delta_with_overflow(1000.0, 1e-5, 1e-9) == 1.0
