"""DP-SGD's guarantee holds as accounted: exact Poisson sampling, overflow
charged for the neighbour's size, clipping at any matmul precision, training
randomness the bundle does not reveal, steps run = steps accounted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mico_jax import accounting, dp


@pytest.mark.parametrize("num_points,q", [(10**9, 1 / 293), (1000, 0.05),
                                          (150_000, 0.5)])
def test_poisson_gaps_follow_the_geometric_law_to_float64(num_points, q):
  # A gap is 1 + X, X Geometric: P(X = x) = q (1 - q)^x. The law the sampler
  # draws from, from its 64-bit thresholds, against the exact law for every x
  # below the first power of two past the list's end (or the digits' 2^-64
  # cut-off): at q = 1/293 up to ~12,000, far past the 4,664 that a float32
  # uniform reaches (whose law is off by ~1e-7 everywhere: TV ~ 1e-5).
  sampler = dp.PoissonSampler(num_points, q, 64)
  p_D, past_end = sampler.digit_probabilities()
  x = np.arange(2 ** len(p_D))
  assert x[-1] >= min(30 / q, num_points)
  bits_XxD = (x[:, None] >> np.arange(len(p_D))) & 1
  p_X = np.exp(np.sum(np.where(bits_XxD, np.log(p_D), np.log1p(-p_D)), 1) +
               np.log1p(-past_end))
  exact_X = q * np.exp(x * np.log1p(-q))
  exact_tail = np.exp(len(x) * np.log1p(-q))  # P(X >= 2^D)
  # Total variation, the tail (drawn as "past the end" or dropped) included.
  tv = 0.5 * (np.abs(p_X - exact_X).sum() + abs(past_end - exact_tail))
  assert tv < 1e-14
  big = exact_X > 1e-12
  np.testing.assert_allclose(p_X[big], exact_X[big], rtol=1e-9)


def test_poisson_gaps_drawn_have_the_thresholds_law():
  # The draws use those thresholds: each binary digit of X is 1 as often as
  # its probability says, digits are uncorrelated, and the empirical tail of
  # the gaps is (1 - q)^t.
  q, capacity, steps = 1 / 293, 1024, 256
  sampler = dp.PoissonSampler(10**9, q, capacity)
  key = jax.random.PRNGKey(0)
  _, positions_SxB, _ = jax.jit(jax.vmap(
      lambda s: sampler.sample((), key, s)))(jnp.arange(steps))
  positions_SxB = np.asarray(positions_SxB, np.int64)
  gaps = np.diff(positions_SxB, prepend=-1, axis=1).reshape(-1)
  assert (gaps >= 1).all()
  x = gaps - 1
  p_D, _ = sampler.digit_probabilities()
  bits_GxD = (x[:, None] >> np.arange(len(p_D))) & 1
  freq_D = bits_GxD.mean(0)
  sd_D = np.sqrt(p_D * (1 - p_D) / len(x))
  assert np.all(np.abs(freq_D - p_D) < 5 * sd_D + 1e-9)
  corr = np.corrcoef(bits_GxD[:, :10].T)
  assert np.abs(corr - np.eye(10)).max() < 5 / np.sqrt(len(x))
  for t in (1, 10, 100, 293, 1000, 2000):
    expected = (1 - q) ** t
    sd = np.sqrt(expected * (1 - expected) / len(x))
    assert abs(np.mean(x >= t) - expected) < 5 * sd


@pytest.mark.parametrize("epsilon,n,batch,epochs", [
    (4.0, 900, 225, 40), (10.0, 2000, 100, 20)])
def test_overflow_is_charged_for_the_add_one_neighbour(epsilon, n, batch,
                                                       epochs):
  # Under add-or-remove-one, the neighbour with n + 1 points overflows the
  # capacity more often than the dataset itself: δ must cover its overflow.
  mech = dp.calibrate(dp.DPConfig(epsilon, 1e-5, 1.0), n, batch, epochs)
  overflow = accounting.overflow_probability(n + 1, mech.sample_rate,
                                             mech.steps, mech.capacity)
  assert overflow > accounting.overflow_probability(
      n, mech.sample_rate, mech.steps, mech.capacity) > 0
  assert accounting.delta_with_overflow(
      epsilon, mech.poisson_delta, overflow) <= mech.delta
