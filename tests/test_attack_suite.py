"""RMIA, calibrated scores, reference and shrunk-variance LiRA, selection.

Each attack is compared with a plain per-target loop written from the
paper's (or the reference code's) formula, including points with 0 or 1
shadow on a side; a planted-answer test checks selection.
"""

import numpy as np
import pytest
from scipy import stats as sps

from mico_jax import attacks, scoring
from mico_jax.attacks import calibrated, lira, rmia, select, shadows

K, N, A = 10, 30, 2


def _observations(seed=0, signal=1.0):
  rng = np.random.default_rng(seed)
  keep = rng.random((K, N)) < 0.5
  keep[:, 0] = False
  keep[0, 0] = True  # point 0: 1 IN shadow for the others, 0 for target 0
  keep[:, 1] = True
  keep[:2, 1] = False  # point 1: 1 OUT shadow for targets 0, 1
  base = rng.normal(size=(1, N, 1)) * 2
  stat = (base + signal * keep[..., None] +
          rng.normal(size=(K, N, A)) * rng.uniform(0.5, 1.5, (1, N, 1)))
  return stat.astype(np.float32), keep


def _sides(keep, t, n):
  others = np.arange(len(keep)) != t
  return others & keep[:, n], others & ~keep[:, n]


def _gap(means_in, means_out, ok_in, ok_out):
  both = ok_in & ok_out
  return (means_in - means_out)[both].mean(0) if both.any() else 0.0


def test_loo_median_equals_loop():
  stat, keep = _observations()
  median, count = (np.asarray(a) for a in shadows.loo_median(stat, keep))
  for t in range(K):
    for n in range(N):
      side, _ = _sides(keep, t, n)
      assert count[t, n, 0] == side.sum()
      if side.any():
        np.testing.assert_allclose(median[t, n], np.median(stat[side, n], 0),
                                   rtol=1e-6)


def _reference_loop(stat, keep, online, fixed_variance):
  """tensorflow/privacy mi_lira_2021 plot.py's formulas, one target at a time
  (all shadows, no truncation), with our documented fallbacks."""
  out = np.zeros((K, N))
  for t in range(K):
    med, std, has, allobs = {}, {}, {}, {}
    for side in (0, 1):
      med[side] = np.zeros((N, A))
      std[side] = np.zeros((N, A))
      has[side] = np.zeros(N, bool)
      obs_all = []
      for n in range(N):
        obs = stat[_sides(keep, t, n)[side], n]
        obs_all.append(obs)
        has[side][n] = len(obs) > 0
        if len(obs):
          med[side][n] = np.median(obs, 0)
        std[side][n] = obs.std(0) if len(obs) >= 2 else np.nan
      allobs[side] = np.concatenate(obs_all)
      gstd = allobs[side].std()
      std[side][np.isnan(std[side])] = gstd
      if fixed_variance:
        std[side][:] = gstd
    gap = _gap(med[0], med[1], has[0], has[1])
    med_in = np.where(has[0][:, None], med[0], med[1] + gap)
    med_out = np.where(has[1][:, None], med[1], med[0] - gap)
    if online:
      s_in = std[0] if not fixed_variance else std[0]
      s_out = std[1] if not fixed_variance else std[0]  # IN std for both
      llr = (sps.norm.logpdf(stat[t], med_in, s_in) -
             sps.norm.logpdf(stat[t], med_out, s_out))
    else:
      llr = -sps.norm.logpdf(stat[t], med_out, std[1])
    out[t] = llr.mean(-1)
  return out


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("fixed_variance", [True, False])
def test_lira_reference_equals_loop(online, fixed_variance):
  stat, keep = _observations(1)
  fn = lira.lira_online_reference if online else lira.lira_offline_reference
  ours = np.asarray(fn(stat, keep, fixed_variance=fixed_variance))
  ref = _reference_loop(stat, keep, online, fixed_variance)
  # Two near-equal shadows give a std of ~1e-3, whose float32 sums of
  # squares carry ~1% error; everything else agrees to 2e-3.
  close = np.isclose(ours, ref, rtol=2e-3, atol=2e-3)
  assert close.mean() > 0.99
  np.testing.assert_allclose(ours, ref, rtol=2e-2, atol=2e-3)


