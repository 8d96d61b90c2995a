"""Dense layers' custom VJP: the gradients of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import models


def test_mlp_gradients_are_those_of_the_plain_formula():
  model = models.MLP(5, (16, 8))
  key_x, key_p = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key_x, (12, 2, 7))  # flattened to 14 features
  y = jnp.arange(12) % 5
  params = model.init(key_p, x)

  def plain(p, x):
    """The MLP written out with `@`, no custom VJP."""
    h = x.reshape(x.shape[0], -1)
    layers = p["params"]
    dense = lambda h, name: (h @ layers[name]["kernel"] +
                             layers[name]["bias"][None])
    for name in ("Dense_0", "Dense_1"):
      h = jnp.tanh(dense(h, name))
    return dense(h, "Dense_2")

  def loss(apply_fn):
    return lambda p, x1, y1: models.cross_entropy(apply_fn(p, x1), y1).sum()

  both = jax.jit(lambda p: [
      jax.grad(loss(model.apply))(p, x, y),
      jax.grad(loss(plain))(p, x, y),
      # Per-example gradients, as DP-SGD's fallback takes them.
      jax.vmap(jax.grad(loss(model.apply)), (None, 0, 0))(
          p, x[:, None], y[:, None]),
      jax.vmap(jax.grad(loss(plain)), (None, 0, 0))(p, x[:, None],
                                                     y[:, None])])
  got, want, got_B, want_B = both(params)
  np.testing.assert_allclose(model.apply(params, x), plain(params, x),
                             rtol=1e-6, atol=1e-6)
  for g, w in zip(jax.tree.leaves((got, got_B)), jax.tree.leaves(
      (want, want_B))):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_weight_gradient_and_dense_dot_general_on_any_rows():
  rng = np.random.default_rng(0)
  a, g = rng.normal(size=(37, 9)), rng.normal(size=(37, 4))
  got = jax.jit(models.weight_gradient)(a.astype(np.float32),
                                        g.astype(np.float32))
  np.testing.assert_allclose(got, a.T @ g, rtol=1e-5, atol=1e-5)
  # Inputs with positions `[B, P, D]`: the rows are (b, p); a product over
  # other axes is `lax.dot_general`'s, gradients included.
  x = jnp.asarray(rng.normal(size=(3, 5, 9)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
  dense = (((2,), (0,)), ((), ()))
  other = (((1,), (1,)), ((0,), (0,)))
  v = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  for dims, rhs in ((dense, w), (other, v)):
    grads = [jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k, dims))), (0, 1))(
        x, rhs) for f in (models.dense_dot_general, jax.lax.dot_general)]
    for got, want in zip(*grads):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
