"""Convolution and max pooling as XLA:CPU runs them fast; the same numbers.

XLA:CPU runs `lax.conv_general_dilated` and its gradients on a generic
kernel well below its matrix-product speed, and a max pool's gradient
(`select_and_scatter`) slowly: MICO's CNN spent ~15-20% of its CPU step in
its one 3x3 max pool's backward pass (benchmarks/RESULTS.md). On CPU:
  - `conv_general_dilated` computes a convolution as its input patches
    (`unfold`: strided slices, whose gradient is pads and adds) times the
    kernel reshaped to a matrix, i.e. matrix products (the backward pass
    written out, so that XLA:CPU lays the kernel gradient out well);
  - `max_pool` takes the window maximum one axis at a time, each with the
    gradient `select_and_scatter` gives (all of it to the first maximum of
    the window, in row-major order), as elementwise passes.
On other platforms both are `lax`'s own (`lax.platform_dependent`), where
they are fast.
"""

import functools
import itertools
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


def _pads(padding, spatial: Sequence[int], kernel: Sequence[int],
          strides: Sequence[int]) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return lax.padtype_to_pads(spatial, kernel, strides, padding)
  return [tuple(p) for p in padding]


def unfold(inputs: jax.Array, kernel_size: Sequence[int],
           strides: Sequence[int], padding) -> jax.Array:
  """A convolution's input patches `[B, *out_spatial, prod(kernel) · C]`.

  `inputs` is channels-last `[B, *spatial, C]`; `padding` is "SAME",
  "VALID" or one (low, high) pair per spatial axis. Features in the kernel's
  order (offsets, then channels), so the convolution is these patches times
  the kernel reshaped to `[prod(kernel) · C, O]`. Built from strided slices:
  their gradient is padding and adding, fast anywhere, where
  `lax.conv_general_dilated_patches` is a grouped convolution.
  """
  pads = _pads(padding, inputs.shape[1:-1], kernel_size, strides)
  x = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
  out = [(n - k) // s + 1
         for n, k, s in zip(x.shape[1:-1], kernel_size, strides)]
  return jnp.concatenate([
      x[(slice(None),) + tuple(slice(o, o + s * (n - 1) + 1, s)
                               for o, s, n in zip(offsets, strides, out))]
      for offsets in itertools.product(*map(range, kernel_size))], -1)


def _channels_last(rank: int) -> lax.ConvDimensionNumbers:
  """NHWC / HWIO / NHWC (flax's layout) for `rank` spatial axes."""
  return lax.ConvDimensionNumbers(
      (0, rank + 1) + tuple(range(1, rank + 1)),
      (rank + 1, rank) + tuple(range(rank)),
      (0, rank + 1) + tuple(range(1, rank + 1)))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated`, as patches times kernel on CPU.

  For `nn.Conv(..., conv_general_dilated=conv_general_dilated)`: parameters
  and results are those of `lax.conv_general_dilated` (to float rounding).
  Only channels-last, undilated, ungrouped convolutions (flax's) take the
  patches path, and only on CPU; anything else is `lax`'s.
  """
  rank = rhs.ndim - 2
  native = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  undilated = all(d == 1 for d in (*(lhs_dilation or ()),
                                   *(rhs_dilation or ())))
  if (dims != _channels_last(rank) or not undilated or feature_group_count != 1
      or kwargs.get("batch_group_count", 1) != 1):
    return native(lhs, rhs)

  if not isinstance(padding, str):
    padding = tuple(map(tuple, padding))
  patches = functools.partial(_patches_times_kernel,
                              geometry=(tuple(window_strides), padding),
                              precision=precision)
  return lax.platform_dependent(lhs, rhs, cpu=patches, default=native)


def _unfold_times_kernel(lhs, rhs, geometry, precision):
  """`unfold(lhs)` times `rhs` reshaped to `[D, O]`, and the patches."""
  strides, padding = geometry
  x = unfold(lhs, rhs.shape[:-2], strides, padding)
  return jnp.einsum("b...d,do->b...o", x, rhs.reshape(-1, rhs.shape[-1]),
                    precision=precision), x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _patches_times_kernel(lhs, rhs, geometry, precision):
  """The convolution as its input patches times the kernel."""
  return _unfold_times_kernel(lhs, rhs, geometry, precision)[0]


def _patches_fwd(lhs, rhs, geometry, precision):
  out, x = _unfold_times_kernel(lhs, rhs, geometry, precision)
  return out, (lhs, rhs, x)


def _patches_bwd(geometry, precision, residuals, g):
  strides, padding = geometry
  lhs, rhs, x = residuals
  kernel_DxO = rhs.reshape(-1, rhs.shape[-1])
  # The kernel gradient transposed, gᵀ·patches, contracting the rows of
  # both in place; the barrier keeps XLA:CPU from turning it into
  # patchesᵀ·gᵀ with a transposed copy of g, ~8% slower a CNN step.
  grad_OxD = lax.optimization_barrier(lax.dot_general(
      g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]),
      (((0,), (0,)), ((), ())), precision=precision))
  # The input gradient: the patches' gradient folded back (pads and adds).
  _, fold = jax.vjp(lambda v: unfold(v, rhs.shape[:-2], strides, padding),
                    lhs)
  (grad_lhs,) = fold(jnp.einsum("b...o,do->b...d", g, kernel_DxO,
                                precision=precision))
  return grad_lhs, grad_OxD.T.reshape(rhs.shape)


_patches_times_kernel.defvjp(_patches_fwd, _patches_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _window_max(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Maximum over windows of `size` along `axis`, stride 1, no padding."""
  n = x.shape[axis] - size + 1
  return functools.reduce(jnp.maximum, [
      lax.slice_in_dim(x, j, j + n, axis=axis) for j in range(size)])


def _window_max_fwd(x, axis, size):
  out = _window_max(x, axis, size)
  return out, (x, out)


def _window_max_bwd(axis, size, residuals, g):
  # All of a window's gradient to its first maximum, as select_and_scatter.
  x, out = residuals
  n = out.shape[axis]
  taken = jnp.zeros(out.shape, bool)
  grad = jnp.zeros(x.shape, g.dtype)
  for j in range(size):
    hit = (lax.slice_in_dim(x, j, j + n, axis=axis) == out) & ~taken
    taken |= hit
    pads = [(0, 0, 0)] * x.ndim
    pads[axis] = (j, size - 1 - j, 0)
    grad += lax.pad(jnp.where(hit, g, 0), jnp.zeros((), g.dtype), pads)
  return (grad,)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def max_pool(inputs: jax.Array, window: Sequence[int]) -> jax.Array:
  """`nn.max_pool(inputs, window, strides=1)` (padding "VALID"), and its
  gradient, as elementwise passes on CPU.

  The window maximum is taken over the last spatial axis first, then the
  ones before: all of each window's gradient goes to the first maximum of
  its row-major order (the first row holding the maximum, then its first
  column), as `select_and_scatter` gives it.
  """
  def separable(x):
    for axis in reversed(range(1, x.ndim - 1)):
      x = _window_max(x, axis, window[axis - 1])
    return x

  def native(x):
    return nn.max_pool(x, tuple(window), strides=(1,) * len(window))

  return lax.platform_dependent(inputs, cpu=separable, default=native)
