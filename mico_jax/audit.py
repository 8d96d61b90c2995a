"""Empirical privacy audits: a lower bound on ε from membership-attack scores.

A DP-SGD model is (ε, δ)-DP for add-or-remove-one neighbours, so any test
that guesses whether a point was in its training set has
TPR <= e^ε FPR + δ and TNR <= e^ε FNR + δ. Each challenge point of each
model is a trial: a member or not, and the attack's score for it. At a score
threshold, Clopper–Pearson intervals on TPR and FPR give, with the stated
confidence, ε >= log((TPR_low - δ) / FPR_high) (and the same with TNR and
FNR): a lower bound that a correct mechanism never exceeds, except with
probability 1 - confidence (Jagielski et al. 2020; Nasr et al. 2021).

The threshold is chosen on held-out models (every other model), and the
bound computed on the others, so the choice does not bias it. The trials of
one model are not independent; for a DP mechanism, guesses on many points of
one training run are no better than independent ones (Steinke, Nasr and
Jagielski 2023), which is what makes pooling them sound.

The f-DP estimate (Nasr et al. 2023): if the mechanism's trade-off curve is
Gaussian (μ-GDP, as DP-SGD's nearly is), the same intervals bound
μ >= Φ⁻¹(1 - FPR_high) - Φ⁻¹(FNR_high), and μ-GDP is (ε, δ)-DP exactly for
δ = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2). Tighter, but valid only under that
assumption: an estimate, reported beside the bound.

Canaries make the audit measure the worst case: `mislabel` turns some pool
points into mislabeled copies, which a model can only fit by memorising them.

jax-privacy's `CanaryScoreAuditor` computes similar bounds, but chooses the
threshold on the audited scores (with a Bonferroni correction over all
thresholds) and is not installed here: it pulls pydantic and pins optax and
dp-accounting to git versions, for ~100 lines of scipy.
"""

import dataclasses
import math

import numpy as np
from scipy import optimize, stats

from mico_jax.data import Dataset


def clopper_pearson(successes: np.ndarray, trials: np.ndarray, alpha: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """One-sided exact binomial bounds, each holding with probability 1 - α.

  Returns (lower, upper): P(p < lower) <= α and P(p > upper) <= α.
  """
  k, n = np.asarray(successes, float), np.asarray(trials, float)
  with np.errstate(invalid="ignore"):
    lower = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
    upper = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, n - k), 1.0)
  return lower, upper


def gdp_epsilon(mu: float, delta: float) -> float:
  """ε at which μ-GDP is (ε, δ)-DP (Dong, Roth and Su 2019, Cor. 2.13)."""
  if mu <= 0:
    return 0.0

  def excess(eps):  # δ(ε) - δ, falling in ε; e^ε Φ(.) in logs
    return (stats.norm.cdf(-eps / mu + mu / 2) - math.exp(
        eps + stats.norm.logcdf(-eps / mu - mu / 2)) - delta)

  if excess(0.0) <= 0:
    return 0.0
  high = 1.0
  while excess(high) > 0:
    high *= 2
  return float(optimize.brentq(excess, 0.0, high, xtol=1e-10))


@dataclasses.dataclass(frozen=True)
class Counts:
  """Confusion counts at a threshold: scores >= threshold guess "member"."""

  tp: int
  fn: int
  fp: int
  tn: int

  @classmethod
  def at(cls, threshold: float, scores: np.ndarray, member: np.ndarray
         ) -> "Counts":
    guess = scores >= threshold
    return cls(int((guess & member).sum()), int((~guess & member).sum()),
               int((guess & ~member).sum()), int((~guess & ~member).sum()))

  def epsilon_bounds(self, delta: float, alpha: float) -> tuple[float, float]:
    """(ε lower bound, GDP ε estimate), holding with probability 1 - α."""
    # Two one-sided intervals, α/2 each: both hold with probability 1 - α.
    tpr_low, _ = clopper_pearson(self.tp, self.tp + self.fn, alpha / 2)
    _, fpr_high = clopper_pearson(self.fp, self.fp + self.tn, alpha / 2)
    tpr_low, fpr_high = float(tpr_low), float(fpr_high)
    fnr_high, tnr_low = 1 - tpr_low, 1 - fpr_high
    bound = 0.0
    for hit, miss in ((tpr_low, fpr_high), (tnr_low, fnr_high)):
      if hit - delta > 0 and miss < 1:
        bound = max(bound, math.log(hit - delta) - math.log(max(miss, 1e-300)))
    with np.errstate(invalid="ignore"):
      mu = float(stats.norm.isf(fpr_high) - stats.norm.ppf(fnr_high))
    return bound, gdp_epsilon(mu if np.isfinite(mu) else 0.0, delta)