def test_shrunk_variance_equals_formula_and_limits():
  stat, keep = _observations(2)
  prior_df = 4.0
  ours = np.asarray(lira.lira_online(stat, keep, prior_df=prior_df))
  ref = np.zeros((K, N))
  for t in range(K):
    stats_side = {}
    for side in (0, 1):
      mean, var, nu = np.zeros((N, A)), np.zeros((N, A)), np.zeros(N)
      for n in range(N):
        obs = stat[_sides(keep, t, n)[side], n]
        mean[n] = obs.mean(0) if len(obs) else np.nan
        if len(obs) >= 2:
          var[n], nu[n] = obs.var(0, ddof=1), len(obs) - 1
      pooled = var[nu > 0].mean(0)
      shrunk = (nu[:, None] * var + prior_df * pooled) / (nu[:, None] +
                                                          prior_df)
      stats_side[side] = (mean, shrunk)
    (m_in, v_in), (m_out, v_out) = stats_side[0], stats_side[1]
    llr = (sps.norm.logpdf(stat[t], m_in, np.sqrt(v_in)) -
           sps.norm.logpdf(stat[t], m_out, np.sqrt(v_out)))
    ref[t] = llr.mean(-1)
  finite = np.isfinite(ref)  # no mean without a shadow: fallback, not here
  np.testing.assert_allclose(ours[finite], ref[finite], rtol=2e-3, atol=2e-3)
  # prior_df 0 is the plain per-example variance; a huge one the pooled.
  np.testing.assert_allclose(lira.lira_online(stat, keep, prior_df=0.0),
                             lira.lira_online(stat, keep), rtol=1e-6)
  np.testing.assert_allclose(
      lira.lira_online(stat, keep, prior_df=1e9),
      lira.lira_online(stat, keep, fixed_variance=True), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", calibrated.KINDS)
def test_calibrated_equals_loop(kind):
  stat, keep = _observations(3)
  ours = np.asarray(calibrated.calibrated(stat, keep, kind=kind))
  ref = np.zeros((K, N))
  for t in range(K):
    if kind == "z":
      mean, var = np.zeros((N, A)), np.full((N, A), np.nan)
      for n in range(N):
        obs = stat[np.arange(K) != t, n]
        mean[n], var[n] = obs.mean(0), obs.var(0, ddof=1)
      ref[t] = ((stat[t] - mean) / np.sqrt(var)).mean(-1)
      continue
    mu, ok = {}, {}
    for side in (0, 1):
      mu[side], ok[side] = np.zeros((N, A)), np.zeros(N, bool)
      for n in range(N):
        obs = stat[_sides(keep, t, n)[side], n]
        ok[side][n] = len(obs) >= 2  # fewer: filled from the other side
        mu[side][n] = obs.mean(0) if len(obs) else 0
    gap = _gap(mu[0], mu[1], ok[0], ok[1])
    mu_in = np.where(ok[0][:, None], mu[0], mu[1] + gap)
    mu_out = np.where(ok[1][:, None], mu[1], mu[0] - gap)
    level = mu_in if kind == "in" else (mu_in + mu_out) / 2
    ref[t] = (stat[t] - level).mean(-1)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def _rmia_loop(stat, keep, population, offline, a, gamma, num_z):
  """The paper's score, one target and one point at a time."""
  p = 1 / (1 + np.exp(-stat.astype(np.float64)))
  z_all, valid_all = (np.asarray(x) for x in rmia.population_points(
      population, num_z))
  out = np.zeros((K, N))
  for t in range(K):
    prob = np.zeros((N, A))
    for n in range(N):
      w_in, w_out = _sides(keep, t, n)
      p_in, p_out = p[w_in, n], p[w_out, n]
      linear = ((1 + a) * p_out.mean(0) + (1 - a)) / 2 if len(p_out) else None
      if offline:
        prob[n] = linear if len(p_out) else p[w_in | w_out, n].mean(0)
      elif len(p_in) and len(p_out):
        prob[n] = (p_in.mean(0) + p_out.mean(0)) / 2
      else:
        prob[n] = linear if len(p_out) else p_in.mean(0)
    ratio = p[t] / prob
    z = z_all[t][valid_all[t]]
    for n in range(N):
      out[t, n] = np.mean([(ratio[n, q] / ratio[z, q] > gamma).mean()
                           for q in range(A)])
  return out


@pytest.mark.parametrize("offline,gamma", [(False, 1.0), (False, 2.0),
                                           (True, 1.0)])
def test_rmia_equals_loop(offline, gamma):
  stat, keep = _observations(4)
  population = np.ones((K, N), bool)
  population[:, :5] = False
  population[3, 5:12] = False  # target 3 has fewer z
  ours = np.asarray(rmia.rmia(stat, keep, None, population, offline=offline,
                              a=0.4, gamma=gamma, num_z=20))
  ref = _rmia_loop(stat, keep, population, offline, 0.4, gamma, 20)
  # Ratios equal up to float32 rounding can fall on either side of gamma.
  assert np.mean(np.abs(ours - ref) > 1e-6) < 0.01
  np.testing.assert_allclose(ours, ref, atol=0.06)


def test_rmia_population_excludes_points():
  population = np.ones((3, 50), bool)
  population[1, ::2] = False
  z, valid = (np.asarray(x) for x in rmia.population_points(population, 40))
  assert valid[0].all() and valid[1].sum() == 25
  assert population[1][z[1][valid[1]]].all()


def test_tune_offline_a_picks_the_best_auc_on_validation_models():
  stat, keep = _observations(5, signal=2.0)
  validate = np.arange(K) < 4
  a, auc = rmia.tune_offline_a(stat, keep, validate, grid=(0.0, 0.5, 1.0),
                               num_z=20)
  aucs = []
  for g in (0.0, 0.5, 1.0):
    s = np.asarray(rmia.rmia(stat, keep, offline=True, a=g, num_z=20))
    aucs.append(scoring.score(keep[validate], s[validate])["AUC"])
  assert a == (0.0, 0.5, 1.0)[int(np.argmax(aucs))]
  np.testing.assert_allclose(auc, max(aucs), rtol=1e-6)


def test_every_attack_finds_planted_members():
  stat, keep = _observations(6, signal=4.0)
  challenge = np.stack([np.random.default_rng(k).permutation(N)[:20]
                        for k in range(K)])
  obs = attacks.Observations(stat, np.log1p(np.exp(-stat)), keep, None,
                             challenge)
  for name, attack in attacks.ATTACKS.items():
    auc = scoring.score(keep, np.asarray(attack(obs)))["AUC"]
    assert auc > 0.8, name


def test_selection_picks_the_planted_attack_without_peeking():
  rng = np.random.default_rng(7)
  k, n = 40, 60
  keep = rng.random((k, n)) < 0.5
  stat = rng.normal(size=(k, n, 1)).astype(np.float32)
  obs = attacks.Observations(stat, stat, keep, np.arange(k) < 30)
  scores = {"good": keep + rng.normal(size=(k, n)),
            "noise": rng.normal(size=(k, n))}
  sel = select.select(obs, scores, with_combined=False)
  assert [c.attack for c in sel.choices] == ["good"] * 3
  assert [c.num_targets for c in sel.choices] == [10, 15, 15]
  # A target's own membership never decides its attack: flipping the
  # non-shadow targets' keep leaves their selected scores unchanged.
  flipped = obs._replace(keep_KxN=np.where(np.arange(k)[:, None] >= 30,
                                           ~keep, keep))
  again = select.select(flipped, scores, with_combined=False)
  np.testing.assert_array_equal(again.score_KxN[30:], sel.score_KxN[30:])
  assert "good" in sel.describe()


def test_combined_logistic_regression_learns_the_useful_feature():
  rng = np.random.default_rng(8)
  k, n = 30, 50
  keep = rng.random((k, n)) < 0.5
  stat = rng.normal(size=(k, n, 1)).astype(np.float32)
  obs = attacks.Observations(stat, stat, keep)
  noise = lambda: rng.normal(size=(k, n))
  scores = {name: noise() for name in select.COMBINED_FEATURES}
  scores["rmia_online"] = keep * 2.0 + noise()
  comb = select.combine(obs, scores)
  assert scoring.score(keep, comb.score_KxN)["AUC"] > 0.8
  assert all(c.validation > 0.5 for c in comb.choices)


@pytest.mark.parametrize("change,message", [
    (lambda o: o._replace(keep_KxN=o.keep_KxN[:, :-1]), "keep_KxN has shape"),
    (lambda o: o._replace(stat_KxNxA=np.where(
        np.arange(N)[None, :, None] == 3, np.nan, o.stat_KxNxA)),
     "non-finite values \\(first at model 0, point 3"),
    (lambda o: o._replace(shadow_K=np.arange(K) == 2),
     "model 2 has no shadow model other than itself"),
    (lambda o: o._replace(challenge_KxC=np.full((K, 3), N)), "challenge_KxC"),
])
def test_bad_observations_are_refused_clearly(change, message):
  stat, keep = _observations(9)
  obs = change(attacks.Observations(stat, stat, keep))
  with pytest.raises(attacks.ObservationError, match=message):
    attacks.ATTACKS["rmia_online"](obs)


def test_shadow_coverage_counts_fallbacks():
  stat, keep = _observations(10)
  line = attacks.shadow_coverage(attacks.Observations(stat, stat, keep))
  few = [sum(_sides(keep, t, n)[side].sum() < 2 for t in range(K)
             for n in range(N)) for side in (0, 1)]
  assert few[0] >= K and few[1] >= 2  # points 0 and 1 at least
  assert f"{few[0]} have under 2 IN shadows and {few[1]} under 2 OUT" in line
