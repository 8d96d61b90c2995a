"""A PyTorch re-creation of MICO's tabular trainer and release layout.

Follows MICO's `training/train_purchase100.py` and `mico.py`; torch (and, for
DP, opacus) are imported inside the functions, so importing this module needs
neither. `experiments/make_mico_release.py` is its command line; tests use it
to build small MICO-layout releases.
"""

import csv
import dataclasses
import os

import numpy as np

from mico_jax import challenge


@dataclasses.dataclass(frozen=True)
class Recipe:
  """MICO's Purchase-100 hyper-parameters (train_purchase100_*.sh)."""

  epochs: int = 30
  batch_size: int = 512
  learning_rate: float = 1e-3
  step: int = 5
  gamma: float = 0.9
  noise_multiplier: float | None = None  # DP-SGD when set
  clip_norm: float = 2.6


def mico_seeds(split_seed: int, index: int) -> list[int]:
  """Three seeds in [0, 2^63), as MICO draws them from its split generator."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(split_seed * 100_003 + index)
  return [int(s) for s in torch.empty(3, dtype=torch.int64).random_(
      generator=generator)]


def mico_splits(pool_size: int, len_training: int, len_challenge: int,
                seeds: list[int]):
  """(challenge, member flags, training list, evaluation) by torch itself."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import data  # pylint: disable=g-import-not-at-top
  seed_challenge, seed_training, seed_membership = seeds
  m, n = len_challenge, len_training
  chal, rest = data.random_split(
      range(pool_size), [2 * m, pool_size - 2 * m],
      generator=torch.Generator().manual_seed(seed_challenge))
  training, evaluation = data.random_split(
      rest, [n - m, pool_size - n - m],
      generator=torch.Generator().manual_seed(seed_training))
  _, member = data.random_split(
      chal, [m, m], generator=torch.Generator().manual_seed(seed_membership))
  challenge_idx = np.array(list(chal))
  member_idx = np.array(list(member))
  return (challenge_idx, np.isin(challenge_idx, member_idx),
          np.concatenate([member_idx, np.array(list(training))]),
          np.array(list(evaluation)))


def train_mlp(x: np.ndarray, y: np.ndarray, train_idx: np.ndarray,
              num_classes: int, hidden: int, recipe: Recipe, seed: int
              ) -> dict:
  """One model as MICO's script trains it; returns its `state_dict`."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.utils import data  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  x = x.reshape(len(x), -1)

  class MLP(nn.Module):

    def __init__(self):
      super().__init__()
      self.mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.Tanh(),
                               nn.Linear(hidden, num_classes))

    def forward(self, inputs):
      return self.mlp(inputs)

  model = MLP()
  pairs = data.TensorDataset(torch.from_numpy(x[train_idx]),
                            torch.from_numpy(y[train_idx]).long())
  loader = data.DataLoader(pairs, batch_size=recipe.batch_size)  # in order
  optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
  criterion = nn.CrossEntropyLoss()
  if recipe.noise_multiplier is not None:
    import opacus  # pylint: disable=g-import-not-at-top
    # Opacus's ghost clipping: the same clipped, noised sum as MICO's
    # per-sample-gradient hooks (~13x less CPU here), keys still `_module.`.
    model, optimizer, criterion, loader = opacus.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        criterion=criterion, noise_multiplier=recipe.noise_multiplier,
        max_grad_norm=recipe.clip_norm, poisson_sampling=True,
        grad_sample_mode="ghost")
  scheduler = torch.optim.lr_scheduler.StepLR(optimizer, recipe.step,
                                              recipe.gamma)
  for _ in range(recipe.epochs):
    for inputs, target in loader:
      optimizer.zero_grad()
      criterion(model(inputs), target).backward()
      optimizer.step()
    scheduler.step()
  return model.state_dict()


def write_metadata(folder: str, phase: str, seeds, member,
                   solutions_folder: str | None) -> None:
  """A `model_<i>` folder's seeds and solution in MICO's layout.

  train: three seeds and `solution.csv`; dev/final: `seed_challenge` only,
  the solution under `solutions_folder` (CodaLab's `ref/`).
  """
  os.makedirs(folder, exist_ok=True)
  revealed = challenge.SEED_FILES if phase == "train" else ("seed_challenge",)
  for name, seed in zip(challenge.SEED_FILES, seeds):
    if name in revealed:
      with open(os.path.join(folder, name), "w") as f:
        print(seed, file=f)
  target = folder if phase == "train" else solutions_folder
  if target:
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "solution.csv"), "w") as f:
      csv.writer(f).writerow(member.astype(int).tolist())


def write_model(folder: str, phase: str, seeds, member, state_dict,
                solutions_folder: str | None) -> None:
  """One `model_<i>` folder in MICO's layout (dev/final: seeds hidden)."""
  import torch  # pylint: disable=g-import-not-at-top
  write_metadata(folder, phase, seeds, member, solutions_folder)
  torch.save(state_dict, os.path.join(folder, "model.pt"))


def make_scenario(out: str, task_name: str, scenario: str, x, y,
                  num_classes: int, hidden: int, len_training: int,
                  len_challenge: int, num_models: int, recipe: Recipe,
                  split_seed: int, log=print) -> None:
  """All models of one scenario, numbered and phased as MICO's 200."""
  phases = challenge.mico_phases(num_models)
  name = f"{task_name}_{scenario}"
  for index, phase in enumerate(phases):
    seeds = mico_seeds(split_seed, index + 1000 * "inf hi lo".split().index(
        scenario))
    _, member, train_idx, _ = mico_splits(len(y), len_training,
                                          len_challenge, seeds)
    state = train_mlp(x, y, train_idx, num_classes, hidden, recipe,
                      seed=seeds[0] % 2**31)
    sub = os.path.join(name, phase, f"model_{index}")
    write_model(os.path.join(out, task_name, sub), phase, seeds, member,
                state, os.path.join(out, "solutions", task_name, sub))
    if log and (index + 1) % 20 == 0:
      log(f"[{name}] {index + 1}/{num_models} models")
