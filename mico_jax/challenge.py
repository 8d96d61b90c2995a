"""MICO challenges: three seeds per model -> splits of the pool -> `keep_KxN`.

The splits are exactly MICO's (`ChallengeDataset` in microsoft/MICO's
`src/mico-competition/mico.py`), which draws each with
`torch.utils.data.random_split(ds, lengths, generator)`:

  pool (N) --seed_challenge--> challenge (2m) | rest (N - 2m)
  challenge --seed_membership--> non-members (m) | members (m)
  rest      --seed_training-->   training (n - m) | evaluation (N - n - m)

The model trains on members + training (n points, members first, as MICO's
`ConcatDataset([member, training])`) and is evaluated on evaluation.
`random_split` cuts `randperm(len(ds))` into the lengths in order. MICO's
generator (`torchcsprng.create_mt19937_generator(seed)`) is a `std::mt19937`
seeded with the seed's low 32 bits, and its `randperm(n)` is a forward
Fisher–Yates swapping r[i] with r[i + u_i % (n - i)] for i = 0..n-2, u_i the
generator's raw 32-bit outputs; `torch.Generator().manual_seed(seed)` on CPU
gives the same permutations. Here the mt19937 draws come from numpy (its
legacy `RandomState` seeding is the same `init_genrand`), so torch is not
needed; tests check equality with torch where it is installed.

MICO's bundle layout is `<scenario>/<phase>/model_<i>/` holding the seed files,
`solution.csv` (0/1 per challenge point) and `prediction.csv`; 200 models a
scenario split into phases train (100), dev (50) and final (50). Both csv files
are written as MICO and its starting kit write them, one comma-separated row
(`csv.writer(f).writerow(values)`); `read_values` reads that and the
one-value-per-line form, which MICO's scorer (`np.loadtxt(delimiter=",")`)
also accepts.
"""

import dataclasses
import os
import warnings
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


def _mt19937(seed: int) -> np.random.RandomState:
  """torch's CPU (and torchcsprng's) mt19937 for `seed`.

  Both seed with the low 32 bits by `init_genrand`, as numpy's legacy
  `RandomState` does with a 32-bit integer; a full-range uint32 `randint` then
  returns the raw 32-bit outputs unchanged.
  """
  return np.random.RandomState(int(seed) & 0xFFFFFFFF)


def randperm(seeds_R: np.ndarray, sizes_R: np.ndarray,
             block: int = 4096) -> np.ndarray:
  """`torch.randperm(sizes_R[r], generator=<mt19937 seeded seeds_R[r]>)`, all r.

  Returns int32 `[R, max(sizes_R)]`: row r's first `sizes_R[r]` entries are
  its permutation (the rest of the row is untouched identity). Fisher–Yates
  is sequential in i, so the loop runs over i with array operations across
  all R permutations (each step: one gather and one scatter of R entries;
  memory traffic, not arithmetic, is the cost, hence int32 and no
  transposes). Draws are made `block` steps at a time to bound memory.
  """
  seeds_R = np.asarray(seeds_R, np.uint64)
  sizes_R = np.asarray(sizes_R, np.int64)
  num, n_max = len(seeds_R), int(sizes_R.max(initial=0))
  rngs = [_mt19937(s) for s in seeds_R]
  perm_RxN = np.empty((num, n_max), np.int32)
  perm_RxN[:] = np.arange(n_max, dtype=np.int32)
  flat = perm_RxN.reshape(-1)
  starts_R = np.arange(num) * n_max  # flat index of each row's position 0
  for start in range(0, n_max - 1, block):
    i_B = np.arange(start, min(start + block, n_max - 1))
    draws_BxR = np.zeros((len(i_B), num), np.int64)
    for r, rng in enumerate(rngs):
      count = min(len(i_B), int(sizes_R[r]) - 1 - start)
      if count > 0:
        draws_BxR[:count, r] = rng.randint(2**32, size=count, dtype=np.uint32)
    # Permutations already finished swap with themselves (j = i).
    left_BxR = np.maximum(sizes_R[None] - i_B[:, None], 1)
    where_BxR = i_B[:, None] + draws_BxR % left_BxR + starts_R
    for b, i in enumerate(i_B):
      here_R, where_R = starts_R + i, where_BxR[b]
      row_R = flat[here_R]
      flat[here_R] = flat[where_R]
      flat[where_R] = row_R
  return perm_RxN


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
  m, n, num = len_challenge, len_training, len(seeds_Kx3)
  # Challenge and training permutations run in one loop (same length scale).
  perm_2KxN = randperm(np.concatenate([seeds_Kx3[:, 0], seeds_Kx3[:, 1]]),
                       [pool_size] * num + [pool_size - 2 * m] * num)
  challenge_KxC = perm_2KxN[:num, :2 * m].astype(np.int64)
  rest_KxR = np.take_along_axis(perm_2KxN[:num, 2 * m:],
                                perm_2KxN[num:, :pool_size - 2 * m], axis=1)
  del perm_2KxN  # ~0.3 GB at MICO's sizes, no longer needed
  # Membership: non-members are the first m of the challenge's permutation.
  members_Kxm = randperm(seeds_Kx3[:, 2], [2 * m] * num)[:, m:]
  member_KxC = np.zeros((num, 2 * m), bool)
  np.put_along_axis(member_KxC, members_Kxm, True, axis=1)
  train_KxT = np.concatenate(
      [np.take_along_axis(challenge_KxC, members_Kxm, axis=1),
       rest_KxR[:, :n - m]], axis=1)
  eval_KxE = rest_KxR[:, n - m:].astype(np.int64)
  phases = tuple(phases) if phases is not None else mico_phases(len(seeds_Kx3))
  if len(phases) != len(seeds_Kx3) or not set(phases) <= set(PHASES):
    raise ChallengeError(f"need one phase of {PHASES} per model, got {phases}")
  return Challenge(pool_size, seeds_Kx3, challenge_KxC, member_KxC, train_KxT,
                   eval_KxE, phases)


