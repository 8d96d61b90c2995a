"""DP-SGD's guarantee holds as accounted: exact Poisson sampling, overflow
charged for the neighbour's size, clipping at any matmul precision, training
randomness the bundle does not reveal, steps run = steps accounted."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mico_jax import accounting, challenge, data, dp, models, pipeline, train


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


def _tiny_dp_setup(epochs=2):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 12)).astype(np.float32)
  y = x[:, :3].argmax(1).astype(np.int32)
  dataset = data.Dataset("toy", x, y, 3, "tabular")
  chal = challenge.make_challenge(300, 120, 20, challenge.make_seeds(2, 2))
  config = train.TrainConfig("sgd", 0.5, batch_size=30, epochs=epochs,
                             dp=dp.DPConfig(4.0, 1e-5, 1.0))
  return models.MLP(3, (8,)), config, dataset, chal


def test_training_randomness_is_not_derived_from_the_published_seeds():
  model, config, dataset, chal = _tiny_dp_setup()
  train_ = lambda **kw: pipeline.train_models(model, config, dataset, chal,
                                              log=None, **kw)
  public, secret = train_(), train_(training_seed=2**100 + 7)
  leaf = lambda p: np.asarray(jax.tree.leaves(p)[0])
  # The bundle's seeds alone no longer give the noise; the secret does.
  assert not np.allclose(leaf(public), leaf(secret))
  keys = lambda seeds, s: np.asarray(train.model_keys(seeds, s))
  np.testing.assert_array_equal(keys(chal.seeds_Kx3, 2**100 + 7),
                                keys(chal.seeds_Kx3, 2**100 + 7))
  assert (keys(chal.seeds_Kx3, 2**100 + 7) != keys(chal.seeds_Kx3, 8)).all()
  # Each model still has its own key: the secret is mixed with its seeds.
  assert (keys(chal.seeds_Kx3, 5)[0] != keys(chal.seeds_Kx3, 5)[1]).any()
  np.testing.assert_array_equal(keys(chal.seeds_Kx3, 5)[1],
                                keys(chal.seeds_Kx3[1:], 5)[0])


def test_the_main_job_keeps_a_secret_per_scenario_and_reuses_it(tmp_path):
  from absl import flags
  from absl.testing import flagsaver
  from experiments import run as run_lib
  seed_of = run_lib._training_seed  # pylint: disable=protected-access
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  scenario = tmp_path / "lo"
  secret = seed_of(str(scenario))
  assert secret >= 2**64  # 128 bits of OS entropy (fails 1 in 2^64)
  path = scenario / "training_seed"  # beside checkpoints, not in bundle/
  assert int(path.read_text()) == secret
  assert (path.stat().st_mode & 0o077) == 0  # private
  # A rerun (resume) reuses it; another scenario or workdir gets its own.
  assert seed_of(str(scenario)) == secret
  assert seed_of(str(tmp_path / "hi")) != secret
  # --training_seed, for reproducible research, is used as given.
  with flagsaver.flagsaver(training_seed=3):
    assert seed_of(str(tmp_path / "inf")) == 3
  assert not (tmp_path / "inf" / "training_seed").exists()


def test_training_runs_exactly_the_steps_accounted(monkeypatch):
  model, config, dataset, chal = _tiny_dp_setup(epochs=1)
  # A sampler that runs one step more per epoch than the accountant counts.
  monkeypatch.setattr(dp.PoissonSampler, "steps_per_epoch", property(
      lambda self: max(1, round(1 / self.sample_rate)) + 1))
  with pytest.raises(RuntimeError, match="accounted"):
    pipeline.train_models(model, config, dataset, chal, log=None)
