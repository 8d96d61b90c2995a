"""LiRA against a per-target loop with scipy; leave-target-out; ranking sanity."""

import numpy as np
import pytest
from scipy import stats as sps

from mico_jax import attacks, scoring
from mico_jax.attacks import lira

K, N, A = 12, 40, 3


def _observations(seed=0, signal=1.0):
  rng = np.random.default_rng(seed)
  keep = rng.random((K, N)) < 0.5
  keep[:3, 0], keep[3:, 0] = True, False  # point 0: few IN shadows
  base = rng.normal(size=(1, N, 1)) * 3
  stat = (base + signal * keep[..., None] +
          rng.normal(size=(K, N, A)) * rng.uniform(0.5, 2, (1, N, 1)))
  return stat.astype(np.float32), keep


def _reference(stat, keep, online, fixed_variance):
  """A plain loop: for each target, Gaussians fitted to the other models."""
  score = np.zeros((K, N))
  for t in range(K):
    others = np.arange(K) != t
    means, variances = {}, {}
    for side, members in (("in", keep), ("out", ~keep)):
      mean = np.zeros((N, A))
      var = np.zeros((N, A))
      for i in range(N):
        obs = stat[others & members[:, i], i]
        mean[i] = obs.mean(0)
        var[i] = obs.var(0, ddof=1) if len(obs) >= 2 else np.nan
      if fixed_variance:
        var[:] = np.nanmean(var, 0)
      means[side], variances[side] = mean, var
    s = stat[t]
    if online:
      llr = (sps.norm.logpdf(s, means["in"], np.sqrt(variances["in"])) -
             sps.norm.logpdf(s, means["out"], np.sqrt(variances["out"])))
    else:
      z = (s - means["out"]) / np.sqrt(variances["out"])
      llr = -sps.norm.logcdf(-z)
    score[t] = llr.mean(-1)
  return score


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("fixed_variance", [True, False])
def test_lira_equals_per_target_loop(online, fixed_variance):
  stat, keep = _observations()
  fn = lira.lira_online if online else lira.lira_offline
  ours = np.asarray(fn(stat, keep, fixed_variance=fixed_variance))
  ref = _reference(stat, keep, online, fixed_variance)
  # Point 0 has under 2 IN shadows for some targets: the per-example variance
  # falls back to the global one there, which the loop leaves as NaN.
  finite = np.isfinite(ref)
  assert finite[:, 1:].all()
  np.testing.assert_allclose(ours[finite], ref[finite], rtol=2e-3, atol=2e-3)
  assert np.isfinite(ours).all()


def test_target_is_not_its_own_shadow():
  stat, keep = _observations(1)
  before = np.asarray(lira.lira_online(stat, keep))
  # Changing target 0's statistic on point 5 moves only target 0's score
  # there through its own observation, not through the shadow Gaussians:
  # every other target's score on point 5 moves, since 0 is their shadow.
  changed = stat.copy()
  changed[0, 5] += 10
  after = np.asarray(lira.lira_online(changed, keep))
  ref = _reference(changed, keep, online=True, fixed_variance=False)
  np.testing.assert_allclose(after[0, 5], ref[0, 5], rtol=2e-3)
  assert (after[1:, 5] != before[1:, 5]).all()
  np.testing.assert_array_equal(after[:, 6:], before[:, 6:])


def test_only_marked_shadows_are_used():
  stat, keep = _observations(2)
  shadow = np.arange(K) < 8
  scores = np.asarray(lira.lira_online(stat, keep, shadow))
  # Non-shadow models' statistics do not enter anyone else's Gaussians.
  changed = stat.copy()
  changed[8:] += 100
  again = np.asarray(lira.lira_online(changed, keep, shadow))
  np.testing.assert_allclose(again[:8], scores[:8], rtol=1e-5)


def test_attacks_rank_members_first_on_separable_data():
  stat, keep = _observations(3, signal=4.0)
  loss = np.log1p(np.exp(-stat))
  obs = attacks.Observations(stat, loss, keep)
  # The other attacks: tests/test_attack_suite.py.
  for name in ("loss", "lira_offline", "lira_offline_fixed_var",
               "lira_online", "lira_online_fixed_var"):
    attack = attacks.ATTACKS[name]
    auc = scoring.score(keep, np.asarray(attack(obs)))["AUC"]
    assert auc > 0.7, name


def test_point_with_no_out_shadow_uses_no_target_information():
  stat, keep = _observations(4)
  keep[:, 7] = True
  keep[0, 7] = False  # only target 0 is OUT on point 7
  base = np.asarray(lira.lira_offline(stat, keep))[0, 7]
  changed = stat.copy()
  changed[0, 7] += 5.0
  # The target's score moves with its own statistic, as a higher one should
  # look more like a member; with the fallback Gaussian fixed, strictly up.
  assert np.asarray(lira.lira_offline(changed, keep))[0, 7] > base
