"""MICO challenges: three seeds per model -> splits of the pool -> `keep_KxN`.

For each model, as MICO's `ChallengeDataset` does with `random_split`:

  pool (N) --seed_challenge--> challenge (2m) | rest (N - 2m)
  challenge --seed_membership--> non-members (m) | members (m)
  rest      --seed_training-->   training (n - m) | evaluation (N - n - m)

The model trains on members + training (n points) and is evaluated on
evaluation. Random splits here come from numpy's PCG64 seeded with each seed,
so they are deterministic but not MICO's torch MT19937 draws: reproducing the
real release's splits is the importer's job.

MICO's bundle layout is `<scenario>/<phase>/model_<i>/` holding the seed files,
`solution.csv` (0/1 per challenge point) and `prediction.csv`; 200 models a
scenario split into phases train (100), dev (50) and final (50).
"""

import dataclasses
import os
from typing import Sequence

import numpy as np

PHASES = ("train", "dev", "final")
SEED_FILES = ("seed_challenge", "seed_training", "seed_membership")


class ChallengeError(ValueError):
  """Challenge sizes or bundle files that cannot work; the message says why."""


@dataclasses.dataclass(frozen=True)
class Challenge:
  """The splits of K models over one pool of N points (indices into the pool).

  Attributes:
    pool_size: N.
    seeds_Kx3: uint64 seeds per model: challenge, training, membership.
    challenge_KxC: the 2m challenge points of each model, in MICO's order.
    member_KxC: the solutions: whether each challenge point is a member.
    train_KxT: each model's n training points: members, then the rest.
    eval_KxE: each model's evaluation points.
    phases: MICO phase ("train", "dev", "final") of each model.
  """

  pool_size: int
  seeds_Kx3: np.ndarray
  challenge_KxC: np.ndarray
  member_KxC: np.ndarray
  train_KxT: np.ndarray
  eval_KxE: np.ndarray
  phases: tuple[str, ...]

  @property
  def num_models(self) -> int:
    return len(self.seeds_Kx3)

  @property
  def keep_KxN(self) -> np.ndarray:
    """bool `[K, N]`: model k trained on pool point n."""
    return self._mask(self.train_KxT)

  @property
  def eval_mask_KxN(self) -> np.ndarray:
    return self._mask(self.eval_KxE)

  def _mask(self, idx_KxT: np.ndarray) -> np.ndarray:
    mask = np.zeros((self.num_models, self.pool_size), bool)
    np.put_along_axis(mask, idx_KxT, True, axis=1)
    return mask

  def select(self, models: Sequence[int] | np.ndarray) -> "Challenge":
    """The challenge restricted to some models (in the given order)."""
    models = np.asarray(models)
    return dataclasses.replace(
        self, seeds_Kx3=self.seeds_Kx3[models],
        challenge_KxC=self.challenge_KxC[models],
        member_KxC=self.member_KxC[models], train_KxT=self.train_KxT[models],
        eval_KxE=self.eval_KxE[models],
        phases=tuple(self.phases[i] for i in models))


def make_seeds(seed: int, num_models: int) -> np.ndarray:
  """Distinct-looking uint64 seeds `[K, 3]` derived from one base seed."""
  return np.random.SeedSequence(seed).generate_state(
      num_models * 3, np.uint64).reshape(num_models, 3)


def mico_phases(num_models: int) -> tuple[str, ...]:
  """MICO's phase split, 100/50/50 out of 200, scaled to `num_models`."""
  num_train = num_models // 2
  num_dev = (num_models - num_train) // 2
  return (("train",) * num_train + ("dev",) * num_dev +
          ("final",) * (num_models - num_train - num_dev))


def check_sizes(pool_size: int, len_training: int, len_challenge: int) -> None:
  """Raises ChallengeError unless MICO's construction fits in the pool."""
  if len_challenge < 1:
    raise ChallengeError(f"challenge size m must be >= 1, got {len_challenge}")
  if len_training <= len_challenge:
    raise ChallengeError(
        f"training size n = {len_training} must exceed the number of member"
        f" challenges m = {len_challenge}")
  if len_training + len_challenge > pool_size:
    raise ChallengeError(
        f"a training set of n = {len_training} plus m = {len_challenge}"
        f" non-member challenges needs {len_training + len_challenge} points,"
        f" but the data set has only {pool_size}")


def _permutation(seed: int, n: int) -> np.ndarray:
  return np.random.default_rng(int(seed)).permutation(n)


