"""The statistics pass against direct numpy computations."""

import flax.linen as nn
import jax
import numpy as np
from scipy import special

from mico_jax import data, stats


def test_logit_scaled_confidence_equals_probability_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 7)) * 3
  labels = rng.integers(0, 7, 50)
  p = special.softmax(logits, -1)
  p_y = p[np.arange(50), labels]
  expected = np.log(p_y) - np.log(1 - p_y)
  got = stats.logit_scaled_confidence(logits, labels)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # Stays finite where p_y rounds to 1.
  assert np.isfinite(stats.logit_scaled_confidence(
      np.array([[200.0, 0.0]]), np.array([0]))).all()


def test_queries_shift_and_flip_images():
  x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
  np.testing.assert_array_equal(stats.Query(flip=True)(x), x[:, :, ::-1])
  shifted = np.asarray(stats.Query(dy=1)(x))
  np.testing.assert_array_equal(shifted[:, 1:], x[:, :-1])
  shifted = np.asarray(stats.Query(dx=-1)(x))
  np.testing.assert_array_equal(shifted[:, :, :-1], x[:, :, 1:])
  image = data.Dataset("img", x, np.zeros(2, np.int32), 2, "image", True)
  assert len(stats.default_queries(image)) == 10
  table = data.Dataset("tab", x.reshape(2, -1), np.zeros(2, np.int32), 2,
                       "tabular")
  assert stats.default_queries(table) == (stats.IDENTITY,)


class _Linear(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_compute_stats_matches_per_model_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(37, 3, 3, 1)).astype(np.float32)
  y = rng.integers(0, 5, 37).astype(np.int32)
  model = _Linear()
  params = jax.vmap(lambda k: model.init(k, x[:1]))(
      jax.random.split(jax.random.PRNGKey(0), 4))
  queries = (stats.IDENTITY, stats.Query(flip=True))
  out = stats.compute_stats(model.apply, params, x, y, queries, batch_size=16)
  assert out.stat_KxNxA.shape == (4, 37, 2)
  for k in range(4):
    p_k = jax.tree.map(lambda a, k=k: a[k], params)
    for a, query in enumerate(queries):
      logits = np.asarray(model.apply(p_k, query(x)), np.float64)
      log_p = special.log_softmax(logits, -1)[np.arange(37), y]
      np.testing.assert_allclose(out.loss_KxNxA[k, :, a], -log_p, rtol=1e-4,
                                 atol=1e-5)
    logits = np.asarray(model.apply(p_k, x))
    np.testing.assert_array_equal(out.correct_KxN[k], logits.argmax(-1) == y)
