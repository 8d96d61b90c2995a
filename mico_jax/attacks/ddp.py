"""DP-distinguisher (DDP) attacks: every target scored by its own references.

MICO's DDP track reveals each target's training set except which of its 2m
challenge points are members. Reference models trained on exactly that set
(the n - m revealed points) plus a half of the target's challenge points
differ from the target only in the challenge points, so each challenge point
has reference models IN and OUT that are otherwise the target's twins
(`mico_jax.ddp` builds and trains them).

Here the engine's shadow attacks are reused as they are: for target t, the
stack `[t, its R references]` is an ordinary `[1 + R, N, A]` problem in which
the target is no shadow and the references are, and one `jax.vmap` over the
targets scores every target at once. N is any set of points (the pipeline
passes each target's own challenge points). Fallbacks are the attacks' own:
a point with 1 reference on a side takes the target's pooled variance of that
side, one with none takes that side's mean over the target's other points
(LiRA, `lira._gaussians`) or the other side's mean plus the target's mean
IN - OUT gap (calibrated and reference LiRA, `shadows.fill_missing_means`).
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mico_jax.attacks import ObservationError, Observations
from mico_jax.attacks import _UNCHECKED

# The registry's attacks that use only statistics and IN/OUT shadows (no
# population points, no loss, no tuning on held-out models).
NAMES = ("lira_online", "lira_online_fixed_var", "lira_online_eb",
         "lira_offline", "lira_online_reference", "calibrated_mid",
         "calibrated_z")
PREFIX = "ddp_"


def check(stat_TxNxA: np.ndarray, ref_stat_TxRxNxA: np.ndarray,
          ref_keep_TxRxN: np.ndarray) -> None:
  """Raises `ObservationError` for mismatched shapes, no references or
  non-finite statistics."""
  stat, ref = np.shape(stat_TxNxA), np.shape(ref_stat_TxRxNxA)
  if len(stat) != 3 or len(ref) != 4 or (ref[0],) + ref[2:] != stat:
    raise ObservationError(
        f"DDP: need stat [T, N, A] and reference stat [T, R, N, A] of the same"
        f" T, N, A; got {stat} and {ref}")
  if np.shape(ref_keep_TxRxN) != ref[:3]:
    raise ObservationError(f"DDP: reference keep has shape"
                           f" {np.shape(ref_keep_TxRxN)}, expected {ref[:3]}")
  if ref[1] < 1:
    raise ObservationError("DDP: every target needs at least 1 reference model")
  for name, value in (("stat", stat_TxNxA), ("reference stat",
                                             ref_stat_TxRxNxA)):
    bad = int((~np.isfinite(value)).sum())
    if bad:
      raise ObservationError(f"DDP: {name} has {bad} non-finite values")


def _per_target(attack: Callable[[Observations], jax.Array]):
  """`attack` on each target's own `[1 + R, N, A]` stack, vmapped over T."""
  def one(stat_NxA, ref_stat_RxNxA, ref_keep_RxN):
    stat = jnp.concatenate([stat_NxA[None], ref_stat_RxNxA])
    keep = jnp.concatenate([jnp.zeros_like(ref_keep_RxN[:1]), ref_keep_RxN])
    shadow = jnp.arange(stat.shape[0]) > 0  # the target is no shadow
    return attack(Observations(stat, stat, keep, shadow))[0]
  return jax.jit(jax.vmap(one))


_ATTACKS = {name: _per_target(_UNCHECKED[name]) for name in NAMES}


def ddp_scores(stat_TxNxA: np.ndarray, ref_stat_TxRxNxA: np.ndarray,
               ref_keep_TxRxN: np.ndarray, names: Sequence[str] = NAMES
               ) -> dict[str, np.ndarray]:
  """Scores `[T, N]` of every target by its own references, per attack.

  Args:
    stat_TxNxA: each target's statistics on its points (e.g. its challenge).
    ref_stat_TxRxNxA: the statistics of target t's R references on t's points.
    ref_keep_TxRxN: whether each reference trained on each of t's points.
    names: attacks of `NAMES`.

  Returns:
    `{PREFIX + name: score_TxN}`; higher means more likely a member.
  """
  check(stat_TxNxA, ref_stat_TxRxNxA, ref_keep_TxRxN)
  unknown = [n for n in names if n not in _ATTACKS]
  if unknown:
    raise ObservationError(f"DDP: unknown attacks {unknown}; known {NAMES}")
  args = (jnp.asarray(stat_TxNxA, jnp.float32),
          jnp.asarray(ref_stat_TxRxNxA, jnp.float32),
          jnp.asarray(ref_keep_TxRxN, bool))
  return {PREFIX + name: np.asarray(_ATTACKS[name](*args)) for name in names}


def coverage(ref_keep_TxRxN: np.ndarray) -> str:
  """One line: references per target and IN/OUT references per point."""
  keep = np.asarray(ref_keep_TxRxN, bool)
  n_in = keep.sum(1)
  n_out = keep.shape[1] - n_in
  return (f"DDP: {keep.shape[1]} references per target, trained on its"
          f" revealed training set plus half of its challenge points; IN/OUT"
          f" references per challenge point: min {n_in.min()}/{n_out.min()},"
          f" max {n_in.max()}/{n_out.max()}; {int((n_in < 2).sum())} pairs with"
          f" under 2 IN, {int((n_out < 2).sum())} under 2 OUT (fallbacks)")
