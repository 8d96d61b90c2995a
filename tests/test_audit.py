"""Empirical privacy audits: bounds against independent computations, and
the audit catches a broken DP-SGD while never exceeding a correct one's ε."""

import dp_accounting
from dp_accounting import pld
import numpy as np
import pytest
from scipy import stats

from mico_jax import audit, data, dp, models, pipeline, tasks, train
from mico_jax import stats as stats_lib


@pytest.mark.parametrize("k,n", [(0, 50), (3, 50), (25, 50), (50, 50),
                                 (917, 1000)])
def test_clopper_pearson_matches_scipys_exact_interval(k, n):
  lower, upper = audit.clopper_pearson(k, n, 0.025)
  # The two-sided exact interval at 95% has 2.5% in each tail.
  want = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
  np.testing.assert_allclose([lower, upper], [want.low, want.high],
                             rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
def test_gdp_epsilon_matches_the_gaussian_mechanism(mu):
  # μ-GDP is the Gaussian mechanism with sensitivity 1 and σ = 1/μ.
  accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
  accountant.compose(dp_accounting.GaussianDpEvent(1 / mu))
  np.testing.assert_allclose(audit.gdp_epsilon(mu, 1e-5),
                             accountant.get_epsilon(1e-5), rtol=2e-3)


def test_audit_of_a_known_gaussian_trade_off():
  # Scores of a μ-GDP test: members N(μ, 1), non-members N(0, 1).
  mu, delta = 2.0, 1e-5
  rng = np.random.default_rng(0)
  member_KxC = rng.random((200, 200)) < 0.5
  scores_KxC = rng.normal(size=(200, 200)) + mu * member_KxC
  truth = audit.gdp_epsilon(mu, delta)
  result = audit.audit(scores_KxC, member_KxC, delta)
  assert 0.5 * truth < result["epsilon_lower_bound"] <= truth
  assert 0.8 * truth < result["epsilon_gdp"] <= 1.05 * truth
  assert result["members"] + result["non_members"] == 100 * 200
  # Only some points: fewer trials, a looser bound.
  first = np.zeros_like(member_KxC)
  first[:, :20] = True
  few = audit.audit(scores_KxC, member_KxC, delta, include_KxC=first)
  assert few["members"] + few["non_members"] == 100 * 20
  assert few["epsilon_lower_bound"] < result["epsilon_lower_bound"]


def test_mislabel_changes_only_the_canaries_labels():
  pool = data.Dataset("toy", np.zeros((50, 2), np.float32),
                      np.arange(50, dtype=np.int32) % 3, 3, "tabular")
  canaried, canary_N = audit.mislabel(pool, 10, seed=1)
  assert canary_N.sum() == 10
  assert (canaried.y[canary_N] != pool.y[canary_N]).all()
  np.testing.assert_array_equal(canaried.y[~canary_N], pool.y[~canary_N])
  assert canaried.y.dtype == pool.y.dtype and canaried.y.max() < 3


NUM_MODELS = 64
CLAIMED_EPSILON = 1.0
_DP_GRADIENT = dp.DPGradient


def _audit_dp_training(noise_divisor, monkeypatch):
  """Audits tiny DP-SGD models at a claimed ε, on canaries."""
  # 64 features for 100 training points: any labels can be memorised.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 64)).astype(np.float32)
  y = (x @ rng.normal(size=(64, 4))).argmax(1).astype(np.int32)
  pool, canary_N = audit.mislabel(data.Dataset("toy", x, y, 4, "tabular"),
                                  120, seed=0)

  def broken(clip_norm, noise_multiplier, expected_batch_size):
    # The noise divided; the accounting (and the claimed ε) kept.
    return _DP_GRADIENT(clip_norm, noise_multiplier / noise_divisor,
                        expected_batch_size)

  monkeypatch.setattr(dp, "DPGradient", broken)
  pipeline.make_trainer.cache_clear()  # trainers are cached by recipe
  task = tasks.Task("toy", lambda _: pool, lambda c: models.MLP(c, (32,)),
                    len(pool), len_training=100, len_challenge=50,
                    scenarios={})
  config = train.TrainConfig("sgd", 0.5, batch_size=10, epochs=30,
                             dp=dp.DPConfig(CLAIMED_EPSILON, 1e-5, 1.0))
  try:
    result = pipeline.run_scenario(
        task, config, pool, NUM_MODELS, 0, ["lira_online"],
        stats_lib.default_queries(pool, 0), log=None, training_seed=0)
  finally:
    pipeline.make_trainer.cache_clear()
  canary_KxC = canary_N[result.challenge.challenge_KxC]
  return audit.audit(result.scores_KxC["lira_online"],
                     result.challenge.member_KxC,
                     1e-5, include_KxC=canary_KxC)


def test_audit_catches_a_broken_mechanism_and_never_exceeds_a_correct_one(
    monkeypatch):
  broken = _audit_dp_training(10.0, monkeypatch)
  correct = _audit_dp_training(1.0, monkeypatch)
  assert broken["epsilon_lower_bound"] > CLAIMED_EPSILON, broken
  assert correct["epsilon_lower_bound"] <= CLAIMED_EPSILON, correct
