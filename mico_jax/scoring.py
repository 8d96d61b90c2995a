"""MICO's metrics, computed as MICO's scoring program does, plus the [0, 1] map.

MICO (`src/mico-competition/scoring/score.py`) concatenates the challenge
points of every model of a scenario and calls scikit-learn:
`fpr, tpr, _ = roc_curve(solutions, predictions)` (default
`drop_intermediate=True`, which prunes collinear points and can lower
TPR@FPR; the official numbers include it), then
`TPR_FPR_t = max(tpr[fpr < t / 1e4])` (strict `<`),
`AUC = roc_auc_score(solutions, predictions)`, `MIA = max(tpr - fpr)` and
`accuracy = max(1 - (fpr + 1 - tpr) / 2)`. `score` makes the same calls.
"""

from typing import Mapping, Sequence

import numpy as np
from sklearn import metrics as sk_metrics

FPR_THRESHOLDS = (0.001, 0.01, 0.05, 0.1, 0.15, 0.2)
METRIC_KEYS = tuple(f"TPR_FPR_{round(t * 1e4)}" for t in FPR_THRESHOLDS) + (
    "AUC", "MIA", "accuracy")


def _checked(labels: np.ndarray, scores: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(labels).ravel().astype(bool)
  scores = np.asarray(scores, dtype=np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(
        f"{labels.size} labels but {scores.size} scores: they must match")
  if labels.all() or not labels.any():
    raise ValueError("scoring needs both members and non-members")
  if np.isnan(scores).any():
    raise ValueError("membership scores contain NaN")
  return labels, scores


def roc_curve(labels: np.ndarray, scores: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC points `(fpr, tpr, thresholds)` as MICO gets them (scikit-learn's)."""
  return sk_metrics.roc_curve(*_checked(labels, scores))


def score(solutions: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
  """MICO's metrics for one scenario.

  Args:
    solutions: 0/1 membership of every challenge point (any shape; flattened).
    predictions: membership scores, same shape; higher means member.

  Returns:
    `{"TPR_FPR_10", ..., "TPR_FPR_2000", "AUC", "MIA", "accuracy"}` as floats.
  """
  labels, scores = _checked(solutions, predictions)
  fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
  result = {key: float(np.max(tpr[fpr < t]))
            for t, key in zip(FPR_THRESHOLDS, METRIC_KEYS)}
  result["AUC"] = float(sk_metrics.roc_auc_score(labels, scores))
  result["MIA"] = float(np.max(tpr - fpr))
  result["accuracy"] = float(np.max(1 - (fpr + (1 - tpr)) / 2))
  return result


def score_phases(member_KxC: np.ndarray, scores_KxC: Mapping[str, np.ndarray],
                 phases: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
  """MICO's metrics per phase: `{phase: {attack: metrics}}`.

  MICO scores its `dev` and `final` models separately (its `ref/` holds one
  phase); those come out under their names (where the phase has models), and
  `"all"` pools every model of every phase, `train` included: a number of
  ours, not one MICO reports.

  Args:
    member_KxC: the solutions of K models.
    scores_KxC: attack -> membership scores of the same challenge points.
    phases: each model's MICO phase.
  """
  phases = np.asarray(phases)
  if phases.shape != (len(member_KxC),):
    raise ValueError(f"{phases.size} phases for {len(member_KxC)} models")
  groups = {p: phases == p for p in ("dev", "final") if (phases == p).any()}
  groups["all"] = np.ones(len(phases), bool)
  return {group: {name: score(member_KxC[rows], np.asarray(s)[rows])
                  for name, s in scores_KxC.items()}
          for group, rows in groups.items()}


def to_unit_interval(scores: np.ndarray) -> np.ndarray:
  """Maps membership scores into [0, 1] without changing any ROC curve.

  One monotone map for the whole array (a whole scenario): the dense rank of
  each score divided by the number of distinct scores minus one. Ties stay
  ties and order is kept exactly, which per-model min-max scaling (MICO's
  starting kit) would not guarantee across models. NaN is refused.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if np.isnan(scores).any():
    raise ValueError("membership scores contain NaN")
  distinct, rank = np.unique(scores, return_inverse=True)
  rank = rank.reshape(scores.shape)
  return rank / max(distinct.size - 1, 1)


def score_table(scores: dict[str, dict[str, float]],
                columns: Sequence[str] = ("TPR_FPR_10", "TPR_FPR_100",
                                          "TPR_FPR_1000", "AUC", "MIA")) -> str:
  """A plain-text table: one row per attack, one column per metric."""
  width = max([len("attack")] + [len(a) for a in scores])
  lines = ["  ".join([f"{'attack':<{width}}"] + [f"{c:>12}" for c in columns])]
  for attack, metrics in scores.items():
    lines.append("  ".join([f"{attack:<{width}}"] +
                           [f"{metrics[c]:>12.4f}" for c in columns]))
  return "\n".join(lines)
