"""Membership attacks: pure functions of stacked statistics -> `score_KxN`.

Every attack scores every point for every model as a target in one call;
higher means more likely a member. `ATTACKS` names the ones the main job runs;
each checks its `Observations` first (`check_observations`).
"""

from typing import Callable, NamedTuple

import jax
import numpy as np

from mico_jax.attacks import calibrated as calibrated_lib
from mico_jax.attacks import rmia as rmia_lib
from mico_jax.attacks.baselines import loss_attack
from mico_jax.attacks.lira import (lira_offline, lira_offline_reference,
                                   lira_online, lira_online_reference)

# Prior degrees of freedom of the shrunk ("eb") LiRA variances: a point's own
# variance outweighs the pooled one from 9 shadows on.
EB_PRIOR_DF = 8.0
# Validation models `rmia_offline` tunes its `a` on (the lowest-numbered
# shadows), as its authors tune on one reference model paired with a target.
RMIA_TUNE_MODELS = 8


class Observations(NamedTuple):
  """What an attacker sees: statistics of K models on N points, and membership.

  `shadow_K` marks the models whose `keep` row the attacker knows and may use
  as shadows (MICO reveals only the train phase); None means all.
  `challenge_KxC` (MICO reveals it for every model) lists each model's
  challenge points: RMIA draws its population from the other points, and
  validation scores the shadows on theirs; None: all points.
  """

  stat_KxNxA: np.ndarray
  loss_KxNxA: np.ndarray
  keep_KxN: np.ndarray
  shadow_K: np.ndarray | None = None
  challenge_KxC: np.ndarray | None = None


class ObservationError(ValueError):
  """Observations an attack cannot use; the message says what is wrong."""


def check_observations(obs: Observations) -> None:
  """Raises `ObservationError` for mismatched shapes, non-finite statistics
  or a model with no shadow other than itself."""
  stat = np.asarray(obs.stat_KxNxA)
  if stat.ndim != 3:
    raise ObservationError(f"stat_KxNxA must be [K, N, A], got {stat.shape}")
  k, n, _ = stat.shape
  for name, value, shape in (
      ("loss_KxNxA", obs.loss_KxNxA, stat.shape), ("keep_KxN", obs.keep_KxN,
                                                   (k, n)),
      ("shadow_K", obs.shadow_K, (k,))):
    if value is not None and np.shape(value) != shape:
      raise ObservationError(f"{name} has shape {np.shape(value)}, expected"
                             f" {shape} from stat_KxNxA {stat.shape}")
  if obs.challenge_KxC is not None:
    c = np.asarray(obs.challenge_KxC)
    if c.ndim != 2 or c.shape[0] != k or (c.size and (c.min() < 0 or
                                                      c.max() >= n)):
      raise ObservationError(f"challenge_KxC must be [K={k}, C] indices into"
                             f" {n} points, got shape {c.shape}")
  for name, value in (("stat_KxNxA", stat), ("loss_KxNxA", obs.loss_KxNxA)):
    bad = ~np.isfinite(np.asarray(value))
    if bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ObservationError(
          f"{name} has {int(bad.sum())} non-finite values (first at model"
          f" {first[0]}, point {first[1]}, query {first[2]})")
  shadow = (np.ones(k, bool) if obs.shadow_K is None
            else np.asarray(obs.shadow_K, bool))
  others = shadow.sum() - shadow
  if (others < 1).any():
    raise ObservationError(
        f"model {int(np.argmin(others))} has no shadow model other than"
        f" itself ({int(shadow.sum())} shadows of {k} models)")


def challenge_mask(obs: Observations) -> np.ndarray:
  """`[K, N]`: each model's challenge points (all points if unknown)."""
  k, n = np.shape(obs.keep_KxN)
  if obs.challenge_KxC is None:
    return np.ones((k, n), bool)
  mask = np.zeros((k, n), bool)
  np.put_along_axis(mask, np.asarray(obs.challenge_KxC), True, 1)
  return mask


def population_mask(obs: Observations) -> np.ndarray:
  """RMIA's population per target: the points outside its challenge set."""
  if obs.challenge_KxC is None:
    return np.ones(np.shape(obs.keep_KxN), bool)
  return ~challenge_mask(obs)


