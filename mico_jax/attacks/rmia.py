"""RMIA (Zarifzadeh, Liu and Shokri, ICML 2024), online and offline, all targets.

For target model t, point x and population point z, with p(x|m) the
probability model m gives x's true label (`sigmoid(stat)`, since `stat` is
the logit-scaled confidence):

  LR_t(x, z) = [p(x|t) / p(x)] / [p(z|t) / p(z)],
  score_t(x) = fraction of population points z with LR_t(x, z) > gamma,

where p(.) averages p(.|m) over the reference (shadow) models. Online, p(x)
is the mean of the IN and the OUT shadows' averages, each side weighted 1/2
as in the paper's balanced reference models (MICO's train phase is far from
balanced). Offline, only OUT shadows are used and p(x) is approximated
linearly: p(x) = ((1 + a) p_OUT(x) + (1 - a)) / 2. The paper averages the
score over query augmentations; so do we.

Fallbacks: online, a point with no IN shadow uses the offline approximation
with `a`, and one with no OUT shadow its IN average; offline, a point with no
OUT shadow uses the average of all its shadows. All averages are
leave-target-out (`shadows.py`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import metrics as sk_metrics

from mico_jax.attacks import shadows

_TINY = 1e-30
OFFLINE_A_GRID = tuple(np.round(np.arange(0, 1.01, 0.1), 2))


def population_points(population_KxN: jax.Array, num_z: int,
                      seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Up to `num_z` population points per target: `(z_KxZ, valid_KxZ)`.

  One fixed random order of the pool (from `seed`) is filtered by each
  target's allowed points, so targets share most of their z.
  """
  k, n = population_KxN.shape
  num_z = min(num_z, n)
  priority_N = jax.random.uniform(jax.random.key(seed), (n,))
  keyed_KxN = jnp.where(population_KxN, priority_N, 2.0)
  z_KxZ = jnp.argsort(keyed_KxN, axis=1)[:, :num_z]
  valid_KxZ = jnp.take_along_axis(population_KxN, z_KxZ, 1)
  return z_KxZ, valid_KxZ


def _online_probability(p_KxNxA, keep_KxN, shadow_K, a):
  """Online p(x) for every target and point, leave-target-out."""
  w_in, w_out = shadows.side_weights(keep_KxN, shadow_K)
  m_in = shadows.loo_moments(p_KxNxA, w_in)
  m_out = shadows.loo_moments(p_KxNxA, w_out)
  has_in, has_out = m_in.count_KxNx1 > 0, m_out.count_KxNx1 > 0
  linear = ((1 + a) * m_out.mean_KxNxA + (1 - a)) / 2
  both = (m_in.mean_KxNxA + m_out.mean_KxNxA) / 2
  return jnp.where(has_in & has_out, both,
                   jnp.where(has_out, linear, m_in.mean_KxNxA))


def _pairwise_score(ratio_KxNxA, z_KxZ, valid_KxZ, gamma):
  """Fraction of each target's valid z whose ratio is below ratio(x) / gamma."""
  ratio_z_KxZxA = jnp.take_along_axis(ratio_KxNxA, z_KxZ[..., None], 1)
  keyed = jnp.where(valid_KxZ[..., None], ratio_z_KxZxA, jnp.inf)
  sorted_KxAxZ = jnp.sort(keyed, axis=1).transpose(0, 2, 1)
  query_KxAxN = (ratio_KxNxA / gamma).transpose(0, 2, 1)
  search = jax.vmap(jax.vmap(lambda s, q: jnp.searchsorted(s, q, "left")))
  below_KxAxN = search(sorted_KxAxZ, query_KxAxN)
  frac = below_KxAxN / jnp.maximum(valid_KxZ.sum(1), 1)[:, None, None]
  return frac.mean(1)


