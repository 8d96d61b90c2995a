"""MICO's models in flax, initialised as PyTorch does so recipes carry over.

Each module maps a batch `[B, ...]` to logits `[B, C]`; a stack of K models is
`jax.vmap(model.apply)` over parameters with a leading models axis.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mico_jax import conv


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example loss of a classifier: `-log softmax(logits)[label]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
# weights (kaiming_uniform with a = sqrt(5)) and for biases.
_torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                      "uniform")


def _torch_bias_init(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _dense(features: int, fan_in: int) -> nn.Dense:
  return nn.Dense(features, kernel_init=_torch_kernel_init,
                  bias_init=_torch_bias_init(fan_in))


def _conv(features: int, kernel: int, in_channels: int, **kwargs) -> nn.Conv:
  # On CPU as patches x kernel (`conv.conv_general_dilated`): same numbers.
  return nn.Conv(features, (kernel, kernel), kernel_init=_torch_kernel_init,
                 bias_init=_torch_bias_init(in_channels * kernel * kernel),
                 conv_general_dilated=conv.conv_general_dilated, **kwargs)


class MLP(nn.Module):
  """Fully connected tanh network; MICO's Purchase-100 model is `(128,)`.

  Inputs of any shape `[B, ...]` are flattened.
  """

  num_classes: int
  hidden: Sequence[int] = (128,)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = jnp.tanh(_dense(width, x.shape[-1])(x))
    return _dense(self.num_classes, x.shape[-1])(x)


class CNN(nn.Module):
  """MICO's CIFAR-10 network on `[B, 32, 32, 3]` images (NHWC).

  conv 128 k8 s2 p3, tanh, maxpool 3 s1, conv 256 k3, tanh, conv 256 k3, tanh,
  avgpool 2, linear 6400 -> classes. `channels` narrows the three convolutions
  (for CPU runs); the default is MICO's.
  """

  num_classes: int = 10
  channels: Sequence[int] = (128, 256, 256)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c1, c2, c3 = self.channels
    x = jnp.tanh(_conv(c1, 8, x.shape[-1], strides=2, padding=3)(x))
    x = conv.max_pool(x, (3, 3))  # stride 1
    x = jnp.tanh(_conv(c2, 3, c1, padding="VALID")(x))
    x = jnp.tanh(_conv(c3, 3, c2, padding="VALID")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    # Flatten channels-first, as PyTorch does, so imported weights line up.
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
    return _dense(self.num_classes, x.shape[-1])(x)


class BagOfEmbeddings(nn.Module):
  """Text encoder: the mean of the embeddings of the real (non-padding) tokens.

  Maps int32 token ids `[B, L]` (0 = padding, ids < `vocab_size`) to features
  `[B, dim]`. The mean is computed as a dense layer (the embedding table) on
  each text's normalised bag of words `[B, vocab_size]`: the same numbers as
  an embedding lookup, but DP-SGD's ghost norms cover a dense layer with one
  position cheaply, while an `nn.Embed` would need per-example gradients of
  the whole table.
  """

  vocab_size: int
  dim: int = 64

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    mask_BxL = (tokens_BxL != 0).astype(jnp.float32)
    rows_Bx1 = jnp.arange(tokens_BxL.shape[0])[:, None]
    bag_BxV = jnp.zeros((tokens_BxL.shape[0], self.vocab_size)).at[
        rows_Bx1, tokens_BxL].add(mask_BxL)
    bag_BxV /= jnp.maximum(mask_BxL.sum(1, keepdims=True), 1)
    # PyTorch's nn.Embedding initialises N(0, 1).
    return nn.Dense(self.dim, use_bias=False,
                    kernel_init=nn.initializers.normal(1.0))(bag_BxV)


class TextClassifier(nn.Module):
  """Token ids `[B, L]` (0 = padding) -> logits `[B, C]`: encoder, then head.

  The encoder is any module mapping tokens to features `[B, D]` with padding
  masked; a pretrained one (MICO fine-tunes RoBERTa-base) can replace the
  default `BagOfEmbeddings`, which is trained from scratch.
  """

  num_classes: int
  encoder: nn.Module
  hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    x = self.encoder(tokens_BxL)
    for width in self.hidden:
      x = jnp.tanh(_dense(width, x.shape[-1])(x))
    return _dense(self.num_classes, x.shape[-1])(x)
