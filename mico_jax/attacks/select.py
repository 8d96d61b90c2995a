"""Choosing and combining attacks without peeking at the targets' answers.

Every shadow-based attack already scores each model with the *other* shadows,
so attacking the shadows themselves is leave-one-out validation on models
whose membership the attacker knows. Selection runs every candidate once and,
for each group of targets, keeps the candidate with the best validation
metric (MICO's TPR at 10% FPR) on the group's validation models' challenge
points:

- targets that are not shadows (MICO's dev and final phases when only the
  train phase is revealed): validated on every shadow;
- targets that are shadows themselves (every model, when the engine trains
  its own): split by parity into two folds, each validated on the other
  fold's shadows, so no target's own membership decides its attack.

Where the groups choose different attacks, each group's scores are mapped to
one scale, the estimated false-positive rate against its validation
non-members (`-log FPR`, ties broken by the raw score), so the pooled ROC
over all targets compares like with like.

`combine` fits a logistic regression over standardised candidate scores on
the same validation models only (scikit-learn), cross-fitted inside them for
an honest validation metric.
"""

from typing import Callable, NamedTuple, Sequence

import numpy as np
from sklearn import linear_model

from mico_jax.attacks import (Observations, _UNCHECKED, cached,
                              check_observations, challenge_mask,
                              population_mask)
from mico_jax.attacks.lira import lira_offline, lira_online
from mico_jax.attacks.rmia import rmia

Attack = Callable[[Observations], object]

# Single attacks and parameter variants that selection considers.
CANDIDATES: dict[str, Attack] = {
    **{name: fn for name, fn in _UNCHECKED.items() if name != "loss"},
    **{f"lira_online_eb{df:g}": (lambda df: lambda o: lira_online(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, prior_df=df))(df)
       for df in (2.0, 32.0)},
    **{f"lira_offline_eb{df:g}": (lambda df: lambda o: lira_offline(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, prior_df=df))(df)
       for df in (2.0, 32.0)},
    **{f"rmia_online_gamma{g:g}": (lambda g: lambda o: rmia(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, population_mask(o),
        gamma=g))(g) for g in (0.5, 2.0)},
}
# Features of the logistic-regression combination.
COMBINED_FEATURES = ("lira_online", "lira_online_eb", "lira_offline_eb",
                     "lira_online_reference", "rmia_online", "calibrated_mid",
                     "calibrated_z")


class Choice(NamedTuple):
  """One group of targets: which attack it got and how it validated."""

  targets: str  # which targets, in words
  num_targets: int
  num_validation: int  # validation models
  attack: str
  validation: float  # the attack's validation TPR@10%FPR
  runner_up: tuple[str, float] | None


class Selection(NamedTuple):
  score_KxN: np.ndarray
  choices: list[Choice]
  validation: dict[str, dict[str, float]]  # group -> candidate -> metric

  def describe(self) -> str:
    """One line per group: chosen attack, its validation score, runner-up."""
    lines = []
    for c in self.choices:
      extra = (f"; runner-up {c.runner_up[0]} {c.runner_up[1]:.4f}"
               if c.runner_up else "")
      lines.append(f"{c.targets} ({c.num_targets} targets): {c.attack},"
                   f" validation TPR@10%FPR {c.validation:.4f} on"
                   f" {c.num_validation} known models{extra}")
    return "\n".join(lines)


