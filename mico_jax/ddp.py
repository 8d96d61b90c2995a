"""The DP-distinguisher (DDP) track: reference models twinned with each target.

MICO's DDP scenarios train to the `lo` recipe (ε = 4) and reveal each
target's training set except which of its 2m challenge points are the m
members (`seed_challenge` and `seed_training` for every model). For target t
with revealed points S_t (its n - m non-challenge training points) and
challenge points C_t, reference r trains on S_t plus m points of C_t: exactly
n points, as the target, so DP-SGD's sampling rate and accounting are the
target's. References come in complementary pairs (one takes a random half of
C_t, the next the other half), so with R references every challenge point of
t is IN for exactly floor(R/2) or ceil(R/2) of them (an odd R's last one
takes a random half of its own). All T x R references are rows of one
`Challenge` and train as one batched program (`pipeline.train_in_waves`;
in waves if the execution asks), then `attacks.ddp` scores every target
against its own references.
"""

import numpy as np

from mico_jax import challenge as challenge_lib
from mico_jax import pipeline, stats
from mico_jax.attacks import ddp as ddp_attacks

# The recipe the DDP track trains with (MICO: `lo`, ε = 4).
RECIPE = "lo"
SCENARIO = "ddp"


def reference_challenge(targets: challenge_lib.Challenge, num_references: int,
                        seed: int) -> challenge_lib.Challenge:
  """The splits of R references per target: rows `t * R + r`.

  Reference r of target t trains on m of t's challenge points (first, as
  MICO orders members) and t's n - m revealed training points;
  `challenge_KxC` is t's challenge and `member_KxC` says which of it the
  reference trained on. Only `challenge_KxC` and the revealed part of
  `train_KxT` (after the first m) of `targets` are read.
  """
  if num_references < 1:
    raise challenge_lib.ChallengeError(
        f"DDP needs at least 1 reference per target, got {num_references}")
  num_targets, c = targets.challenge_KxC.shape
  m, pool = c // 2, targets.pool_size
  rest_TxS = targets.train_KxT[:, m:]
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xDD,)))
  pairs = (num_references + 1) // 2
  # Each pair: a random order of the challenge; first half IN for one,
  # second half IN for the other.
  order_TxPxC = rng.random((num_targets, pairs, c)).argsort(-1)
  halves_TxRxm = np.stack([order_TxPxC[..., :m], order_TxPxC[..., m:]],
                          2).reshape(num_targets, 2 * pairs, m)
  halves_TxRxm = halves_TxRxm[:, :num_references]
  member_TxRxC = np.zeros((num_targets, num_references, c), bool)
  np.put_along_axis(member_TxRxC, halves_TxRxm, True, -1)
  chosen_TxRxm = np.take_along_axis(targets.challenge_KxC[:, None],
                                    halves_TxRxm, -1)
  k = num_targets * num_references
  train_KxT = np.concatenate(
      [chosen_TxRxm, np.broadcast_to(rest_TxS[:, None], (
          num_targets, num_references, rest_TxS.shape[1]))], -1).reshape(k, -1)
  keep_KxN = np.zeros((k, pool), bool)
  np.put_along_axis(keep_KxN, train_KxT, True, 1)
  eval_KxE = np.nonzero(~keep_KxN)[1].reshape(k, -1)
  repeat = lambda a: np.repeat(a, num_references, 0)
  seeds_Kx3 = np.random.SeedSequence(seed, spawn_key=(0xDD, 1)).generate_state(
      k * 3, np.uint64).reshape(k, 3)
  return challenge_lib.Challenge(
      pool, seeds_Kx3, repeat(targets.challenge_KxC),
      member_TxRxC.reshape(k, c), train_KxT.astype(np.int64), eval_KxE,
      tuple(p for p in targets.phases for _ in range(num_references)))


def observe_references(model, config, dataset, references, queries,
                       execution: pipeline.Execution, log: pipeline.Log | None,
                       training_seed: int | None = None) -> stats.Stats:
  """Trains the references (in waves of `execution.wave_size`, 0: all at
  once) and returns their statistics; saved waves are reused."""
  return pipeline.train_in_waves(model, config, dataset, references, queries,
                                 execution, "references", log,
                                 training_seed)[1]


def reference_scores(targets: challenge_lib.Challenge, target_stat_KxNxA,
                     references: challenge_lib.Challenge,
                     reference_stat_KxNxA, names=ddp_attacks.NAMES
                     ) -> dict[str, np.ndarray]:
  """DDP scores `[T, 2m]` of each target's challenge points, per attack.

  Args:
    targets: the T targets' splits (challenges).
    target_stat_KxNxA: the targets' statistics on the pool `[T, N, A]`.
    references: `reference_challenge(targets, R, ...)`.
    reference_stat_KxNxA: the references' statistics `[T * R, N, A]`.
    names: attacks of `attacks.ddp.NAMES`.
  """
  t, c = targets.challenge_KxC.shape
  r = references.num_models // t
  idx = targets.challenge_KxC
  stat_TxCxA = np.take_along_axis(np.asarray(target_stat_KxNxA),
                                  idx[:, :, None], 1)
  ref = np.asarray(reference_stat_KxNxA).reshape(t, r, -1,
                                                 target_stat_KxNxA.shape[-1])
  ref_TxRxCxA = np.take_along_axis(ref, idx[:, None, :, None], 2)
  return ddp_attacks.ddp_scores(stat_TxCxA, ref_TxRxCxA,
                                references.member_KxC.reshape(t, r, c), names)


def coverage(references: challenge_lib.Challenge, num_targets: int) -> str:
  """One line on the references per target and per challenge point."""
  return ddp_attacks.coverage(references.member_KxC.reshape(
      num_targets, references.num_models // num_targets, -1))


def attack(targets: challenge_lib.Challenge, target_stat_KxNxA, model, config,
           dataset, queries, num_references: int, seed: int,
           execution: pipeline.Execution, log: pipeline.Log | None,
           training_seed: int | None = None
           ) -> tuple[dict[str, np.ndarray], str]:
  """The whole track: `num_references` references per target trained on its
  revealed set, then every target scored by its own.

  Returns the `ddp_<attack>` scores `[T, 2m]` and a line on the references.
  """
  refs = reference_challenge(targets, num_references, seed)
  if log:
    log(f"[{SCENARIO}] training {refs.num_models} reference models"
        f" ({num_references} per target) on the targets' revealed training"
        " sets")
  ref_stats = observe_references(model, config, dataset, refs, queries,
                                 execution, log, training_seed)
  return (reference_scores(targets, target_stat_KxNxA, refs,
                           ref_stats.stat_KxNxA),
          coverage(refs, targets.num_models))
