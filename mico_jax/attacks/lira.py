"""LiRA (Carlini et al., 2022), online and offline, for every target at once.

For target model t and point n, the shadows are the other models (optionally
only some of them): IN shadows trained on n, OUT shadows did not. Sums over
all shadows are formed once; each target's own contribution is subtracted, so
a target is never its own shadow and all K x N Gaussians cost O(K N A).
"""

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

# Shadows needed for a per-example variance; fewer fall back to the global one.
MIN_SHADOWS_FOR_VARIANCE = 2
_EPS = 1e-6


def _gaussians(stat_KxNxA, weight_KxN):
  """Leave-target-out mean and variance of `stat` over weighted shadows.

  Returns mean, per-example variance and per-target global variance, each
  broadcastable to `[K, N, A]`.
  """
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
  has_var = count >= MIN_SHADOWS_FOR_VARIANCE
  # Pooled within-point variance over the points where it can be estimated.
  global_var = ((jnp.where(has_var, var, 0)).sum(1, keepdims=True) /
                jnp.maximum(has_var.sum(1, keepdims=True), 1))
  var = jnp.where(has_var, var, global_var)
  # With no shadow at all, fall back to the mean of all the target's shadow
  # observations on this side (in original units: `center` may be the
  # target's own value there).
  fallback = ((loo_sum + count * center).sum(1, keepdims=True) /
              jnp.maximum(count.sum(1, keepdims=True), 1))
  mean = jnp.where(count > 0, mean + center, fallback)
  return mean, jnp.maximum(var, _EPS), jnp.maximum(global_var, _EPS)


def _shadow_weights(keep_KxN, shadow_K):
  shadow = jnp.ones(keep_KxN.shape[0], bool) if shadow_K is None else shadow_K
  return keep_KxN & shadow[:, None], ~keep_KxN & shadow[:, None]


@jax.jit(static_argnames=("fixed_variance",))
def lira_online(stat_KxNxA: jax.Array, keep_KxN: jax.Array,
                shadow_K: jax.Array | None = None,
                fixed_variance: bool = False) -> jax.Array:
  """Online LiRA: log-likelihood ratio of IN vs OUT Gaussians, mean over queries.

  Args:
    stat_KxNxA: logit-scaled confidences of every model on every point/query.
    keep_KxN: whether each model trained on each point.
    shadow_K: which models may serve as shadows (default: all).
    fixed_variance: one variance per target and query instead of per example.

  Returns:
    score_KxN: higher means more likely a member of that model's training set.
  """
  w_in, w_out = _shadow_weights(keep_KxN, shadow_K)
  mean_in, var_in, gvar_in = _gaussians(stat_KxNxA, w_in)
  mean_out, var_out, gvar_out = _gaussians(stat_KxNxA, w_out)
  if fixed_variance:
    var_in, var_out = gvar_in, gvar_out
  stat = stat_KxNxA
  llr = (norm.logpdf(stat, mean_in, jnp.sqrt(var_in)) -
         norm.logpdf(stat, mean_out, jnp.sqrt(var_out)))
  return llr.mean(-1)


@jax.jit(static_argnames=("fixed_variance",))
def lira_offline(stat_KxNxA: jax.Array, keep_KxN: jax.Array,
                 shadow_K: jax.Array | None = None,
                 fixed_variance: bool = False) -> jax.Array:
  """Offline LiRA: one-sided test against the OUT Gaussian, mean over queries.

  The score is `-log P(OUT statistic >= observed)`, so only OUT shadows are
  needed. Arguments as `lira_online`.
  """
  _, w_out = _shadow_weights(keep_KxN, shadow_K)
  mean_out, var_out, gvar_out = _gaussians(stat_KxNxA, w_out)
  if fixed_variance:
    var_out = gvar_out
  z = (stat_KxNxA - mean_out) / jnp.sqrt(var_out)
  return -norm.logcdf(-z).mean(-1)
