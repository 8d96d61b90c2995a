"""DP-SGD: clipping equals the naive per-example computation, and the statistics
(influence <= C, noise std = σC, sampling rate = q) hold."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from mico_jax import accounting, challenge, data, dp, models, pipeline, train


class _Mixed(nn.Module):
  """Every ghost-norm case at once: a dense layer over positions called twice
  (shared weights), a strided 1-D convolution with SAME padding, and a
  LayerNorm, whose parameters take the vmap(grad) fallback."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], 4, 3)
    shared = nn.Dense(2)
    h = jnp.tanh(shared(x)) + shared(x[:, ::-1])
    h = nn.Conv(5, (3,), strides=2, padding="SAME")(h)
    h = nn.LayerNorm()(h)
    return nn.Dense(3)(h.reshape(h.shape[0], -1))


def _batch(model, shape, num_classes, seed=0):
  key_x, key_p = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(key_x, shape)
  y = jnp.arange(shape[0]) % num_classes
  return model.init(key_p, x), x, y


def _clipped(model, params, x, y, mask, clip_norm, method):
  return jax.jit(lambda p, m: dp.clipped_grad_sum(
      model.apply, p, x, y, m, clip_norm, method))(params, mask)


@pytest.mark.parametrize("model,shape,num_classes,methods", [
    (models.MLP(5, (16, 8)), (6, 7), 5, ("ghost", "naive")),
    (models.CNN(10), (3, 16, 16, 3), 10, ("ghost",)),
    (_Mixed(), (5, 12), 3, ("ghost",)),
], ids=["mlp", "cnn", "mixed"])
def test_ghost_clipping_equals_naive_per_example_gradients(model, shape,
                                                          num_classes,
                                                          methods):
  params, x, y = _batch(model, shape, num_classes)
  mask = jnp.arange(shape[0]) < shape[0] - 1  # the last one is padding
  # Per-example gradients by hand, the definition.
  def loss_one(p, x1, y1):
    logits = model.apply(p, x1[None])
    return models.cross_entropy(logits, y1[None])[0]
  grads_B = jax.jit(jax.vmap(jax.grad(loss_one), (None, 0, 0)))(params, x, y)
  norms_B = np.sqrt(sum(np.sum(np.asarray(g).reshape(shape[0], -1) ** 2, 1)
                        for g in jax.tree.leaves(grads_B)))
  # Clip about half of them.
  clip_norm = float(np.median(norms_B))
  weight_B = np.where(np.asarray(mask),
                      np.minimum(1, clip_norm / norms_B), 0)
  expected = jax.tree.map(lambda g: np.tensordot(weight_B, g, 1), grads_B)
  for method in methods:
    _, grads, norms = _clipped(model, params, x, y, mask, clip_norm, method)
    np.testing.assert_allclose(norms, norms_B, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=2e-4, atol=1e-6 * np.abs(b).max()), grads, expected)


def test_convolutions_ghost_norms_equal_instantiated_gradients(monkeypatch):
  # Convolutions' clipped sums come from instantiated per-example kernel
  # gradients (the naive comparison above covers them) unless those exceed a
  # memory bound: then ghost norms and one product, which must agree.
  model = models.CNN(10, (4, 6, 6))
  params, x, y = _batch(model, (5, 16, 16, 3), 10)
  mask = jnp.arange(5) < 4
  results = [_clipped(model, params, x, y, mask, 0.5, "ghost")]
  monkeypatch.setattr(dp, "_INSTANTIATE_FLOATS", 0)
  results.append(_clipped(model, params, x, y, mask, 0.5, "ghost"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=2e-5, atol=1e-6 * np.abs(b).max()), *results)


@pytest.mark.parametrize("chunk_size,head_size", [
    (4, 0), (5, 0), (16, 0), (4, 3), (2, 8), (4, 11)])
