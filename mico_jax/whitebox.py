"""White-box statistics: what the target's parameters say about a point.

Two per-model, per-point statistics, each oriented so that higher means
"more like a member" and usable in place of `stat_KxNxA` by every
shadow-based attack (`attacks.Observations(...)._replace(stat_KxNxA=...)`):

- `neg_log_grad_norm`: -log of the per-example gradient norm of the loss at
  the model's parameters (members sit nearer a minimum). The norms are the
  ones DP-SGD's clipping computes (`dp.clipped_grad_sum`: ghost norms for
  dense and convolution layers).
- `neg_loss_drop`: -(loss(x; theta) - loss(x; theta - lr * grad loss(x; theta))),
  the loss change after one SGD step on the point alone (a member's loss
  barely moves).

RMIA reads its statistic as a logit of a probability, so it fits only the
black-box one.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import dp
from mico_jax.models import cross_entropy


class WhiteboxStats(NamedTuple):
  """Per-model, per-point white-box statistics (`[K, N, 1]`, host arrays)."""

  neg_log_grad_norm_KxNx1: np.ndarray
  neg_loss_drop_KxNx1: np.ndarray


def _one_model(apply_fn, lr, params, x_B, y_B):
  _, _, norm_B = dp.clipped_grad_sum(apply_fn, params, x_B, y_B,
                                     jnp.ones(len(y_B), bool), 1.0)

  def loss_one(p, x, y):
    return cross_entropy(apply_fn(p, x[None]), y[None])[0]

  def drop(x, y):
    loss, grad = jax.value_and_grad(loss_one)(params, x, y)
    stepped = jax.tree.map(lambda p, g: p - lr * g, params, grad)
    return loss - loss_one(stepped, x, y)

  return -jnp.log(jnp.maximum(norm_B, 1e-30)), -jax.vmap(drop)(x_B, y_B)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _batch(apply_fn, lr, params_K, x_B, y_B):
  # One model at a time: per-example gradients of every model at once would
  # not fit in memory.
  return jax.lax.map(lambda p: _one_model(apply_fn, lr, p, x_B, y_B),
                     params_K)


def compute_whitebox(apply_fn: Callable, params_K, x_N: np.ndarray,
                     y_N: np.ndarray, lr: float, batch_size: int = 256
                     ) -> WhiteboxStats:
  """Both statistics for all K models on all N points, batch by batch.

  Args:
    apply_fn: `(params, x_Bx...) -> logits_BxC` of one model.
    params_K: stacked parameters, leading axis K.
    x_N, y_N: the pool.
    lr: the SGD step size of the one-step loss change.
    batch_size: points per batch (the last is padded; one shape compiles).
  """
  n = len(y_N)
  grads, drops = [], []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    x_B = np.concatenate([x_N[start:stop], np.repeat(x_N[:1], pad, 0)])
    y_B = np.concatenate([y_N[start:stop], np.repeat(y_N[:1], pad, 0)])
    g, d = _batch(apply_fn, lr, params_K, jnp.asarray(x_B), jnp.asarray(y_B))
    grads.append(np.asarray(g)[:, :stop - start])
    drops.append(np.asarray(d)[:, :stop - start])
  return WhiteboxStats(np.concatenate(grads, 1)[..., None],
                       np.concatenate(drops, 1)[..., None])