def model_dir(root: str, scenario: str, phase: str, model: int) -> str:
  return os.path.join(root, scenario, phase, f"model_{model}")


def write_values(path: str, values: np.ndarray) -> None:
  """Writes one comma-separated row, as MICO's `solution.csv`/`prediction.csv`.

  Integers stay integers; floats are written in their shortest exact form.
  """
  values = np.asarray(values).ravel()
  with open(path, "w") as f:
    f.write(",".join(map(repr if values.dtype.kind == "f" else str,
                         values.tolist())) + "\n")


def read_values(path: str) -> np.ndarray:
  """A `solution.csv`/`prediction.csv` as float64 `[C]`.

  Accepts one comma-separated row (MICO's form) or one value per line; raises
  ChallengeError naming the file for anything else (unreadable, empty, a
  table of several rows and columns). Values are not range-checked here.
  """
  try:
    with warnings.catch_warnings():  # an empty file is refused below
      warnings.simplefilter("ignore", UserWarning)
      table = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
  except (OSError, ValueError) as e:
    raise ChallengeError(f"{path}: cannot read numbers ({e})") from e
  if table.size == 0:
    raise ChallengeError(f"{path}: no values")
  if min(table.shape) != 1:
    raise ChallengeError(
        f"{path}: expected one row or one column of values, got a"
        f" {table.shape[0]}x{table.shape[1]} table")
  return table.ravel()


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
    write_values(os.path.join(path, "solution.csv"),
                 challenge.member_KxC[k].astype(int))
    if predictions_KxC is not None:
      write_values(os.path.join(path, "prediction.csv"), predictions_KxC[k])
    if epsilon_K is not None:
      with open(os.path.join(path, "epsilon"), "w") as f:
        f.write(f"{epsilon_K[k]:.3f}\n")


def _read_int(path: str) -> int:
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError) as e:
    raise ChallengeError(f"{path}: cannot read an integer seed ({e})") from e


def model_folders(scenario_root: str) -> list[tuple[int, str, str]]:
  """`(i, phase, path)` of every `<phase>/model_<i>` folder, sorted by i."""
  found = []
  for phase in PHASES:
    folder = os.path.join(scenario_root, phase)
    if not os.path.isdir(folder):
      continue
    for name in os.listdir(folder):
      if name.startswith("model_") and name[6:].isdigit():
        found.append((int(name[6:]), phase, os.path.join(folder, name)))
  return sorted(found)


def read_bundle(root: str, scenario: str, pool_size: int, len_training: int,
                len_challenge: int) -> tuple[Challenge, np.ndarray | None]:
  """Reads a scenario written by `write_bundle` (or MICO with all seeds).

  Returns the rebuilt challenge and the predictions `[K, 2m]` if every model
  has a `prediction.csv` (else None).
  """
  models = model_folders(os.path.join(root, scenario))
  if not models:
    raise ChallengeError(f"no model_<i> folders under {root}/{scenario}")
  seeds = [[_read_int(os.path.join(path, s)) for s in SEED_FILES]
           for _, _, path in models]
  challenge = make_challenge(pool_size, len_training, len_challenge,
                             np.array(seeds, np.uint64),
                             phases=[phase for _, phase, _ in models])
  paths = [os.path.join(path, "prediction.csv") for _, _, path in models]
  if not all(os.path.exists(p) for p in paths):
    return challenge, None
  predictions = [read_values(p) for p in paths]
  for path, values in zip(paths, predictions):
    if values.shape != (2 * len_challenge,):
      raise ChallengeError(f"{path}: {values.size} predictions, expected"
                           f" {2 * len_challenge}")
  return challenge, np.stack(predictions)
