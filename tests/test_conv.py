"""`mico_jax.conv`: convolution and max pooling give lax's numbers, values and
gradients (on CPU they are computed another way)."""

import flax.linen as nn
import jax
from jax import export
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from mico_jax import conv


def _value_and_grads(f, *args):
  """f's value and its gradients for a random cotangent, jitted."""
  out = jax.eval_shape(f, *args)
  cotangent = jax.random.normal(jax.random.PRNGKey(9), out.shape)
  def run(*args):
    value, vjp = jax.vjp(f, *args)
    return value, vjp(cotangent)
  return jax.jit(run)(*args)


@pytest.mark.parametrize("shape,kernel,kwargs", [
    ((2, 12, 12, 3), (4, 4), dict(strides=2, padding=3)),  # MICO's conv1
    ((2, 7, 6, 5), (3, 3), dict(padding="VALID")),  # Winograd
    ((3, 9, 4), (3,), dict(strides=2, padding="SAME")),
], ids=["strided", "valid", "1d-same"])
def test_convolution_equals_lax(shape, kernel, kwargs):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  native = nn.Conv(6, kernel, **kwargs)
  ours = nn.Conv(6, kernel, conv_general_dilated=conv.conv_general_dilated,
                 **kwargs)
  params = jax.jit(native.init)(jax.random.PRNGKey(1), x)
  assert jax.eval_shape(ours.init, jax.random.PRNGKey(1), x) == (
      jax.eval_shape(native.init, jax.random.PRNGKey(1), x))
  expected = _value_and_grads(native.apply, params, x)
  got = _value_and_grads(ours.apply, params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), got, expected)


@pytest.mark.parametrize("shape,padding,m", [
    ((2, 7, 6, 5), "VALID", 2),  # 5 x 4 outputs: whole tiles of 2, not of 4
    ((2, 7, 6, 5), "VALID", 4),
    ((1, 9, 8, 3), "SAME", 4),  # 9 x 8
    ((2, 6, 5, 2), ((2, 1), (0, 1)), 2),  # 7 x 4
], ids=["valid-2", "valid-4", "same-4", "pairs-2"])
def test_winograd_equals_lax(shape, padding, m):
  # Outputs that are not whole tiles are computed on a padded input.
  key_x, key_w = jax.random.split(jax.random.PRNGKey(m))
  x = jax.random.normal(key_x, shape)
  w = jax.random.normal(key_w, (3, 3, shape[-1], 4))
  expected = _value_and_grads(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST), x, w)
  got = _value_and_grads(lambda x, w: conv.winograd(
      x, w, padding, m, precision=lax.Precision.HIGHEST), x, w)
  # Largest errors seen: 3e-7 (m = 2) and 3e-6 (m = 4) of the largest value.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), got, expected)


def test_winograd_tiles_mico_cnn():
  # MICO's conv2 (12 x 12 out): F(4x4); conv3 (10 x 10): F(2x2); conv1
  # (8x8, stride 2) and strided 3x3 ones: patches.
  assert conv.winograd_tile((14, 14), (3, 3), (1, 1), "VALID") == 4
  assert conv.winograd_tile((12, 12), (3, 3), (1, 1), "VALID") == 2
  assert conv.winograd_tile((32, 32), (8, 8), (2, 2), ((3, 3),) * 2) is None
  assert conv.winograd_tile((9, 9), (3, 3), (2, 2), "SAME") is None


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 9, 8, 3), (3, 3), (1, 1), "VALID"),
    ((2, 12, 12, 2), (8, 8), (2, 2), ((3, 3), (3, 3))),  # MICO's conv1
    ((3, 10, 4), (3,), (2,), "SAME"),
], ids=["valid", "strided", "1d-same"])
def test_patch_gram_equals_the_patches_gram(shape, kernel, strides, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  patches = np.asarray(conv.unfold(x, kernel, strides, padding),
                       np.float64).reshape(shape[0], -1, np.prod(kernel) *
                                           shape[-1])
  np.testing.assert_allclose(
      conv.patch_gram(x, kernel, strides, padding, lax.Precision.HIGHEST),
      np.einsum("bpd,bqd->bpq", patches, patches), rtol=1e-5, atol=1e-5)


def test_max_pool_equals_flax_with_ties():
  # Few distinct values: most windows hold their maximum more than once,
  # and all of the gradient must go where select_and_scatter puts it.
  x = jax.random.randint(jax.random.PRNGKey(0), (2, 8, 7, 3), 0, 3).astype(
      jnp.float32)
  expected = _value_and_grads(
      lambda x: nn.max_pool(x, (3, 3), strides=(1, 1)), x)
  got = _value_and_grads(lambda x: conv.max_pool(x, (3, 3)), x)
  np.testing.assert_array_equal(got[0], expected[0])
  np.testing.assert_allclose(got[1][0], expected[1][0], atol=1e-6)


def test_off_cpu_lax_convolution_and_max_pool_run():
  # Lowered for a GPU (none needed): the native ops, as before; for the
  # CPU: neither (Winograd, separable maxima).
  layer = nn.Conv(3, (3, 3), conv_general_dilated=conv.conv_general_dilated)
  x = jnp.ones((1, 6, 6, 2))
  params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
  grad = jax.jit(jax.grad(
      lambda p: conv.max_pool(layer.apply(p, x), (3, 3)).sum()))
  for platform, native in (("cuda", True), ("cpu", False)):
    text = export.export(grad, platforms=[platform])(params).mlir_module()
    assert ("stablehlo.convolution" in text) == native
    assert ("select_and_scatter" in text) == native