def validation_groups(shadow_K: np.ndarray | None, num_models: int
                      ) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """`(name, targets_K, validation_K)` per group of targets (see module doc)."""
  shadow = (np.ones(num_models, bool) if shadow_K is None
            else np.asarray(shadow_K, bool))
  fold = np.zeros(num_models, int)
  fold[shadow] = np.arange(shadow.sum()) % 2
  groups = []
  if (~shadow).any():
    groups.append(("non-shadow targets", ~shadow, shadow))
  for f in (0, 1):
    targets = shadow & (fold == f)
    validation = shadow & (fold != f)
    if targets.any():
      if not validation.any():  # a single shadow: nothing else to learn from
        validation = targets
      groups.append((f"shadow targets, fold {f}", targets, validation))
  return groups


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.1
               ) -> float:
  """`max(tpr[fpr_curve < fpr])` over the ROC's distinct thresholds.

  MICO's metric without scikit-learn's pruning of collinear points (which
  can only lower it, rarely): one sort, fast enough to rank ~20 candidates.
  """
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
  tps = np.cumsum(y)[last]
  fps = last + 1 - tps
  ok = fps / max(fps[-1], 1) < fpr
  return float(tps[ok].max() / max(tps[-1], 1)) if ok.any() else 0.0


def validation_metric(score_KxN: np.ndarray, keep_KxN: np.ndarray,
                      rows_K: np.ndarray, points_KxN: np.ndarray) -> float:
  """TPR@10%FPR (`tpr_at_fpr`) over the given models' given points."""
  labels = np.asarray(keep_KxN, bool)[rows_K][points_KxN[rows_K]]
  if labels.all() or not labels.any():
    return float("nan")
  return tpr_at_fpr(labels, np.asarray(score_KxN)[rows_K][
      points_KxN[rows_K]])


def _fpr_scale(score_KxN, rows_K, reference):
  """`-log` of the estimated FPR of each score against `reference` scores."""
  reference = np.sort(reference)
  above = reference.size - np.searchsorted(reference, score_KxN[rows_K],
                                           "left")
  fpr = (above + 1) / (reference.size + 1)
  raw = score_KxN[rows_K]
  tie = (raw - raw.min()) / max(np.ptp(raw), 1e-12)
  return -np.log(fpr) + 1e-6 * tie


def _assemble(groups, picks, scores, obs, points):
  """Scores of each group's pick, on one scale when the picks differ."""
  keep = np.asarray(obs.keep_KxN, bool)
  out = np.zeros(keep.shape)
  same = len({p for p in picks}) == 1
  for (_, targets, validation), pick in zip(groups, picks):
    score = np.asarray(scores[pick], np.float64)
    if same:
      out[targets] = score[targets]
    else:
      nonmembers = score[validation][points[validation] & ~keep[validation]]
      out[targets] = _fpr_scale(score, targets, nonmembers)
  return out


def score_candidates(obs: Observations, names: Sequence[str] | None = None,
                     ) -> dict[str, np.ndarray]:
  """Candidates' `score_KxN` (host arrays; default: all `CANDIDATES`).

  Scores already computed for these observations (`attacks.cached`) are
  reused.
  """
  check_observations(obs)
  names = list(CANDIDATES) if names is None else names
  return {n: cached(obs, n, lambda n=n: np.asarray(CANDIDATES[n](obs)))
          for n in names}


def selection(obs: Observations) -> "Selection":
  """`select(obs)` over all candidates, once per observations."""
  return cached(obs, "selected", lambda: select(obs))


def combination(obs: Observations) -> "Selection":
  """`combine(obs)`, once per observations."""
  return cached(obs, "combined", lambda: combine(obs))


