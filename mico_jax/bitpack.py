"""The pool's inputs as training holds them: binary features bit-packed.

Training gathers a batch of rows `x_N[idx_B]` every step. XLA:CPU gathers
element by element, and for MICO's Purchase-100 MLP the gather of 512 rows of
600 floats was ~30% of a step. Purchase-100's and Location's features are all
0 or 1, so `pack` stores such a pool as bits, 32 features to a `uint32` word
(600 features: 19 words a row, 1/32 of the floats' bytes): the gather moves
~30x fewer elements and the rows are unpacked after it, by shifts and masks.
The unpacked rows are bit for bit the original ones, so training is unchanged.
Any other pool (images, token ids, non-binary features) stays as it is.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_BITS = 32


@jax.tree_util.register_pytree_node_class
class BinaryRows:
  """A pool `[N, ...]` of values 0 and 1, stored as bits.

  Indexing (`rows[idx]`: an int, an index array or a slice over the first
  axis) gives the rows as the original array's, unpacked; it works in and
  out of `jit` and `vmap`, like indexing the array.

  Attributes:
    words_NxW: `uint32`; bit j of word w holds feature `32 w + j` of the
      flattened row.
    feature_shape: a row's shape.
    dtype: the original array's dtype.
  """

  def __init__(self, words_NxW: jax.Array, feature_shape: tuple[int, ...],
               dtype: Any):
    self.words_NxW = words_NxW
    self.feature_shape = tuple(feature_shape)
    self.dtype = np.dtype(dtype)

  def tree_flatten(self):
    return (self.words_NxW,), (self.feature_shape, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.words_NxW.shape[0],) + self.feature_shape

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx) -> jax.Array:
    if isinstance(idx, tuple):
      raise TypeError("BinaryRows are indexed along their first axis only")
    words = jnp.asarray(self.words_NxW[idx])  # [..., W]: the gather
    shape = words.shape + (_BITS,)
    bits = (jnp.broadcast_to(words[..., None], shape) >>
            jax.lax.broadcasted_iota(jnp.uint32, shape, words.ndim)) & 1
    size = int(np.prod(self.feature_shape))
    flat = bits.reshape(words.shape[:-1] + (-1,))[..., :size]
    return flat.reshape(words.shape[:-1] + self.feature_shape).astype(
        self.dtype)


def is_binary(x: np.ndarray) -> bool:
  """Whether every value of a real array is 0 or 1 (not -0.0, not NaN)."""
  if not (np.issubdtype(x.dtype, np.integer) or
          np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
    return False
  return bool(np.all((x == 0) | (x == 1)) and not np.any(np.signbit(x)))


def pack(x: np.ndarray) -> "BinaryRows | np.ndarray":
  """`x` `[N, ...]` bit-packed as `BinaryRows` if all its values are 0 or 1
  (and it has features), else `x` itself (as a numpy array)."""
  x = np.asarray(x)
  if x.ndim < 2 or x.size == 0 or not is_binary(x):
    return x
  # Little bit order within bytes, little-endian bytes within words: bit j of
  # word w is feature 32 w + j on any host.
  bytes_ = np.packbits(x.reshape(len(x), -1) != 0, axis=1, bitorder="little")
  bytes_ = np.pad(bytes_, ((0, 0), (0, -bytes_.shape[1] % (_BITS // 8))))
  words_NxW = bytes_.view("<u4").astype(np.uint32)
  return BinaryRows(words_NxW, x.shape[1:], x.dtype)