def test_chunked_sum_equals_the_whole_batch(chunk_size, head_size):
  model = models.MLP(4, (8,))
  params, x_N, y_N = _batch(model, (20, 6), 4, seed=2)
  idx_B = jnp.asarray(np.random.default_rng(0).permutation(20)[:11])
  # Under vmap, models with different batch sizes share the loop: Poisson
  # prefixes of 0 to 11 rows, and a mask with holes.
  masks_MxB = jnp.stack([jnp.arange(11) < b for b in (0, 3, 5, 11)] +
                        [jnp.arange(11) % 3 == 1])
  losses_MxB, expected, _ = jax.vmap(lambda m: dp.clipped_grad_sum(
      model.apply, params, x_N[idx_B], y_N[idx_B], m, 1.0))(masks_MxB)
  for method in ("ghost", "naive"):
    loss_sums_M, sums = jax.jit(jax.vmap(
        lambda m, method=method: dp.chunked_clipped_grad_sum(
            model.apply, params, x_N, y_N, idx_B, m, 1.0, chunk_size,
            head_size, method)))(masks_MxB)
    np.testing.assert_allclose(
        loss_sums_M, jnp.sum(jnp.where(masks_MxB, losses_MxB, 0), 1),
        rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-6),
                 sums, expected)
    assert all(np.all(np.asarray(g)[0] == 0) for g in jax.tree.leaves(sums))


def test_each_example_moves_the_sum_by_at_most_c():
  model = models.MLP(4, (32,))
  params, x, y = _batch(model, (16, 10), 4, seed=1)
  x = x * jnp.arange(1, 17)[:, None]  # norms from below to far above C
  clip_norm = 6.0
  # Row 0: every example; row 1 + b: all but example b.
  masks = jnp.concatenate([jnp.ones((1, 16), bool), ~jnp.eye(16, dtype=bool)])
  _, sums, norms_MxB = jax.jit(jax.vmap(lambda m: dp.clipped_grad_sum(
      model.apply, params, x, y, m, clip_norm)))(masks)
  norms = np.asarray(norms_MxB[0])
  assert (norms < clip_norm).any() and (norms > 1.5 * clip_norm).any()
  diff_sq = sum(np.sum((np.asarray(s)[:1] - np.asarray(s)[1:]).reshape(16, -1)
                       ** 2, 1) for s in jax.tree.leaves(sums))
  # Exactly the example's clipped gradient: its norm, capped at C.
  np.testing.assert_allclose(np.sqrt(diff_sq), np.minimum(norms, clip_norm),
                             rtol=1e-4)
  assert np.sqrt(diff_sq).max() <= clip_norm * (1 + 1e-5)


def test_noise_has_std_sigma_c_and_is_independent_per_model():
  model = models.MLP(10, (256,))
  params, x, y = _batch(model, (8, 40), 10)
  sigma, clip_norm, expected_batch = 1.7, 2.6, 37.5
  gradient = dp.DPGradient(clip_norm, sigma, expected_batch)
  nothing = jnp.zeros(8, bool)  # an empty batch: the update is pure noise
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  _, noise = jax.jit(jax.vmap(
      lambda k: gradient(model.apply, params, x, y, jnp.arange(8), nothing,
                         k)))(keys)
  noise_2xP = np.concatenate(
      [np.asarray(g).reshape(2, -1) for g in jax.tree.leaves(noise)], 1)
  noise_2xP *= expected_batch
  assert noise_2xP.shape[1] > 13000
  # std error of the std estimate is ~1/sqrt(2P) < 0.7%, so 3% is > 4 sd.
  np.testing.assert_allclose(noise_2xP.std(1), sigma * clip_norm, rtol=0.03)
  np.testing.assert_allclose(noise_2xP.mean(1), 0, atol=0.1 * sigma)
  assert abs(np.corrcoef(noise_2xP)[0, 1]) < 0.05
  # Every leaf is noised, not just some.
  assert all(np.asarray(g).std() > 0 for g in jax.tree.leaves(noise))