def make_challenge(pool_size: int, len_training: int, len_challenge: int,
                   seeds_Kx3: np.ndarray,
                   phases: Sequence[str] | None = None) -> Challenge:
  """Builds every model's splits from its three seeds (MICO's construction).

  Args:
    pool_size: N, the number of points to draw from.
    len_training: n, each model's training-set size (members included).
    len_challenge: m, members (and non-members) among the challenge points.
    seeds_Kx3: seeds per model, columns challenge, training, membership.
    phases: MICO phase per model; defaults to `mico_phases(K)`.
  """
  check_sizes(pool_size, len_training, len_challenge)
  seeds_Kx3 = np.asarray(seeds_Kx3, np.uint64)
  m, n = len_challenge, len_training
  challenge, member, train, evaluation = [], [], [], []
  for seed_challenge, seed_training, seed_membership in seeds_Kx3:
    order = _permutation(seed_challenge, pool_size)
    chal, rest = order[:2 * m], order[2 * m:]
    rest = rest[_permutation(seed_training, rest.size)]
    split = _permutation(seed_membership, 2 * m)
    members = chal[split[m:]]
    challenge.append(chal)
    member.append(np.isin(chal, members))
    train.append(np.concatenate([members, rest[:n - m]]))
    evaluation.append(rest[n - m:])
  phases = tuple(phases) if phases is not None else mico_phases(len(seeds_Kx3))
  if len(phases) != len(seeds_Kx3) or not set(phases) <= set(PHASES):
    raise ChallengeError(f"need one phase of {PHASES} per model, got {phases}")
  return Challenge(pool_size, seeds_Kx3, np.stack(challenge), np.stack(member),
                   np.stack(train), np.stack(evaluation), phases)


def model_dir(root: str, scenario: str, phase: str, model: int) -> str:
  return os.path.join(root, scenario, phase, f"model_{model}")


def write_bundle(root: str, scenario: str, challenge: Challenge,
                 predictions_KxC: np.ndarray | None = None,
                 epsilon_K: np.ndarray | None = None) -> None:
  """Writes MICO's layout for one scenario: seeds, solutions, predictions.

  Models are numbered globally (`train/model_0`, ..., `dev/model_<K/2>`, ...)
  as in MICO. Predictions must already lie in [0, 1]. For DP models,
  `epsilon_K` (ε spent by each model) goes into each model's `epsilon` file,
  as MICO's training scripts write it.
  """
  if predictions_KxC is not None:
    predictions_KxC = np.asarray(predictions_KxC, np.float64)
    if predictions_KxC.shape != challenge.challenge_KxC.shape:
      raise ChallengeError(
          f"predictions have shape {predictions_KxC.shape}, the challenge"
          f" {challenge.challenge_KxC.shape}")
    if not ((predictions_KxC >= 0) & (predictions_KxC <= 1)).all():
      raise ChallengeError("MICO predictions must lie in [0, 1]")
  for k, phase in enumerate(challenge.phases):
    path = model_dir(root, scenario, phase, k)
    os.makedirs(path, exist_ok=True)
    for name, seed in zip(SEED_FILES, challenge.seeds_Kx3[k]):
      with open(os.path.join(path, name), "w") as f:
        f.write(f"{int(seed)}\n")
    np.savetxt(os.path.join(path, "solution.csv"),
               challenge.member_KxC[k].astype(int), fmt="%d")
    if predictions_KxC is not None:
      np.savetxt(os.path.join(path, "prediction.csv"), predictions_KxC[k],
                 fmt="%.17g")
    if epsilon_K is not None:
      with open(os.path.join(path, "epsilon"), "w") as f:
        f.write(f"{epsilon_K[k]:.3f}\n")


def _read_int(path: str) -> int:
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError) as e:
    raise ChallengeError(f"{path}: cannot read an integer seed ({e})") from e


def read_bundle(root: str, scenario: str, pool_size: int, len_training: int,
                len_challenge: int) -> tuple[Challenge, np.ndarray | None]:
  """Reads a scenario written by `write_bundle` (or MICO with all seeds).

  Returns the rebuilt challenge and the predictions `[K, 2m]` if every model
  has a `prediction.csv` (else None).
  """
  models = []
  for phase in PHASES:
    folder = os.path.join(root, scenario, phase)
    if not os.path.isdir(folder):
      continue
    for name in os.listdir(folder):
      if name.startswith("model_") and name[6:].isdigit():
        models.append((int(name[6:]), phase, os.path.join(folder, name)))
  if not models:
    raise ChallengeError(f"no model_<i> folders under {root}/{scenario}")
  models.sort()
  seeds = [[_read_int(os.path.join(path, s)) for s in SEED_FILES]
           for _, _, path in models]
  challenge = make_challenge(pool_size, len_training, len_challenge,
                             np.array(seeds, np.uint64),
                             phases=[phase for _, phase, _ in models])
  paths = [os.path.join(path, "prediction.csv") for _, _, path in models]
  if not all(os.path.exists(p) for p in paths):
    return challenge, None
  return challenge, np.stack([np.loadtxt(p, ndmin=1) for p in paths])
