"""White-box statistics against a direct per-example computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import whitebox
from mico_jax.models import cross_entropy


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(jnp.tanh(nn.Dense(8)(x)))


def test_whitebox_equals_per_example_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5)).astype(np.float32)
  y = rng.integers(0, 4, 7).astype(np.int32)
  model = _MLP()
  params = jax.vmap(lambda k: model.init(k, x[:1]))(
      jax.random.split(jax.random.key(0), 2))
  out = whitebox.compute_whitebox(model.apply, params, x, y, lr=0.5,
                                  batch_size=4)
  assert out.neg_log_grad_norm_KxNx1.shape == (2, 7, 1)
  for k in range(2):
    p = jax.tree.map(lambda a, k=k: a[k], params)
    for i in range(7):
      loss = lambda q, i=i: cross_entropy(model.apply(q, x[i:i + 1]),
                                          y[i:i + 1])[0]
      g = jax.grad(loss)(p)
      norm = np.sqrt(sum(float(np.sum(np.square(l)))
                         for l in jax.tree.leaves(g)))
      stepped = jax.tree.map(lambda a, b: a - 0.5 * b, p, g)
      drop = float(loss(p) - loss(stepped))
      np.testing.assert_allclose(out.neg_log_grad_norm_KxNx1[k, i, 0],
                                 -np.log(norm), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(out.neg_loss_drop_KxNx1[k, i, 0], -drop,
                                 rtol=1e-3, atol=1e-5)
