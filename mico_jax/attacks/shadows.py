"""Leave-target-out shadow statistics shared by every shadow-based attack.

For target model t and point n, the shadows are the other models marked as
shadows, split into IN (trained on n) and OUT. Sums over all models are formed
once and each target's own row is subtracted, so a target is never its own
shadow and every target costs O(N A) on top of one O(K N A) pass. Medians are
not sums: `loo_median` sorts once and, per target, picks the order statistics
of the sorted column with the target's own entry skipped.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Shadows needed for a per-example variance; fewer fall back to a pooled one.
MIN_SHADOWS_FOR_VARIANCE = 2


def side_weights(keep_KxN: jax.Array, shadow_K: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array]:
  """IN and OUT shadow masks `[K, N]`: model k is a shadow (not) trained on n."""
  shadow = (jnp.ones(keep_KxN.shape[0], bool) if shadow_K is None
            else jnp.asarray(shadow_K, bool))
  keep = jnp.asarray(keep_KxN, bool)
  return keep & shadow[:, None], ~keep & shadow[:, None]


class Moments(NamedTuple):
  """Leave-target-out moments of one side's shadow observations."""

  count_KxNx1: jax.Array  # shadows on this side, the target excluded
  mean_KxNxA: jax.Array  # 0 where count == 0
  var_KxNxA: jax.Array  # unbiased (ddof 1); 0 where count < 2


def loo_moments(stat_KxNxA: jax.Array, weight_KxN: jax.Array) -> Moments:
  """Mean and variance of `stat` over each target's other weighted shadows."""
  w = weight_KxN[..., None].astype(stat_KxNxA.dtype)
  # Centering each point on its shadows' mean keeps the sums of squares
  # accurate in float32 (and independent of the models that are not shadows).
  center = (w * stat_KxNxA).sum(0, keepdims=True) / jnp.maximum(
      w.sum(0, keepdims=True), 1)
  stat = stat_KxNxA - center
  total = (w * stat).sum(0, keepdims=True)
  total_sq = (w * stat**2).sum(0, keepdims=True)
  count = w.sum(0, keepdims=True) - w
  loo_sum, loo_sq = total - w * stat, total_sq - w * stat**2
  mean = loo_sum / jnp.maximum(count, 1)
  var = (loo_sq - count * mean**2) / jnp.maximum(count - 1, 1)
  var = jnp.where(count >= MIN_SHADOWS_FOR_VARIANCE, jnp.maximum(var, 0), 0)
  return Moments(count, jnp.where(count > 0, mean + center, 0), var)


def pooled_variance(m: Moments) -> jax.Array:
  """Mean per-example variance over the points that have one: `[K, 1, A]`.

  Points with fewer than `MIN_SHADOWS_FOR_VARIANCE` shadows are left out;
  a target with no such point gets 0 (callers floor it).
  """
  has = m.count_KxNx1 >= MIN_SHADOWS_FOR_VARIANCE
  return ((jnp.where(has, m.var_KxNxA, 0)).sum(1, keepdims=True) /
          jnp.maximum(has.sum(1, keepdims=True), 1))


def shrunk_variance(m: Moments, prior_df: float) -> jax.Array:
  """Per-example variances shrunk toward the pooled one (empirical Bayes).

  The posterior mean of a variance under a scaled inverse-chi-squared prior
  centred on the pooled variance with `prior_df` degrees of freedom:
  `(nu s^2 + prior_df s0^2) / (nu + prior_df)`, nu = count - 1. With few
  shadows the pooled variance dominates, with many the point's own; a point
  with under 2 shadows gets the pooled one. `prior_df = 0` is the plain
  per-example variance with that fallback.
  """
  pooled = pooled_variance(m)
  nu = jnp.where(m.count_KxNx1 >= MIN_SHADOWS_FOR_VARIANCE,
                 m.count_KxNx1 - 1, 0)
  return jnp.where(nu + prior_df > 0,
                   (nu * m.var_KxNxA + prior_df * pooled) /
                   jnp.maximum(nu + prior_df, 1e-12), pooled)


def loo_median(stat_KxNxA: jax.Array, weight_KxN: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """Median of each target's other weighted shadows: `(median, count)`.

  One sort per column; for target t the median of the remaining c' values is
  read at order positions (c' - 1) // 2 and c' // 2 of the column, shifted
  by one past t's own position when t is on this side. Median is 0 where
  count == 0.
  """
  w = jnp.broadcast_to(weight_KxN[..., None], stat_KxNxA.shape)
  keyed = jnp.where(w, stat_KxNxA, jnp.inf)
  order = jnp.argsort(keyed, axis=0, stable=True)
  sorted_ = jnp.take_along_axis(keyed, order, axis=0)
  # Each model's position in its column: the inverse permutation, scattered.
  k, n, a = order.shape
  rank = jnp.zeros_like(order).at[
      order, jnp.arange(n)[None, :, None], jnp.arange(a)[None, None, :]].set(
          jnp.broadcast_to(jnp.arange(k)[:, None, None], order.shape))
  count = w.sum(0, keepdims=True) - w
  def at(j):
    j = j + (w & (j >= rank))
    return jnp.take_along_axis(sorted_, jnp.clip(j, 0, w.shape[0] - 1), 0)
  median = (at((count - 1) // 2) + at(count // 2)) / 2
  return jnp.where(count > 0, median, 0), count[..., :1]


def fill_missing_means(mean_in: jax.Array, mean_out: jax.Array,
                       has_in: jax.Array, has_out: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """Fills a side without enough shadows from the other side and the gap.

  Where only one side has shadows, the missing centre is the present one
  plus (or minus) the target's mean IN - OUT gap over the points that have
  both; where neither has, each side's centre is its mean over the points
  that have it. A target with no point with both sides gets a gap of 0.
  """
  both = has_in & has_out
  gap = (jnp.where(both, mean_in - mean_out, 0).sum(1, keepdims=True) /
         jnp.maximum(both.sum(1, keepdims=True), 1))
  def side_mean(mean, has):
    return (jnp.where(has, mean, 0).sum(1, keepdims=True) /
            jnp.maximum(has.sum(1, keepdims=True), 1))
  filled_in = jnp.where(has_in, mean_in, jnp.where(
      has_out, mean_out + gap, side_mean(mean_in, has_in)))
  filled_out = jnp.where(has_out, mean_out, jnp.where(
      has_in, mean_in - gap, side_mean(mean_out, has_out)))
  return filled_in, filled_out
