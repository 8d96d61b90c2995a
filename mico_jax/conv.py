"""Convolution and max pooling as XLA:CPU runs them fast; the same numbers.

XLA:CPU runs `lax.conv_general_dilated` and its gradients on a generic
kernel well below its matrix-product speed, and a max pool's gradient
(`select_and_scatter`) slowly: MICO's CNN spent ~15-20% of its CPU step in
its one 3x3 max pool's backward pass (benchmarks/RESULTS.md). On CPU:
  - `conv_general_dilated` computes a 2D 3x3 stride-1 convolution by
    Winograd's minimal filtering F(m x m, 3 x 3) (`winograd`): each m x m
    output tile from an (m + 2)² input tile with (m + 2)² products, i.e.
    (m + 2)² batched matrix products `[B·tiles, C] x [C, O]` between
    the input and output transforms (sums of strided slices) and the
    kernel's (one small matrix product); the backward pass is the
    same products transposed in the transform domain, with the transforms'
    transposes around them (written out). m = 4 (2.25 products an output,
    not 9) where the output is whole 4 x 4 tiles, else m = 2 (4 an output;
    m = 4 on a padded output measured slower: `winograd_tile`). F(4 x 4)'s
    transforms hold 1/24 and 8: on MICO's layers it errs ~1e-5 of the
    largest value, F(2 x 2) and patches ~1e-6 (benchmarks/conv_layers.py);
  - any other channels-last, undilated, ungrouped convolution is its input
    patches (`unfold`: strided slices, whose gradient is pads and adds)
    times the kernel reshaped to a matrix, i.e. matrix products (the
    backward pass written out, so that XLA:CPU lays the kernel gradient out
    well);
  - `max_pool` takes the window maximum one axis at a time, each with the
    gradient `select_and_scatter` gives (all of it to the first maximum of
    the window, in row-major order), as elementwise passes.
On other platforms both are `lax`'s own (`lax.platform_dependent`), where
they are fast.
"""

import functools
import itertools
import operator
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


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


def patch_gram(inputs: jax.Array, kernel_size: Sequence[int],
               strides: Sequence[int], padding, precision=None) -> jax.Array:
  """Each example's Gram matrix of its patches, `unfold(...)` times its
  transpose `[B, P, P]` (P output positions), without the patches.

  Patch p holds the (padded) input at positions s·p + o for the kernel's
  offsets o, so <patch_p, patch_q> = Σ_o <x[s·p + o], x[s·q + o]>: the Gram
  matrix of the input's positions (`[S, S]`, contracting C, not prod(kernel)
  · C), summed over the offsets one axis at a time. Cheaper than the
  patches' own where S² · C < P² · prod(kernel) · C.
  """
  pads = _pads(padding, inputs.shape[1:-1], kernel_size, strides)
  x = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
  batch, *spatial, channels = x.shape
  rank = len(spatial)
  flat = x.reshape(batch, -1, channels)
  gram = lax.dot_general(flat, flat, (((2,), (2,)), ((0,), (0,))),
                         precision=precision).reshape(batch, *spatial,
                                                      *spatial)
  positions = 1
  for axis, (k, s, n) in enumerate(zip(kernel_size, strides, spatial)):
    out = (n - k) // s + 1
    positions *= out
    take = lambda a, o, d, s=s, out=out: lax.slice_in_dim(
        a, o, o + s * (out - 1) + 1, s, d)
    gram = functools.reduce(operator.add, [
        take(take(gram, o, 1 + axis), o, 1 + rank + axis) for o in range(k)])
  return gram.reshape(batch, positions, positions)