def _candidates(scores: np.ndarray, count: int = 400) -> np.ndarray:
  return np.unique(np.quantile(scores, np.linspace(0, 1, count)))


def audit(scores_KxC: np.ndarray, member_KxC: np.ndarray, delta: float,
          confidence: float = 0.95,
          include_KxC: np.ndarray | None = None) -> dict[str, float]:
  """Empirical ε of the mechanism that trained K models, from attack scores.

  Args:
    scores_KxC: an attack's scores of each model's challenge points; higher
      means member.
    member_KxC: whether each point was in the model's training set.
    delta: the δ at which ε is bounded (the scenario's).
    confidence: probability that the bound holds.
    include_KxC: which points are trials (e.g. only canaries); default all.

  Returns:
    `epsilon_lower_bound` (Clopper–Pearson, holds with `confidence`),
    `epsilon_gdp` (the f-DP estimate, assuming a Gaussian trade-off), the
    `threshold` chosen on the held-out models and the TPR and FPR there, and
    the numbers of `members` and `non_members` the bound counts.
  """
  scores_KxC = np.asarray(scores_KxC, np.float64)
  member_KxC = np.asarray(member_KxC, bool)
  include_KxC = (np.ones_like(member_KxC) if include_KxC is None
                 else np.asarray(include_KxC, bool))
  alpha = 1 - confidence
  held_out = np.arange(len(scores_KxC)) % 2 == 0
  result = {}
  for name, index in (("lower_bound", 0), ("gdp", 1)):
    # The threshold that would give the highest value on the held-out half.
    pick = include_KxC & held_out[:, None]
    scores, member = scores_KxC[pick], member_KxC[pick]
    best = max(_candidates(scores), key=lambda t: Counts.at(
        t, scores, member).epsilon_bounds(delta, alpha)[index])
    pick = include_KxC & ~held_out[:, None]
    counts = Counts.at(best, scores_KxC[pick], member_KxC[pick])
    result[f"epsilon_{name}"] = counts.epsilon_bounds(delta, alpha)[index]
    if index == 0:
      result.update(
          threshold=float(best),
          tpr=counts.tp / max(counts.tp + counts.fn, 1),
          fpr=counts.fp / max(counts.fp + counts.tn, 1),
          members=counts.tp + counts.fn, non_members=counts.fp + counts.tn)
  return {"confidence": confidence, "delta": delta, **result}


def audit_attacks(scores_KxC: dict[str, np.ndarray], member_KxC: np.ndarray,
                  delta: float, confidence: float = 0.95,
                  include_KxC: np.ndarray | None = None) -> dict[str, object]:
  """`audit` for each attack, Bonferroni-corrected so that the largest bound
  over the attacks holds with `confidence`.

  Returns:
    `{attack: audit(...), "epsilon_lower_bound": the largest bound,
    "epsilon_gdp": the largest estimate}`.
  """
  each = 1 - (1 - confidence) / len(scores_KxC)
  result = {name: audit(s, member_KxC, delta, each, include_KxC)
            for name, s in scores_KxC.items()}
  return {**result, **{key: max(r[key] for r in result.values())
                       for key in ("epsilon_lower_bound", "epsilon_gdp")}}


def mislabel(dataset: Dataset, count: int, seed: int = 0
             ) -> tuple[Dataset, np.ndarray]:
  """The pool with `count` seeded random points relabeled: canaries.

  Each canary gets a uniformly random wrong label, so a model predicts it
  only by memorising it: wherever it lands among a model's challenge points,
  it is a worst-case trial for the audit.

  Returns:
    (the pool with canaries, bool `[N]`: which points are canaries).
  """
  rng = np.random.default_rng(seed)
  canary_N = np.zeros(len(dataset), bool)
  canary_N[rng.choice(len(dataset), count, replace=False)] = True
  shift = rng.integers(1, dataset.num_classes, len(dataset))
  y = np.where(canary_N, (dataset.y + shift) % dataset.num_classes, dataset.y)
  return dataclasses.replace(dataset, y=y.astype(dataset.y.dtype)), canary_N