@pytest.mark.parametrize("size", [7, 1000])
def test_noise_and_sampler_words_are_jax_randoms_bit_for_bit(size):
  """The unrolled threefry draws exactly `jax.random`'s numbers (original
  counter layout), under vmap too: only their compiled form is ours."""
  keys = jax.random.split(jax.random.PRNGKey(size), 3)
  with jax.threefry_partitionable(False):
    want_bits = jax.vmap(lambda k: jax.random.bits(k, (size,)))(keys)
    want_normal = jax.vmap(lambda k: jax.random.normal(k, (size,)))(keys)
  got_bits, got_normal = jax.jit(jax.vmap(
      lambda k: (dp._random_bits(k, size), dp._normal(k, size))))(keys)
  np.testing.assert_array_equal(got_bits, want_bits)
  np.testing.assert_array_equal(got_normal, want_normal)


def test_kernel_gradient_is_the_product_over_rows():
  # The clipped sum's kernel product, however laid out, is a_RxDᵀ g_RxO.
  rng = np.random.default_rng(0)
  for rows, d, o in ((37, 9, 4), (5, 3, 12)):
    a, g = rng.normal(size=(rows, d)), rng.normal(size=(rows, o))
    got = jax.jit(dp._kernel_gradient)(a.astype(np.float32),
                                       g.astype(np.float32))
    np.testing.assert_allclose(got, a.T @ g, rtol=1e-5, atol=1e-5)


def test_poisson_sampler_realises_rate_q_for_every_point():
  n, q, steps = 1000, 0.05, 2000
  capacity = accounting.batch_capacity(n, q, steps, 1e-9)
  sampler = dp.PoissonSampler(n, q, capacity)
  key = jax.random.PRNGKey(0)
  _, positions_SxB, mask_SxB = jax.jit(jax.vmap(
      lambda s: sampler.sample((), key, s)))(jnp.arange(steps))
  positions_SxB, mask_SxB = np.asarray(positions_SxB), np.asarray(mask_SxB)
  sizes_S = mask_SxB.sum(1)
  assert sizes_S.max() < capacity  # never truncated here
  # Realised rate: std error sqrt(q(1-q)/(n steps)) ~ 1.5e-4.
  np.testing.assert_allclose(sizes_S.mean() / n, q, atol=6e-4)
  # Batch sizes are Binomial(n, q), not fixed: variance n q (1 - q).
  np.testing.assert_allclose(sizes_S.var(), n * q * (1 - q), rtol=0.15)
  # Each point is in Binomial(steps, q) batches, first and last included.
  counts_N = np.bincount(positions_SxB[mask_SxB], minlength=n)
  sd = np.sqrt(steps * q * (1 - q))
  assert np.abs(counts_N - steps * q).max() < 5 * sd
  chi2 = ((counts_N - steps * q) ** 2).sum() / sd ** 2
  assert 1e-4 < scipy_stats.chi2.sf(chi2, n - 1) < 1 - 1e-4
  # No point twice in a batch.
  for positions, mask in zip(positions_SxB[:50], mask_SxB[:50]):
    assert len(set(positions[mask])) == mask.sum()


def test_poisson_sampler_truncates_to_capacity_and_handles_q_one():
  key = jax.random.PRNGKey(1)
  _, positions, mask = dp.PoissonSampler(100, 0.5, 10).sample((), key, 0)
  assert np.asarray(mask).all()
  assert (np.diff(np.asarray(positions)) > 0).all()
  _, positions, mask = dp.PoissonSampler(7, 1.0, 9).sample((), key, 3)
  np.testing.assert_array_equal(np.asarray(positions)[np.asarray(mask)],
                                np.arange(7))


