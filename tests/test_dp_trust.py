"""DP-SGD's guarantee holds as accounted: exact Poisson sampling, overflow
charged for the neighbour's size, clipping at any matmul precision, training
randomness the bundle does not reveal, steps run = steps accounted."""

import flax.linen as nn
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


def _tpu_like_dot(lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None):
  """`lax.dot_general` as a TPU runs it at default precision: the operands
  rounded to bfloat16 unless the call or the context asks for more. XLA's
  CPU backend ignores precision, so the test emulates it in the model."""
  default = jax.config.jax_default_matmul_precision
  if precision in (None, jax.lax.Precision.DEFAULT) and default in (
      None, "default", "bfloat16"):
    lhs, rhs = (a.astype(jnp.bfloat16).astype(a.dtype) for a in (lhs, rhs))
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                             preferred_element_type)


class _TpuMLP(nn.Module):
  """An MLP whose matmuls round like a TPU's at default precision."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(32, dot_general=_tpu_like_dot)(x))
    return nn.Dense(5, dot_general=_tpu_like_dot)(h)


def test_each_contribution_is_within_c_at_reduced_matmul_precision():
  model = _TpuMLP()
  x = jax.random.normal(jax.random.PRNGKey(0), (24, 40)) * 30  # norms >> C
  y = jnp.arange(24) % 5
  params = model.init(jax.random.PRNGKey(1), x)
  clip_norm = 0.5
  one_each_BxB = jnp.eye(24, dtype=bool)  # each example alone in a batch
  with jax.default_matmul_precision("bfloat16"):
    _, sums, norms_BxB = jax.jit(jax.vmap(lambda m: dp.clipped_grad_sum(
        model.apply, params, x, y, m, clip_norm)))(one_each_BxB)
  assert (np.diag(np.asarray(norms_BxB)) > 2 * clip_norm).all()
  contribution_B = np.sqrt(sum(
      np.sum(np.asarray(s, np.float64).reshape(24, -1) ** 2, 1)
      for s in jax.tree.leaves(sums)))
  assert contribution_B.max() <= clip_norm * (1 + 1e-6)