def select(obs: Observations, scores: dict[str, np.ndarray] | None = None,
           with_combined: bool = True,
           features: Sequence[str] = COMBINED_FEATURES) -> Selection:
  """Per group of targets, the candidate with the best validation metric.

  Args:
    obs: the observations; `shadow_K` marks the models whose membership the
      attacker knows.
    scores: precomputed candidate scores (default: all of `CANDIDATES`).
    with_combined: also consider `combine`'s logistic regression, validated
      out of sample.
    features: the candidates the combination stacks (those in `scores`).

  Returns:
    The assembled scores, the choice per group and every candidate's
    validation metric per group.
  """
  check_observations(obs)
  scores = dict(score_candidates(obs) if scores is None else scores)
  points = challenge_mask(obs)
  groups = validation_groups(obs.shadow_K, len(obs.keep_KxN))
  if with_combined:
    scores["combined"], validated = _combined(obs, scores, groups, points,
                                              features)
  picks, choices, table = [], [], {}
  for gi, (name, targets, validation) in enumerate(groups):
    metrics = {n: validation_metric(s, obs.keep_KxN, validation, points)
               for n, s in scores.items() if n != "combined"}
    if with_combined:
      metrics["combined"] = validated[gi]
    ranked = sorted(((v, n) for n, v in metrics.items() if np.isfinite(v)),
                    reverse=True)
    if not ranked:
      raise ValueError(f"{name}: no validation model has both members and"
                       " non-members among its challenge points")
    picks.append(ranked[0][1])
    table[name] = metrics
    choices.append(Choice(name, int(targets.sum()), int(validation.sum()),
                          ranked[0][1], ranked[0][0],
                          (ranked[1][1], ranked[1][0]) if len(ranked) > 1
                          else None))
  return Selection(_assemble(groups, picks, scores, obs, points), choices,
                   table)


def _features(scores, names, rows_K, points_KxN, fit_rows_K):
  """`[P, F]` standardised features of the given rows' points."""
  cols = []
  for n in names:
    s = scores[n]
    ref = s[fit_rows_K][points_KxN[fit_rows_K]]
    mu, sd = ref.mean(), max(ref.std(), 1e-12)
    cols.append(np.clip((s[rows_K] - mu) / sd, -10, 10))
  return np.stack(cols, -1)


def _fit(scores, names, keep, points, fit_rows):
  x = _features(scores, names, fit_rows, points, fit_rows)[points[fit_rows]]
  y = keep[fit_rows][points[fit_rows]]
  return linear_model.LogisticRegression(
      C=1.0, solver="newton-cholesky", max_iter=100).fit(x, y)


def _combined(obs, scores, groups, points, features):
  """Logistic-regression scores per group and their out-of-sample validation.

  For each group, a model fitted on its validation models scores its
  targets; the validation metric comes from fitting on one half of the
  validation models and scoring the other (both ways).
  """
  keep = np.asarray(obs.keep_KxN, bool)
  names = [n for n in features if n in scores]
  out = np.zeros(keep.shape)
  validated = []
  for _, targets, validation in groups:
    model = _fit(scores, names, keep, points, validation)
    x = _features(scores, names, targets, points, validation)
    out[targets] = model.decision_function(
        x.reshape(-1, len(names))).reshape(x.shape[:2])
    rows = np.flatnonzero(validation)
    halves = [rows[::2], rows[1::2]]
    if min(len(h) for h in halves) == 0:
      validated.append(float("nan"))
      continue
    held = np.zeros(keep.shape)
    for fit_half, test_half in (halves, halves[::-1]):
      fit_rows = np.zeros(len(keep), bool)
      fit_rows[fit_half] = True
      test_rows = np.zeros(len(keep), bool)
      test_rows[test_half] = True
      m = _fit(scores, names, keep, points, fit_rows)
      xt = _features(scores, names, test_rows, points, fit_rows)
      held[test_rows] = m.decision_function(
          xt.reshape(-1, len(names))).reshape(xt.shape[:2])
    validated.append(validation_metric(held, keep, validation, points))
  return out, validated


def combine(obs: Observations, scores: dict[str, np.ndarray] | None = None,
            features: Sequence[str] = COMBINED_FEATURES) -> Selection:
  """The logistic-regression combination alone, as a `Selection`."""
  check_observations(obs)
  scores = score_candidates(obs, list(features)) if scores is None else scores
  points = challenge_mask(obs)
  groups = validation_groups(obs.shadow_K, len(obs.keep_KxN))
  out, validated = _combined(obs, scores, groups, points, features)
  choices = [Choice(name, int(t.sum()), int(v.sum()), "combined", val, None)
             for (name, t, v), val in zip(groups, validated)]
  return Selection(out, choices, {})
