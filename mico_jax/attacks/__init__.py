"""Membership attacks: pure functions of stacked statistics -> `score_KxN`.

Every attack scores every point for every model as a target in one call;
higher means more likely a member. `ATTACKS` names the ones the main job runs.
"""

from typing import Callable, NamedTuple

import jax
import numpy as np

from mico_jax.attacks.baselines import loss_attack
from mico_jax.attacks.lira import lira_offline, lira_online


class Observations(NamedTuple):
  """What an attacker sees: statistics of K models on N points, and membership.

  `shadow_K` marks the models whose `keep` row the attacker knows and may use
  as shadows (MICO reveals only the train phase); None means all.
  """

  stat_KxNxA: np.ndarray
  loss_KxNxA: np.ndarray
  keep_KxN: np.ndarray
  shadow_K: np.ndarray | None = None


Attack = Callable[[Observations], jax.Array]

ATTACKS: dict[str, Attack] = {
    "loss": lambda o: loss_attack(o.loss_KxNxA),
    "lira_offline": lambda o: lira_offline(o.stat_KxNxA, o.keep_KxN,
                                           o.shadow_K),
    "lira_offline_fixed_var": lambda o: lira_offline(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, fixed_variance=True),
    "lira_online": lambda o: lira_online(o.stat_KxNxA, o.keep_KxN, o.shadow_K),
    "lira_online_fixed_var": lambda o: lira_online(
        o.stat_KxNxA, o.keep_KxN, o.shadow_K, fixed_variance=True),
}
