"""The DP-distinguisher track: reference splits, and attacks by references.

The attacks are checked against an independent per-target numpy loop (the
formulas, fallbacks included: 0 or 1 reference on a side), on a planted
answer, and on bad input.
"""

import numpy as np
import pytest
from scipy import stats as sp_stats
from sklearn import metrics

from mico_jax import challenge as challenge_lib
from mico_jax import ddp
from mico_jax.attacks import ObservationError
from mico_jax.attacks import ddp as ddp_attacks

POOL, N_TRAIN, M = 1_000, 400, 50


def _targets(num):
  return challenge_lib.make_challenge(POOL, N_TRAIN, M,
                                     challenge_lib.make_seeds(3, num))


@pytest.mark.parametrize("num_references", [4, 5])
def test_references_are_the_targets_twins_but_for_the_challenge(
    num_references):
  targets = _targets(6)
  refs = ddp.reference_challenge(targets, num_references, seed=1)
  t, r = targets.num_models, num_references
  assert refs.num_models == t * r
  assert refs.phases == tuple(p for p in targets.phases for _ in range(r))
  keep = refs.keep_KxN.reshape(t, r, POOL)
  assert (keep.sum(-1) == N_TRAIN).all()  # exactly n points, as the target
  challenge = np.zeros((t, POOL), bool)
  np.put_along_axis(challenge, targets.challenge_KxC, True, 1)
  # Outside its challenge, every reference trains on the target's points.
  assert (keep == targets.keep_KxN[:, None])[~challenge[:, None].repeat(
      r, 1)].all()
  # Members first (MICO's order), and member_KxC names them.
  member = refs.member_KxC.reshape(t, r, 2 * M)
  chosen = np.sort(refs.train_KxT[:, :M].reshape(t, r, M), -1)
  for i in range(t):
    for j in range(r):
      np.testing.assert_array_equal(
          chosen[i, j], np.sort(targets.challenge_KxC[i][member[i, j]]))
  # Complementary pairs: each point IN for floor(R/2) or ceil(R/2).
  n_in = member.sum(1)
  assert n_in.min() == r // 2 and n_in.max() == (r + 1) // 2
  # Evaluation: the rest of the pool.
  evaluation = refs.eval_mask_KxN
  assert not (evaluation & refs.keep_KxN).any()
  assert (evaluation | refs.keep_KxN).all()
  # Distinct training keys, deterministic in the seed.
  assert len({tuple(s) for s in refs.seeds_Kx3}) == t * r
  again = ddp.reference_challenge(targets, num_references, seed=1)
  np.testing.assert_array_equal(again.train_KxT, refs.train_KxT)


def _side(stat_RxNxA, keep_RxN):
  """Per point: count, mean, ddof-1 variance (nan under 2), as numpy loops."""
  r, n, a = stat_RxNxA.shape
  count, mean, var = np.zeros(n), np.zeros((n, a)), np.full((n, a), np.nan)
  for j in range(n):
    values = stat_RxNxA[keep_RxN[:, j], j]
    count[j] = len(values)
    if len(values):
      mean[j] = values.mean(0)
    if len(values) >= 2:
      var[j] = values.var(0, ddof=1)
  return count, mean, var


def _lira_online_loop(stat_TxNxA, ref_TxRxNxA, keep_TxRxN):
  """Online LiRA per target: IN/OUT Gaussians of its references per point.

  Fallbacks: under 2 references on a side -> the side's mean variance over
  the target's points that have 2 or more; none -> the side's mean of all
  its reference observations over the target's points.
  """
  scores = []
  for t in range(len(stat_TxNxA)):
    llr = 0
    for side_keep, sign in ((keep_TxRxN[t], 1), (~keep_TxRxN[t], -1)):
      count, mean, var = _side(ref_TxRxNxA[t], side_keep)
      pooled = (np.nanmean(var[count >= 2], 0) if (count >= 2).any()
                else np.zeros(var.shape[1]))
      var = np.where(count[:, None] >= 2, var, pooled)
      fallback = (count[:, None] * mean).sum(0) / max(count.sum(), 1)
      mean = np.where(count[:, None] > 0, mean, fallback)
      llr = llr + sign * sp_stats.norm.logpdf(
          stat_TxNxA[t], mean, np.sqrt(np.maximum(var, 1e-6)))
    scores.append(llr.mean(-1))
  return np.array(scores)


