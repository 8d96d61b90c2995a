"""Shadow-calibrated scores, as MICO's winning team used them.

The target's statistic minus a per-point reference level from the shadows:

- `calibrated(..., "in")`: stat - mu_IN
- `calibrated(..., "mid")`: stat - (mu_IN + mu_OUT) / 2
- `calibrated(..., "z")`: (stat - mu_all) / sigma_all, over IN and OUT shadows

averaged over queries, all leave-target-out. Fallback (fewer than 2 shadows
on a side): that side's mean is the other side's plus (or minus) the
target's mean IN - OUT gap over the points with 2 or more on both sides
(`shadows.fill_missing_means`); sigma_all of a point with under 2 shadows is
the pooled one (`shadows.pooled_variance`), and mu_all of a point with no
shadow the mean over the target's other points.
"""

import jax
import jax.numpy as jnp

from mico_jax.attacks import shadows

KINDS = ("in", "mid", "z")


@jax.jit(static_argnames=("kind",))
def calibrated(stat_KxNxA: jax.Array, keep_KxN: jax.Array,
               shadow_K: jax.Array | None = None, kind: str = "mid"
               ) -> jax.Array:
  """Shadow-calibrated membership scores `[K, N]`; `kind` in `KINDS`."""
  if kind not in KINDS:
    raise ValueError(f"calibrated: kind must be one of {KINDS}, got {kind!r}")
  w_in, w_out = shadows.side_weights(keep_KxN, shadow_K)
  if kind == "z":
    m = shadows.loo_moments(stat_KxNxA, w_in | w_out)
    var = shadows.shrunk_variance(m, 0.0)
    has = m.count_KxNx1 > 0
    mean, _ = shadows.fill_missing_means(m.mean_KxNxA, m.mean_KxNxA, has, has)
    return ((stat_KxNxA - mean) /
            jnp.sqrt(jnp.maximum(var, 1e-6))).mean(-1)
  m_in = shadows.loo_moments(stat_KxNxA, w_in)
  m_out = shadows.loo_moments(stat_KxNxA, w_out)
  enough = lambda m: m.count_KxNx1 >= shadows.MIN_SHADOWS_FOR_VARIANCE
  mu_in, mu_out = shadows.fill_missing_means(
      m_in.mean_KxNxA, m_out.mean_KxNxA, enough(m_in), enough(m_out))
  level = mu_in if kind == "in" else (mu_in + mu_out) / 2
  return (stat_KxNxA - level).mean(-1)