def shadow_coverage(obs: Observations) -> str:
  """One line: how many (target, challenge point) pairs fall back.

  Counts pairs with under 2 IN or under 2 OUT shadows (leave-target-out),
  where the shadow attacks use their documented fallbacks.
  """
  shadow = (np.ones(len(obs.keep_KxN), bool) if obs.shadow_K is None
            else np.asarray(obs.shadow_K, bool))
  keep = np.asarray(obs.keep_KxN, bool)
  w_in, w_out = keep & shadow[:, None], ~keep & shadow[:, None]
  n_in = w_in.sum(0)[None] - w_in
  n_out = w_out.sum(0)[None] - w_out
  points = challenge_mask(obs)
  few_in = ((n_in < 2) & points).sum()
  few_out = ((n_out < 2) & points).sum()
  return (f"{int(shadow.sum())} shadows; of {int(points.sum())} (target,"
          f" challenge point) pairs {int(few_in)} have under 2 IN shadows and"
          f" {int(few_out)} under 2 OUT shadows (fallbacks used there);"
          f" median IN/OUT shadows {np.median(n_in[points]):.0f}/"
          f"{np.median(n_out[points]):.0f}")


def _rmia_offline(o: Observations) -> jax.Array:
  shadow = (np.ones(len(o.keep_KxN), bool) if o.shadow_K is None
            else np.asarray(o.shadow_K, bool))
  tune = np.zeros_like(shadow)
  tune[np.flatnonzero(shadow)[:RMIA_TUNE_MODELS]] = True
  population = population_mask(o)
  a, _ = rmia_lib.tune_offline_a(o.stat_KxNxA, o.keep_KxN, tune, o.shadow_K,
                                 population, challenge_mask(o))
  return rmia_lib.rmia(o.stat_KxNxA, o.keep_KxN, o.shadow_K, population,
                       offline=True, a=a)


Attack = Callable[[Observations], jax.Array]

_UNCHECKED: dict[str, Attack] = {
    "loss": lambda o: loss_attack(o.loss_KxNxA),
    "lira_offline": lambda o: lira_offline(o.stat_KxNxA, o.keep_KxN,
                                           o.shadow_K),
    "lira_offline_fixed_var": lambda o: lira_offline(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, fixed_variance=True),
    "lira_offline_eb": lambda o: lira_offline(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, prior_df=EB_PRIOR_DF),
    "lira_online": lambda o: lira_online(o.stat_KxNxA, o.keep_KxN, o.shadow_K),
    "lira_online_fixed_var": lambda o: lira_online(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, fixed_variance=True),
    "lira_online_eb": lambda o: lira_online(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, prior_df=EB_PRIOR_DF),
    "lira_online_reference": lambda o: lira_online_reference(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K),
    "lira_online_reference_pervar": lambda o: lira_online_reference(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, fixed_variance=False),
    "lira_offline_reference": lambda o: lira_offline_reference(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K),
    "rmia_online": lambda o: rmia_lib.rmia(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, population_mask(o)),
    "rmia_offline": _rmia_offline,
    **{f"calibrated_{kind}": (lambda kind: lambda o: calibrated_lib.calibrated(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, kind))(kind)
       for kind in calibrated_lib.KINDS},
}


def _checked(attack: Attack) -> Attack:
  def run(obs: Observations) -> jax.Array:
    check_observations(obs)
    return attack(obs)
  return run


# The last observations' scores, so that selection and combination reuse the
# candidates the main job already ran (and the report can describe the
# selection without rerunning it). Keyed by the arrays' identity; holding
# them keeps the identities valid.
_CACHE: dict[str, object] = {"key": None}


def cached(obs: Observations, name: str, compute: Callable[[], object]):
  """`compute()` once per observations and name (the last observations)."""
  key = tuple(id(x) for x in obs)
  if _CACHE["key"] != key:
    _CACHE.clear()
    _CACHE.update(key=key, obs=obs)
  if name not in _CACHE:
    _CACHE[name] = compute()
  return _CACHE[name]


def _cached_attack(name: str, attack: Attack) -> Attack:
  return _checked(lambda o: cached(o, name, lambda: np.asarray(attack(o))))


ATTACKS: dict[str, Attack] = {name: _cached_attack(name, fn)
                              for name, fn in _UNCHECKED.items()}

# select.py builds on the registry above.
from mico_jax.attacks import select as select_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

ATTACKS["selected"] = _checked(lambda o: select_lib.selection(o).score_KxN)
ATTACKS["combined"] = _checked(lambda o: select_lib.combination(o).score_KxN)
