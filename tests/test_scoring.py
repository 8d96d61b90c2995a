"""scoring.score against an independent computation with scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics

from mico_jax import scoring


def mico_reference(solutions, predictions):
  """MICO's scoring/score.py formulas, on scikit-learn's ROC."""
  fpr, tpr, _ = metrics.roc_curve(solutions, predictions)
  ref = {}
  for t in scoring.FPR_THRESHOLDS:
    ref[f"TPR_FPR_{round(t * 1e4)}"] = np.max(tpr[fpr < t])
  ref["AUC"] = metrics.roc_auc_score(solutions, predictions)
  ref["MIA"] = np.max(tpr - fpr)
  ref["accuracy"] = np.max(1 - (fpr + (1 - tpr)) / 2)
  return ref


@pytest.mark.parametrize("ties", ["none", "some", "heavy"])
@pytest.mark.parametrize("seed", range(5))
def test_score_matches_mico_formulas_on_sklearn(seed, ties):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(50, 5000))
  solutions = rng.integers(0, 2, n)
  predictions = rng.normal(size=n) + 0.7 * solutions
  if ties == "some":
    predictions = np.round(predictions, 1)
  elif ties == "heavy":
    predictions = rng.integers(0, 4, n) + solutions * rng.integers(0, 2, n)
  ours = scoring.score(solutions, predictions)
  ref = mico_reference(solutions, predictions)
  assert ours.keys() == ref.keys()
  for key in ref:
    np.testing.assert_allclose(ours[key], ref[key], rtol=1e-12, err_msg=key)


def test_pruning_can_lower_tpr_at_fpr_and_mico_prunes():
  # Twenty scores, each shared by one member and one non-member: the ROC is
  # the diagonal through (0.05, 0.05), (0.1, 0.1), ...; scikit-learn's default
  # pruning (MICO's) keeps only the ends of that run, so TPR at FPR < 0.2 is
  # 0.05, where the unpruned curve gives 0.15.
  solutions = np.tile([0, 1], 20)
  predictions = np.repeat(np.arange(20.0), 2)
  ours = scoring.score(solutions, predictions)
  assert ours == pytest.approx(mico_reference(solutions, predictions))
  assert ours["TPR_FPR_2000"] == pytest.approx(0.05)
  fpr, tpr, _ = metrics.roc_curve(solutions, predictions,
                                  drop_intermediate=False)
  assert np.max(tpr[fpr < 0.2]) == pytest.approx(0.15)


def test_unit_interval_map_keeps_the_roc():
  rng = np.random.default_rng(1)
  solutions = rng.integers(0, 2, (7, 200))
  raw = rng.normal(size=(7, 200)) * 1e6 + np.round(rng.normal(size=(7, 200)))
  raw[0, :5] = raw[1, 0]  # ties across models survive the map
  mapped = scoring.to_unit_interval(raw)
  assert mapped.shape == raw.shape
  assert mapped.min() == 0.0 and mapped.max() == 1.0
  assert scoring.score(solutions, mapped) == scoring.score(solutions, raw)


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="both members and non-members"):
    scoring.score(np.ones(4), np.arange(4.0))
  with pytest.raises(ValueError, match="must match"):
    scoring.score(np.array([0, 1]), np.arange(3.0))
  with pytest.raises(ValueError, match="NaN"):
    scoring.to_unit_interval(np.array([0.0, np.nan]))


def test_phases_are_scored_apart_and_pooled():
  rng = np.random.default_rng(2)
  member = rng.integers(0, 2, (6, 40)).astype(bool)
  raw = rng.normal(size=(6, 40)) + member
  phases = ("train", "train", "dev", "dev", "final", "final")
  got = scoring.score_phases(member, {"a": raw}, phases)
  assert set(got) == {"dev", "final", "all"}
  for phase, rows in (("dev", [2, 3]), ("final", [4, 5]),
                      ("all", range(6))):
    rows = list(rows)
    want = mico_reference(member[rows].ravel(), raw[rows].ravel())
    assert got[phase]["a"] == pytest.approx(want)
  with pytest.raises(ValueError, match="5 phases for 6 models"):
    scoring.score_phases(member, {"a": raw}, phases[:5])