@jax.jit(static_argnames=("offline", "num_z"))
def rmia(stat_KxNxA: jax.Array, keep_KxN: jax.Array,
         shadow_K: jax.Array | None = None,
         population_KxN: jax.Array | None = None, offline: bool = False,
         a: float = 0.3, gamma: float = 1.0, num_z: int = 2500,
         seed: int = 0) -> jax.Array:
  """RMIA scores of every point for every model as the target.

  Args:
    stat_KxNxA: logit-scaled confidences (`stats.logit_scaled_confidence`).
    keep_KxN: whether each model trained on each point.
    shadow_K: which models serve as reference models (default: all).
    population_KxN: points each target may use as z (default: all); MICO's
      non-challenge pool of that target.
    offline: use only OUT reference models with the linear approximation.
    a: the offline approximation's slope (`tune_offline_a` picks it).
    gamma: the pairwise likelihood-ratio threshold.
    num_z: population points per target.
    seed: which population points.

  Returns:
    score_KxN in [0, 1]: higher means more likely a member.
  """
  if population_KxN is None:
    population_KxN = jnp.ones(keep_KxN.shape, bool)
  if offline:
    rows_K = jnp.arange(keep_KxN.shape[0])
    return _offline_rows(*_offline_parts(stat_KxNxA, keep_KxN, shadow_K,
                                         population_KxN, rows_K, num_z, seed),
                         a, gamma)
  p_KxNxA = jax.nn.sigmoid(stat_KxNxA)
  prob_KxNxA = _online_probability(p_KxNxA, keep_KxN, shadow_K, a)
  ratio_KxNxA = p_KxNxA / jnp.maximum(prob_KxNxA, _TINY)
  z_KxZ, valid_KxZ = population_points(population_KxN, num_z, seed)
  return _pairwise_score(ratio_KxNxA, z_KxZ, valid_KxZ, gamma)


def tune_offline_a(stat_KxNxA: np.ndarray, keep_KxN: np.ndarray,
                   validate_K: np.ndarray,
                   shadow_K: np.ndarray | None = None,
                   population_KxN: np.ndarray | None = None,
                   points_KxN: np.ndarray | None = None,
                   grid=OFFLINE_A_GRID, gamma: float = 1.0,
                   num_z: int = 2500, seed: int = 0) -> tuple[float, float]:
  """Picks offline RMIA's `a` as its authors do: best AUC on known models.

  The authors attack a reference model paired with the target using the
  others; here every model in `validate_K` (whose membership the attacker
  knows) is attacked with the other shadows, for each `a` in `grid`, and the
  AUC over their `points_KxN` (default: all points) decides. The reference
  averages are computed once; each `a` scores only the validation models.

  Returns:
    (a, its validation AUC).
  """
  validate_K = np.asarray(validate_K, bool)
  if not validate_K.any():
    raise ValueError("tune_offline_a needs at least one validation model")
  rows = np.flatnonzero(validate_K)
  points = (np.ones(keep_KxN.shape, bool) if points_KxN is None
            else np.asarray(points_KxN, bool))[rows]
  labels = np.asarray(keep_KxN, bool)[rows][points]
  if population_KxN is None:
    population_KxN = np.ones(keep_KxN.shape, bool)
  parts = _offline_parts(jnp.asarray(stat_KxNxA), jnp.asarray(keep_KxN),
                         shadow_K, jnp.asarray(population_KxN), rows, num_z,
                         seed)
  best = (None, -1.0)
  for a in grid:
    score = np.asarray(_offline_rows(*parts, a, gamma))
    auc = sk_metrics.roc_auc_score(labels, score[points])
    if auc > best[1]:
      best = (float(a), float(auc))
  return best


@jax.jit(static_argnames=("num_z",))
def _offline_parts(stat_KxNxA, keep_KxN, shadow_K, population_KxN, rows_R,
                   num_z, seed):
  """What offline RMIA needs of the rows `rows_R`, whatever `a` is."""
  p_KxNxA = jax.nn.sigmoid(stat_KxNxA)
  w_in, w_out = shadows.side_weights(keep_KxN, shadow_K)
  m_out = shadows.loo_moments(p_KxNxA, w_out)
  m_all = shadows.loo_moments(p_KxNxA, w_in | w_out)
  z_KxZ, valid_KxZ = population_points(population_KxN, num_z, seed)
  return (p_KxNxA[rows_R], m_out.count_KxNx1[rows_R] > 0,
          m_out.mean_KxNxA[rows_R], m_all.mean_KxNxA[rows_R], z_KxZ[rows_R],
          valid_KxZ[rows_R])


@jax.jit
def _offline_rows(p_RxNxA, has_out, mean_out, mean_all, z_RxZ, valid_RxZ, a,
                  gamma):
  prob = jnp.where(has_out, ((1 + a) * mean_out + (1 - a)) / 2, mean_all)
  ratio = p_RxNxA / jnp.maximum(prob, _TINY)
  return _pairwise_score(ratio, z_RxZ, valid_RxZ, gamma)
