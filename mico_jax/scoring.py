"""MICO's scoring program, re-implemented in numpy, plus the [0, 1] mapping.

MICO (`scoring/score.py`) concatenates the challenge points of every model of a
scenario, builds scikit-learn's ROC curve (`roc_curve`, whose default
`drop_intermediate=True` prunes collinear points) and reads off:
`TPR_FPR_t = max(tpr[fpr < t / 1e4])` (strict `<`), `AUC`, `MIA = max(tpr - fpr)`
and `accuracy = max(1 - (fpr + 1 - tpr) / 2)`. The pruning can lower TPR@FPR,
and the official numbers include it, so `score` reproduces it exactly;
`score(..., prune=False)` gives the unpruned variant.
"""

from typing import Sequence

import numpy as np

FPR_THRESHOLDS = (0.001, 0.01, 0.05, 0.1, 0.15, 0.2)
METRIC_KEYS = tuple(f"TPR_FPR_{round(t * 1e4)}" for t in FPR_THRESHOLDS) + (
    "AUC", "MIA", "accuracy")


def roc_curve(labels: np.ndarray, scores: np.ndarray, prune: bool = True
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC points `(fpr, tpr, thresholds)`, as scikit-learn's `roc_curve`.

  One point per distinct score, from the highest down, after an initial (0, 0)
  point at threshold +inf; with `prune`, points in the middle of a straight
  run are dropped as scikit-learn does with `drop_intermediate=True`.
  """
  labels = np.asarray(labels).ravel().astype(bool)
  scores = np.asarray(scores, dtype=np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(
        f"{labels.size} labels but {scores.size} scores: they must match")
  if labels.all() or not labels.any():
    raise ValueError("scoring needs both members and non-members")
  order = np.argsort(-scores, kind="stable")
  scores, labels = scores[order], labels[order]
  # The last index of each run of equal scores is where the curve moves.
  last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  tps = np.cumsum(labels)[last].astype(np.float64)
  fps = (last + 1) - tps
  thresholds = scores[last]
  if prune and fps.size > 2:
    corner = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
    tps, fps, thresholds = tps[corner], fps[corner], thresholds[corner]
  tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
  thresholds = np.r_[np.inf, thresholds]
  return fps / fps[-1], tps / tps[-1], thresholds


def score(solutions: np.ndarray, predictions: np.ndarray, prune: bool = True
         ) -> dict[str, float]:
  """MICO's metrics for one scenario.

  Args:
    solutions: 0/1 membership of every challenge point (any shape; flattened).
    predictions: membership scores, same shape; higher means member.
    prune: drop collinear ROC points first, as MICO's official scores do.

  Returns:
    `{"TPR_FPR_10", ..., "TPR_FPR_2000", "AUC", "MIA", "accuracy"}` as floats.
  """
  fpr, tpr, _ = roc_curve(solutions, predictions, prune=prune)
  result = {}
  for t, key in zip(FPR_THRESHOLDS, METRIC_KEYS):
    result[key] = float(np.max(tpr[fpr < t]))
  # The trapezoid area is the same with or without the collinear points.
  result["AUC"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
  result["MIA"] = float(np.max(tpr - fpr))
  result["accuracy"] = float(np.max(1 - (fpr + (1 - tpr)) / 2))
  return result


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