def channels_last(rank: int) -> lax.ConvDimensionNumbers:
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
  """`lax.conv_general_dilated`, as Winograd or patches times kernel on CPU.

  For `nn.Conv(..., conv_general_dilated=conv_general_dilated)`: parameters
  and results are those of `lax.conv_general_dilated` (to float rounding).
  Only channels-last, undilated, ungrouped convolutions (flax's) take
  another path (`winograd` where `winograd_tile` says, else patches), and
  only on CPU; anything else is `lax`'s.
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
  if (dims != channels_last(rank) or not undilated or feature_group_count != 1
      or kwargs.get("batch_group_count", 1) != 1):
    return native(lhs, rhs)

  if not isinstance(padding, str):
    padding = tuple(map(tuple, padding))
  tile = winograd_tile(lhs.shape[1:-1], rhs.shape[:-2], window_strides,
                       padding)
  if tile:
    cpu = functools.partial(winograd, padding=padding, m=tile,
                            precision=precision)
  else:
    cpu = functools.partial(_patches_times_kernel,
                            geometry=(tuple(window_strides), padding),
                            precision=precision)
  return lax.platform_dependent(lhs, rhs, cpu=cpu, default=native)


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


# Winograd's minimal filtering F(m, 3) (Lavin & Gray 2016): m outputs of a
# 3-tap correlation from m + 2 inputs with m + 2 products,
# y = Aᵀ[(G w) ⊙ (Bᵀ x)]; nested over two axes, (m + 2)² products for m²
# outputs instead of 9 m². Matrices (Bᵀ, G, Aᵀ) for the points 0, ±1 (m = 2)
# and 0, ±1, ±2 (m = 4), each with the point at infinity.
_WINOGRAD = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
         (0, 1, -1, 8, -8, 1))),
}


def _combine(parts: Sequence[jax.Array], matrix) -> list[jax.Array]:
  """`Σ_p matrix[i][p] · parts[p]` for each row i, zero terms skipped."""
  def term(c, part):
    return part if c == 1 else -part if c == -1 else c * part
  return [functools.reduce(operator.add,
                           [term(c, p) for c, p in zip(row, parts) if c])
          for row in matrix]


def _transposed(matrix):
  return tuple(zip(*matrix))


def _input_transform(x, m: int) -> jax.Array:
  """Bᵀ d B of each (m + 2)² input tile d, tiles m apart:
  `[B, m·th + 2, m·tw + 2, C]` -> `[(m + 2)², B·th·tw, C]`."""
  bt = _WINOGRAD[m][0]
  th, tw = (x.shape[1] - 2) // m, (x.shape[2] - 2) // m
  # One stack per axis (not one of (m + 2)² parts): XLA:CPU then writes
  # each stage in one pass, ~3% of a CNN step.
  rows = jnp.stack(_combine([x[:, p:p + m * th:m] for p in range(m + 2)], bt))
  v = jnp.stack(_combine([rows[:, :, :, q:q + m * tw:m]
                          for q in range(m + 2)], bt), 1)
  return v.reshape((m + 2) ** 2, -1, x.shape[-1])


def _overlap_add(parts: Sequence[jax.Array], m: int, axis: int) -> jax.Array:
  """`out[m·i + p] = Σ parts[p][i]` along `axis` (tiles m apart, m + 2 long):
  the transpose of taking the tiles."""
  pad = lambda a, lo: jnp.pad(a, [(lo, 1 - lo) if d == axis else (0, 0)
                                  for d in range(a.ndim)])
  cols = [pad(parts[r], 0) + pad(parts[m + r], 1) if r < 2 else
          pad(parts[r], 0) for r in range(m)]
  out = jnp.stack(cols, axis + 1)
  shape = list(parts[0].shape)
  shape[axis] = m * (shape[axis] + 1)
  return lax.slice_in_dim(out.reshape(shape), 0,
                          m * parts[0].shape[axis] + 2, axis=axis)


def _input_transform_t(v, m: int, shape) -> jax.Array:
  """The transpose of `_input_transform` (`shape`: its input's)."""
  b = _transposed(_WINOGRAD[m][0])
  batch, h, w, c = shape
  v = v.reshape(m + 2, m + 2, batch, (h - 2) // m, (w - 2) // m, c)
  rows = [_overlap_add(_combine(list(vi), b), m, 2) for vi in v]
  return _overlap_add(_combine(rows, b), m, 1)


def _output_transform(mm, m: int, tiles) -> jax.Array:
  """Aᵀ M A of each tile: `[(m + 2)², B·th·tw, O]` -> `[B, m·th, m·tw, O]`."""
  at = _WINOGRAD[m][2]
  batch, th, tw = tiles
  mm = mm.reshape(m + 2, m + 2, batch, th, tw, -1)
  rows = _combine(list(mm), at)
  y = jnp.stack([jnp.stack(_combine(list(r), at), 3) for r in rows], 2)
  return y.reshape(batch, m * th, m * tw, -1)


def _output_transform_t(g, m: int) -> jax.Array:
  """The transpose of `_output_transform` (one stack per axis, as
  `_input_transform`)."""
  a = _transposed(_WINOGRAD[m][2])
  batch, h, w, o = g.shape
  g = g.reshape(batch, h // m, m, w // m, m, o)
  rows = jnp.stack(_combine([g[:, :, r] for r in range(m)], a))
  dm = jnp.stack(_combine([rows[:, :, :, :, s] for s in range(m)], a), 1)
  return dm.reshape((m + 2) ** 2, -1, o)


def _kernel_matrix(m: int) -> np.ndarray:
  """G ⊗ G `[(m + 2)², 9]`: G w Gᵀ of a 3x3 kernel w, flattened row-major,
  is this matrix times w's 9 taps."""
  g = np.array(_WINOGRAD[m][1], np.float32)
  return np.kron(g, g)


def _kernel_transform(rhs, m: int, precision=None) -> jax.Array:
  """G w Gᵀ: `[3, 3, C, O]` -> `[(m + 2)², C, O]`, as one product
  `[(m + 2)², 9] x [9, C·O]` (a stack of sums of the 9 taps took ~2% more
  of a CNN step: benchmarks/RESULTS.md)."""
  return jnp.matmul(_kernel_matrix(m), rhs.reshape(9, -1),
                    precision=precision).reshape(-1, *rhs.shape[2:])


def _kernel_transform_t(u, m: int, precision=None) -> jax.Array:
  """The transpose of `_kernel_transform`."""
  return jnp.matmul(_kernel_matrix(m).T, u.reshape(u.shape[0], -1),
                    precision=precision).reshape(3, 3, *u.shape[1:])


_BATCHED = ((0,), (0,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_valid(lhs, rhs, m, precision):
  """The VALID 3x3 convolution of `lhs` `[B, m·th + 2, m·tw + 2, C]`."""
  return _winograd_fwd(lhs, rhs, m, precision)[0]


def _winograd_fwd(lhs, rhs, m, precision):
  v = _input_transform(lhs, m)
  u = _kernel_transform(rhs, m, precision)
  mm = lax.dot_general(v, u, (((2,), (1,)), _BATCHED), precision=precision)
  tiles = (lhs.shape[0], (lhs.shape[1] - 2) // m, (lhs.shape[2] - 2) // m)
  return _output_transform(mm, m, tiles), (v, u)


def _winograd_bwd(m, precision, residuals, g):
  v, u = residuals
  batch, h, w, _ = g.shape
  dm = _output_transform_t(g, m)
  dv = lax.dot_general(dm, u, (((2,), (2,)), _BATCHED), precision=precision)
  if m == 4:
    # Vᵀ·dM with Vᵀ materialised: XLA:CPU sends a product to YNNPACK only
    # where its left operand contracts its last axis, and contracting the
    # rows of both runs on a generic kernel, slow on F(4x4)'s 36 products
    # of few rows (~2% of a CNN step); the barrier keeps XLA from folding
    # the transpose back. F(2x2)'s 16 longer products gained nothing (on
    # MICO's conv3 2.5x conv2's bytes to transpose): benchmarks/RESULTS.md.
    v_t = lax.optimization_barrier(jnp.swapaxes(v, 1, 2))
    du = lax.dot_general(v_t, dm, (((2,), (1,)), _BATCHED),
                         precision=precision)
  else:
    du = lax.dot_general(v, dm, (((1,), (1,)), _BATCHED), precision=precision)
  return (_input_transform_t(dv, m, (batch, h + 2, w + 2, v.shape[-1])),
          _kernel_transform_t(du, m, precision))


_winograd_valid.defvjp(_winograd_fwd, _winograd_bwd)


def _pads_and_output_3x3(spatial: Sequence[int], padding
                         ) -> tuple[list[tuple[int, int]], list[int]]:
  """A stride-1 3x3 convolution's padding pairs and output size."""
  pads = _pads(padding, spatial, (3, 3), (1, 1))
  return pads, [n + lo + hi - 2 for n, (lo, hi) in zip(spatial, pads)]


def winograd_tile(spatial: Sequence[int], kernel_size: Sequence[int],
                  strides: Sequence[int], padding) -> int | None:
  """The output tile m of the Winograd F(m x m, 3 x 3) a convolution takes
  on CPU, or None (patches): 2D, 3x3, stride 1 only. m = 4 (2.25 products
  an output) where the output is whole 4 x 4 tiles, else m = 2 (4 products
  an output): F(4 x 4) on a padded output wastes what it saves."""
  if tuple(kernel_size) != (3, 3) or tuple(strides) != (1, 1):
    return None
  _, out = _pads_and_output_3x3(spatial, padding)
  return 4 if all(o % 4 == 0 for o in out) else 2


def winograd(lhs: jax.Array, rhs: jax.Array, padding, m: int,
             precision=None) -> jax.Array:
  """A stride-1 3x3 convolution (NHWC, HWIO) by Winograd's F(m x m, 3 x 3).

  `padding`: "SAME", "VALID" or (low, high) pairs. The input is padded to
  whole tiles (the extra outputs are dropped).
  """
  pads, out = _pads_and_output_3x3(lhs.shape[1:3], padding)
  extra = [-(-o // m) * m - o for o in out]
  x = lax.pad(lhs, jnp.zeros((), lhs.dtype),
              [(0, 0, 0)] + [(lo, hi + e, 0) for (lo, hi), e in
                             zip(pads, extra)] + [(0, 0, 0)])
  return _winograd_valid(x, rhs, m, precision)[:, :out[0], :out[1]]


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
