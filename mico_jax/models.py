"""MICO's models in flax, initialised as PyTorch does so recipes carry over.

Each module maps a batch `[B, ...]` to logits `[B, C]`; a stack of K models is
`jax.vmap(model.apply)` over parameters with a leading models axis.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  return nn.Conv(features, (kernel, kernel), kernel_init=_torch_kernel_init,
                 bias_init=_torch_bias_init(in_channels * kernel * kernel),
                 **kwargs)


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
  avgpool 2, linear 6400 -> classes.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.tanh(_conv(128, 8, x.shape[-1], strides=2, padding=3)(x))
    x = nn.max_pool(x, (3, 3), strides=(1, 1))
    x = jnp.tanh(_conv(256, 3, 128, padding="VALID")(x))
    x = jnp.tanh(_conv(256, 3, 256, padding="VALID")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    # Flatten channels-first, as PyTorch does, so imported weights line up.
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
    return _dense(self.num_classes, x.shape[-1])(x)
