"""LiRA (Carlini et al., 2022), online and offline, for every target at once.

Two families, named so a reader can tell them apart:
- `lira_online` / `lira_offline` (ours): shadow means, per-example variances
  (optionally fixed per target, or shrunk toward the pooled one with
  `prior_df`), offline as a one-sided test.
- `lira_online_reference` / `lira_offline_reference`: as the authors' code
  computes it (tensorflow/privacy `research/mi_lira_2021/plot.py`): medians
  as centres, population standard deviations (ddof 0), and with
  `fixed_variance` one standard deviation of all the IN observations of all
  points and shadows for both sides online (of the OUT ones offline); offline
  is the two-sided `-log N(stat; median_out, std_out)`.

Shadow moments are leave-target-out (`shadows.py`), so a target is never its
own shadow and all K x N Gaussians cost O(K N A).
"""

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from mico_jax.attacks import shadows

_EPS = 1e-6


def _gaussians(stat_KxNxA, weight_KxN, prior_df):
  """Leave-target-out mean and variance of `stat` over weighted shadows.

  Returns mean, variance (per-example shrunk with `prior_df`; 0: plain) and
  per-target pooled variance, each broadcastable to `[K, N, A]`.
  """
  m = shadows.loo_moments(stat_KxNxA, weight_KxN)
  pooled = shadows.pooled_variance(m)
  var = shadows.shrunk_variance(m, prior_df)
  # With no shadow at all, fall back to the mean of all the target's shadow
  # observations on this side.
  fallback = ((m.count_KxNx1 * m.mean_KxNxA).sum(1, keepdims=True) /
              jnp.maximum(m.count_KxNx1.sum(1, keepdims=True), 1))
  mean = jnp.where(m.count_KxNx1 > 0, m.mean_KxNxA, fallback)
  return mean, jnp.maximum(var, _EPS), jnp.maximum(pooled, _EPS)


@jax.jit(static_argnames=("fixed_variance",))
def lira_online(stat_KxNxA: jax.Array, keep_KxN: jax.Array,
                shadow_K: jax.Array | None = None,
                fixed_variance: bool = False,
                prior_df: float = 0.0) -> jax.Array:
  """Online LiRA: log-likelihood ratio of IN vs OUT Gaussians, mean over queries.

  Args:
    stat_KxNxA: logit-scaled confidences of every model on every point/query.
    keep_KxN: whether each model trained on each point.
    shadow_K: which models may serve as shadows (default: all).
    fixed_variance: one variance per target and query instead of per example.
    prior_df: shrink per-example variances toward the pooled one with this
      many prior degrees of freedom (`shadows.shrunk_variance`); 0: none.

  Returns:
    score_KxN: higher means more likely a member of that model's training set.
  """
  w_in, w_out = shadows.side_weights(keep_KxN, shadow_K)
  mean_in, var_in, gvar_in = _gaussians(stat_KxNxA, w_in, prior_df)
  mean_out, var_out, gvar_out = _gaussians(stat_KxNxA, w_out, prior_df)
  if fixed_variance:
    var_in, var_out = gvar_in, gvar_out
  stat = stat_KxNxA
  llr = (norm.logpdf(stat, mean_in, jnp.sqrt(var_in)) -
         norm.logpdf(stat, mean_out, jnp.sqrt(var_out)))
  return llr.mean(-1)


@jax.jit(static_argnames=("fixed_variance",))
def lira_offline(stat_KxNxA: jax.Array, keep_KxN: jax.Array,
                 shadow_K: jax.Array | None = None,
                 fixed_variance: bool = False,
                 prior_df: float = 0.0) -> jax.Array:
  """Offline LiRA: one-sided test against the OUT Gaussian, mean over queries.

  The score is `-log P(OUT statistic >= observed)`, so only OUT shadows are
  needed. Arguments as `lira_online`.
  """
  _, w_out = shadows.side_weights(keep_KxN, shadow_K)
  mean_out, var_out, gvar_out = _gaussians(stat_KxNxA, w_out, prior_df)
  if fixed_variance:
    var_out = gvar_out
  z = (stat_KxNxA - mean_out) / jnp.sqrt(var_out)
  return -norm.logcdf(-z).mean(-1)