def test_calibration_hits_target_epsilon_and_bounds_overflow():
  config = dp.DPConfig(epsilon=4.0, delta=1e-5, clip_norm=2.6)
  mech = dp.calibrate(config, 900, 225, 40)
  assert mech.sample_rate == 0.25 and mech.steps == 160
  assert mech.expected_batch_size == 225
  spent = mech.epsilon()
  assert 3.96 <= spent <= 4.0
  overflow = accounting.overflow_probability(900, 0.25, 160, mech.capacity)
  assert overflow > 0  # the bound is not vacuous: truncation is possible
  assert accounting.delta_with_overflow(spent, mech.poisson_delta,
                                        overflow) <= config.delta
  # Fewer steps spend less.
  assert mech.epsilon(40) < 0.7 * spent


def test_sample_rate_rules_follow_mico_scripts():
  # train_cifar10.py / train_purchase100.py: q = 1 / len(train_loader);
  # train_sst2.py: q = B / n. Both take ceil(n / B) steps an epoch.
  steps_rule = dp.calibrate(dp.DPConfig(10.0), 150_000, 512, 2)
  assert steps_rule.sample_rate == 1 / 293 and steps_rule.steps == 2 * 293
  batch_rule = dp.calibrate(dp.DPConfig(10.0, sample_rate_rule="batch"),
                            67_349, 1024, 3)
  assert batch_rule.sample_rate == 1024 / 67_349
  assert batch_rule.steps == 3 * 66  # train_sst2.py: ceil(1 / q) * epochs
  with pytest.raises(dp.DPError, match="sample_rate_rule"):
    dp.DPConfig(4.0, sample_rate_rule="opacus")


def test_poisson_trainer_takes_the_recipes_steps_per_epoch():
  # q = B / n = 128 / 1950: round(1 / q) = round(15.23) would take 15 steps
  # an epoch; MICO's scripts take ceil(n / B) = 16.
  config = train.TrainConfig("adam", 1e-3, batch_size=128, epochs=2,
                             dp=dp.DPConfig(4.0, 1e-5, 0.1, "batch"))
  trainer = pipeline.make_trainer(models.MLP(3, (4,)), config, 1950)
  assert trainer.sampler.sample_rate == 128 / 1950
  assert trainer.sampler.steps_per_epoch == 16


def test_dp_training_together_equals_each_model_alone():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 12)).astype(np.float32)
  y = x[:, :3].argmax(1).astype(np.int32)
  dataset = data.Dataset("toy", x, y, 3, "tabular")
  chal = challenge.make_challenge(300, 120, 20, challenge.make_seeds(2, 3))
  config = train.TrainConfig("sgd", 0.5, batch_size=30, epochs=2,
                             dp=dp.DPConfig(4.0, 1e-5, 1.0))
  model = models.MLP(3, (16,))
  together = pipeline.train_models(model, config, dataset, chal, log=None)
  # Model 1 alone: its own samples and noise, whatever its neighbours do.
  alone = pipeline.train_models(model, config, dataset, chal.select([1]),
                                log=None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a[1], b[0], rtol=1e-5, atol=1e-6), together, alone)
  leaf = jax.tree.leaves(together)[0]
  assert not np.allclose(leaf[0], leaf[1])


@pytest.mark.parametrize("kwargs,message", [
    ({"epsilon": 0.0}, "epsilon"),
    ({"epsilon": -1.0}, "epsilon"),
    ({"epsilon": float("inf")}, "epsilon"),
    ({"epsilon": 4.0, "delta": 0.0}, "delta"),
    ({"epsilon": 4.0, "delta": 1.0}, "delta"),
    ({"epsilon": 4.0, "clip_norm": 0.0}, "clip_norm"),
    ({"epsilon": 4.0, "clip_norm": -2.6}, "clip_norm"),
])
def test_bad_privacy_parameters_are_refused(kwargs, message):
  with pytest.raises(dp.DPError, match=message):
    dp.DPConfig(**kwargs)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_bad_sample_rates_are_refused(rate):
  with pytest.raises(dp.DPError, match="sample_rate"):
    dp.PoissonSampler(100, rate, 10)


def test_unreachable_target_is_a_dp_error():
  with pytest.raises(dp.DPError, match="cannot calibrate"):
    dp.calibrate(dp.DPConfig(1e-6), 900, 225, 40)