def _calibrated_mid_loop(stat_TxNxA, ref_TxRxNxA, keep_TxRxN):
  """stat - (mu_IN + mu_OUT) / 2 per target; a side with under 2 references
  takes the other side's mean -/+ the target's mean IN - OUT gap (over the
  points with 2 or more on both sides)."""
  scores = []
  for t in range(len(stat_TxNxA)):
    c_in, mu_in, _ = _side(ref_TxRxNxA[t], keep_TxRxN[t])
    c_out, mu_out, _ = _side(ref_TxRxNxA[t], ~keep_TxRxN[t])
    has_in, has_out = c_in >= 2, c_out >= 2
    both = has_in & has_out
    gap = (mu_in[both] - mu_out[both]).mean(0) if both.any() else 0
    side_mean = lambda mu, has: mu[has].mean(0) if has.any() else 0
    fill_in = np.where(has_in[:, None], mu_in, np.where(
        has_out[:, None], mu_out + gap, side_mean(mu_in, has_in)))
    fill_out = np.where(has_out[:, None], mu_out, np.where(
        has_in[:, None], mu_in - gap, side_mean(mu_out, has_out)))
    scores.append((stat_TxNxA[t] - (fill_in + fill_out) / 2).mean(-1))
  return np.array(scores)


def test_attacks_match_a_per_target_loop_with_fallbacks():
  rng = np.random.default_rng(0)
  t, r, n, a = 5, 3, 40, 2
  stat = rng.normal(size=(t, n, a))
  ref = rng.normal(size=(t, r, n, a)) * rng.uniform(0.5, 2, (1, 1, n, 1))
  keep = rng.random((t, r, n)) < 0.5
  keep[0, :, 0], keep[0, :, 1] = True, False  # 0 OUT, 0 IN references
  keep[1] = True  # a target with no OUT reference at all
  n_in = keep.sum(1)
  assert {0, 1} <= set(n_in.ravel()) and {0, 1} <= set((r - n_in).ravel())
  scores = ddp_attacks.ddp_scores(stat, ref, keep,
                                  ("lira_online", "calibrated_mid"))
  np.testing.assert_allclose(scores["ddp_lira_online"],
                             _lira_online_loop(stat, ref, keep),
                             rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(scores["ddp_calibrated_mid"],
                             _calibrated_mid_loop(stat, ref, keep),
                             rtol=1e-4, atol=1e-4)


def test_planted_members_found_only_with_the_references():
  """Each point has its own level, which a member exceeds by 1: the raw
  statistic barely separates members, the references do."""
  rng = np.random.default_rng(1)
  t, r, n = 20, 8, 100
  level = rng.normal(0, 5, (t, 1, n))  # per target and point
  keep = np.zeros((t, r, n), bool)
  keep[:, ::2] = rng.random((t, 1, n)) < 0.5
  keep[:, 1::2] = ~keep[:, ::2]
  ref = level + keep + rng.normal(0, 0.3, (t, r, n))
  member = rng.random((t, n)) < 0.5
  stat = level[:, 0] + member + rng.normal(0, 0.3, (t, n))
  scores = ddp_attacks.ddp_scores(stat[..., None], ref[..., None], keep,
                                  ("lira_online",))["ddp_lira_online"]
  auc = metrics.roc_auc_score(member.ravel(), scores.ravel())
  raw = metrics.roc_auc_score(member.ravel(), stat.ravel())
  assert auc > 0.95 and raw < 0.65, (auc, raw)


@pytest.mark.parametrize("change,words", [
    (lambda s, r, k: (s[:, :-1], r, k), "same T, N, A"),
    (lambda s, r, k: (s, r, k[:, :-1]), "reference keep"),
    (lambda s, r, k: (s, r[:, :0], k[:, :0]), "at least 1 reference"),
    (lambda s, r, k: (s, np.where(r > 1, np.nan, r), k), "non-finite"),
])
def test_bad_input_is_named(change, words):
  rng = np.random.default_rng(2)
  args = (rng.normal(size=(2, 6, 1)), rng.normal(size=(2, 3, 6, 1)),
          rng.random((2, 3, 6)) < 0.5)
  with pytest.raises(ObservationError, match=words):
    ddp_attacks.ddp_scores(*change(*args), names=("lira_online",))