def _reference_side(stat_KxNxA, weight_KxN):
  """Median, per-example std (ddof 0) and the global std of one side.

  The global std is the reference's `np.std(dat)`: one standard deviation of
  all the target's shadow observations of that side, over all points and
  queries, around their grand mean. Per-example stds of points with under 2
  shadows (0 or undefined in the reference) fall back to it.
  """
  median, count = shadows.loo_median(stat_KxNxA, weight_KxN)
  m = shadows.loo_moments(stat_KxNxA, weight_KxN)
  var = m.var_KxNxA * (m.count_KxNx1 - 1) / jnp.maximum(m.count_KxNx1, 1)
  # Grand moments from per-point ones: total variance = within + between.
  c = m.count_KxNx1
  total = jnp.maximum(c.sum(1, keepdims=True) * stat_KxNxA.shape[-1], 1)
  grand_mean = (c * m.mean_KxNxA).sum((1, 2), keepdims=True) / total
  grand_var = (c * (var + (m.mean_KxNxA - grand_mean)**2)).sum(
      (1, 2), keepdims=True) / total
  has_var = c >= shadows.MIN_SHADOWS_FOR_VARIANCE
  std = jnp.sqrt(jnp.where(has_var, var, grand_var))
  return median, count > 0, std, jnp.sqrt(grand_var)


@jax.jit(static_argnames=("fixed_variance",))
def lira_online_reference(stat_KxNxA: jax.Array, keep_KxN: jax.Array,
                          shadow_K: jax.Array | None = None,
                          fixed_variance: bool = True) -> jax.Array:
  """Online LiRA as the reference code computes it; mean over queries.

  Centres are medians; `fixed_variance` (the setting the LiRA paper advises
  with few shadows) uses the global std of the IN observations for both
  sides, as `generate_ours(fix_variance=True)` does; otherwise per-example
  stds (ddof 0). A point with no shadow on a side takes that side's centre
  from `shadows.fill_missing_means` (the reference has no such case: it
  truncates every point to the fewest shadows any point has). Arguments as
  `lira_online`.
  """
  w_in, w_out = shadows.side_weights(keep_KxN, shadow_K)
  med_in, has_in, std_in, gstd_in = _reference_side(stat_KxNxA, w_in)
  med_out, has_out, std_out, _ = _reference_side(stat_KxNxA, w_out)
  med_in, med_out = shadows.fill_missing_means(med_in, med_out, has_in,
                                               has_out)
  if fixed_variance:
    std_in = std_out = gstd_in
  llr = (norm.logpdf(stat_KxNxA, med_in, jnp.maximum(std_in, _EPS)) -
         norm.logpdf(stat_KxNxA, med_out, jnp.maximum(std_out, _EPS)))
  return llr.mean(-1)


@jax.jit(static_argnames=("fixed_variance",))
def lira_offline_reference(stat_KxNxA: jax.Array, keep_KxN: jax.Array,
                           shadow_K: jax.Array | None = None,
                           fixed_variance: bool = True) -> jax.Array:
  """Offline LiRA as the reference code computes it; mean over queries.

  `-log N(stat; median_out, std_out)`: two-sided, as `generate_ours_offline`
  scores. A point with no OUT shadow takes its centre from the IN side
  (`shadows.fill_missing_means`). Arguments as `lira_online_reference`.
  """
  w_in, w_out = shadows.side_weights(keep_KxN, shadow_K)
  med_in, has_in, _, _ = _reference_side(stat_KxNxA, w_in)
  med_out, has_out, std_out, gstd_out = _reference_side(stat_KxNxA, w_out)
  _, med_out = shadows.fill_missing_means(med_in, med_out, has_in, has_out)
  if fixed_variance:
    std_out = gstd_out
  return -norm.logpdf(stat_KxNxA, med_out,
                      jnp.maximum(std_out, _EPS)).mean(-1)
